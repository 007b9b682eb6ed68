"""What every exported artefact says about itself (torch-free).

An ONNX model carries the information below in its ``metadata_props``; a
TensorRT engine ``model.plan`` carries it in the sidecar ``model.plan.json``;
``model.json`` beside an ONNX repeats it for humans and tools. The runtime
reads it back with :func:`read_artifact_info` and refuses a model without it.

Keys (all values are strings in ONNX metadata; JSON values in sidecars):

=====================  =====================================================
``dunet.format``       ``"dunet-deploy"`` — marks our artefacts
``dunet.spec``         the :class:`~dunet_deploy.spec.PreprocessSpec` as JSON
``dunet.model_name``   registry name, e.g. ``"dunet"``
``dunet.model_args``   JSON of the registry arguments
``dunet.params``       Keras-style parameter count
``dunet.metrics``      JSON of the checkpoint's validation metrics (may be {})
``dunet.versions``     JSON of package/torch/onnx versions at export time
``dunet.precision``    ``"fp32"``, ``"fp16"`` (mixed precision graph) or ``"int8"`` (QDQ)
``dunet.int8``         int8 models: JSON of the quantization policy and accuracy gate
``dunet.inference.*``  the :class:`~dunet_deploy.spec.InferenceDefaults`
                       (``tta``, ``min_lesion_mm3``; sidecar key
                       ``inference``); absent means the defaults
=====================  =====================================================

An engine sidecar adds what the TensorRT builder knows (:class:`EngineSidecar`,
one spelling per key; written by :func:`write_engine_sidecar`, read by
:meth:`EngineSidecar.from_info`):

========================  ==================================================
``tensorrt``              version of the TensorRT that built the engine
``gpu``                   ``{"name", "compute_capability", "binding"}``
``profiles``              ``[{"min", "opt", "max"}, ...]`` input shapes of
                          each optimisation profile, in profile order
``strongly_typed``        built as a strongly typed network
``source_onnx``           file name of the ONNX it was built from
``builder``               workspace, optimisation level, TF32, timing cache
``layer_precisions``      ``{"fp16": n, "fp32": m, ...}`` layers per precision
``hardware_compatibility`` ``"none"`` (engine runs on its compute capability only)
========================  ==================================================

Sidecars written before this format named the version ``tensorrt_version``;
it is still read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dunet_deploy.errors import DunetError, Interrupted
from dunet_deploy.spec import InferenceDefaults, PreprocessSpec

FORMAT = "dunet-deploy"
PREFIX = "dunet."
#: Input and output tensor names of every exported model.
INPUT_NAME = "slabs"
OUTPUT_NAME = "prob"


@dataclass(frozen=True)
class ArtifactInfo:
    """The self-description of an exported model.

    Attributes:
        spec: preprocessing the model expects.
        model_name: registry name.
        model_args: registry arguments.
        params: Keras-style parameter count.
        metrics: validation metrics of the source checkpoint.
        versions: package versions at export time.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        extra: anything else found in a sidecar (TensorRT version, GPU, profile…).
        inference: the post-processing the model is shipped with (TTA, small
            lesion removal); command-line flags override it.
    """

    spec: PreprocessSpec
    model_name: str
    model_args: dict[str, Any]
    params: int
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    extra: dict[str, Any] = field(default_factory=dict)
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    #: The registration template beside the model: ``{"file", "digest",
    #: "similarity_range"}`` (metadata key ``dunet.template``); ``None``: none.
    template: dict[str, Any] | None = None

    def to_metadata(self) -> dict[str, str]:
        """String key/value pairs for ONNX ``metadata_props``."""
        return {
            f"{PREFIX}format": FORMAT,
            f"{PREFIX}spec": self.spec.to_json(),
            f"{PREFIX}model_name": self.model_name,
            f"{PREFIX}model_args": json.dumps(self.model_args, sort_keys=True),
            f"{PREFIX}params": str(self.params),
            f"{PREFIX}metrics": json.dumps(self.metrics, sort_keys=True),
            f"{PREFIX}versions": json.dumps(self.versions, sort_keys=True),
            f"{PREFIX}precision": self.precision,
            **self.inference.to_parameters(),
            **({} if self.template is None
               else {f"{PREFIX}template": json.dumps(self.template, sort_keys=True)}),
        }

    def to_json_dict(self) -> dict[str, Any]:
        """JSON document for ``model.json`` / engine sidecars."""
        return {
            "format": FORMAT,
            "spec": self.spec.to_dict(),
            "model_name": self.model_name,
            "model_args": self.model_args,
            "params": self.params,
            "metrics": self.metrics,
            "versions": self.versions,
            "precision": self.precision,
            "inference": self.inference.to_dict(),
            **({} if self.template is None else {"template": self.template}),
            **self.extra,
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> ArtifactInfo:
        """Parse ONNX ``metadata_props``; ``DunetError`` naming ``source`` when not ours."""
        if meta.get(f"{PREFIX}format") != FORMAT:
            raise DunetError(f"{source}: not a dunet-deploy model (no '{PREFIX}format' metadata)")
        inference = _inference(lambda: InferenceDefaults.from_parameters(meta), source)
        try:
            return cls(
                spec=PreprocessSpec.from_json(meta[f"{PREFIX}spec"]),
                model_name=meta[f"{PREFIX}model_name"],
                model_args=json.loads(meta[f"{PREFIX}model_args"]),
                params=int(meta[f"{PREFIX}params"]),
                metrics=json.loads(meta.get(f"{PREFIX}metrics", "{}")),
                versions=json.loads(meta.get(f"{PREFIX}versions", "{}")),
                precision=meta.get(f"{PREFIX}precision", "fp32"),
                inference=inference,
                template=(json.loads(meta[f"{PREFIX}template"])
                          if f"{PREFIX}template" in meta else None),
            )
        except DunetError as e:
            raise DunetError(f"{source}: bad preprocessing spec in metadata: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise DunetError(f"{source}: incomplete dunet-deploy metadata ({e})") from None

    @classmethod
    def from_json_dict(cls, doc: Mapping[str, Any], source: str) -> ArtifactInfo:
        """Parse a sidecar document; ``DunetError`` naming ``source`` when not ours."""
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise DunetError(f"{source}: not a dunet-deploy sidecar (no 'format': '{FORMAT}')")
        known = {"format", "spec", "model_name", "model_args", "params", "metrics", "versions",
                 "precision", "inference", "template"}
        inference = _inference(lambda: InferenceDefaults.from_dict(doc.get("inference", {})),
                               source)
        try:
            return cls(
                spec=PreprocessSpec.from_dict(doc["spec"]),
                model_name=str(doc["model_name"]),
                model_args=dict(doc["model_args"]),
                params=int(doc["params"]),
                metrics=dict(doc.get("metrics", {})),
                versions=dict(doc.get("versions", {})),
                precision=str(doc.get("precision", "fp32")),
                extra={k: v for k, v in doc.items() if k not in known},
                inference=inference,
                template=dict(doc["template"]) if doc.get("template") else None,
            )
        except DunetError as e:
            raise DunetError(f"{source}: bad preprocessing spec: {e}") from None
        except (KeyError, ValueError, TypeError) as e:
            raise DunetError(f"{source}: incomplete dunet-deploy sidecar ({e})") from None


@dataclass(frozen=True)
class EngineSidecar:
    """What a TensorRT engine's sidecar records about its build (see the module docstring).

    Attributes:
        tensorrt: TensorRT version that built it (engines run only there).
        gpu_name: device name it was built on.
        compute_capability: ``"major.minor"`` of that device.
        binding: Python CUDA binding used by the builder.
        profiles: ``(min, opt, max)`` input shapes ``[N, C, S, S]`` per optimisation profile.
        strongly_typed: built as a strongly typed network.
        source_onnx: file name of the source ONNX.
        builder: builder settings (JSON-able).
        layer_precisions: number of engine layers per precision.
        hardware_compatibility: TensorRT hardware compatibility level (``"none"``).
    """

    tensorrt: str
    gpu_name: str
    compute_capability: str
    binding: str = "cuda-python"
    profiles: tuple[tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...] = ()
    strongly_typed: bool = True
    source_onnx: str = ""
    builder: dict[str, Any] = field(default_factory=dict)
    layer_precisions: dict[str, int] = field(default_factory=dict)
    hardware_compatibility: str = "none"

    def to_dict(self) -> dict[str, Any]:
        """The sidecar keys (merged into :attr:`ArtifactInfo.extra`)."""
        return {
            "tensorrt": self.tensorrt,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability,
                    "binding": self.binding},
            "profiles": [{"min": list(lo), "opt": list(opt), "max": list(hi)}
                         for lo, opt, hi in self.profiles],
            "strongly_typed": self.strongly_typed,
            "source_onnx": self.source_onnx,
            "builder": dict(self.builder),
            "layer_precisions": dict(self.layer_precisions),
            "hardware_compatibility": self.hardware_compatibility,
        }

    @classmethod
    def from_info(cls, info: ArtifactInfo, source: str) -> EngineSidecar:
        """Read the engine keys of a sidecar.

        Raises:
            DunetError: naming ``source`` when the TensorRT version or GPU is missing
                or malformed.
        """
        extra = info.extra
        version = extra.get("tensorrt", extra.get("tensorrt_version"))
        if not isinstance(version, str) or not version:
            raise DunetError(f"{source}: sidecar does not say which TensorRT built the engine "
                             "(no 'tensorrt' field); rebuild it with dunet-export")
        gpu = extra.get("gpu")
        if not isinstance(gpu, Mapping) or not gpu.get("compute_capability"):
            raise DunetError(f"{source}: sidecar does not say which GPU built the engine "
                             "(no 'gpu.compute_capability'); rebuild it with dunet-export")
        try:
            profiles = tuple(
                (tuple(p["min"]), tuple(p["opt"]), tuple(p["max"]))
                for p in extra.get("profiles", [])
            )
        except (KeyError, TypeError):
            raise DunetError(f"{source}: malformed 'profiles' in the sidecar") from None
        return cls(
            tensorrt=version,
            gpu_name=str(gpu.get("name", "")),
            compute_capability=str(gpu["compute_capability"]),
            binding=str(gpu.get("binding", "")),
            profiles=profiles,
            strongly_typed=bool(extra.get("strongly_typed", True)),
            source_onnx=str(extra.get("source_onnx", "")),
            builder=dict(extra.get("builder", {})),
            layer_precisions={str(k): int(v)
                              for k, v in dict(extra.get("layer_precisions", {})).items()},
            hardware_compatibility=str(extra.get("hardware_compatibility", "none")),
        )


def write_engine_sidecar(
    plan_path: str | os.PathLike[str],
    info: ArtifactInfo,
    engine: EngineSidecar,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.plan.json`` for an engine: ``info``, ``extra`` and the engine keys.

    Returns:
        The sidecar path.
    """
    side = sidecar_path(plan_path)
    doc = dataclasses.replace(info, extra={**dict(extra or {}), **engine.to_dict()})
    write_json(side, doc.to_json_dict())
    return side


def _inference(parse: Callable[[], InferenceDefaults], source: str) -> InferenceDefaults:
    """Parse stored inference defaults, naming ``source`` when they are bad."""
    try:
        return parse()
    except DunetError as e:
        raise DunetError(f"{source}: bad inference defaults: {e}") from None


def sidecar_path(model_path: str | os.PathLike[str]) -> Path:
    """Where the sidecar of an engine lives: ``model.plan`` -> ``model.plan.json``."""
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc``).

    Elsewhere it is set and restored at once (``os.umask`` has no getter).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (no partial file).

    The file gets the mode an ordinary ``open()`` gives, ``0o666 & ~umask``
    (``mkstemp`` alone would leave it private, 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(path: str | os.PathLike[str], option: str) -> Path:
    """Check, before any work, that ``path`` is (or can become) a writable folder.

    Nothing is created: the nearest existing folder is probed with a
    temporary file that is removed at once (``os.access`` is wrong for root
    and for read-only mounts).

    Args:
        path: The output folder as the user gave it.
        option: The option that named it (``"--out"``), for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        DunetError: ``"--out PATH: ..."`` when it is a file, cannot be created
            or is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise DunetError(f"{option} {out}: exists and is not a folder")
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DunetError(f"{option} {out}: cannot be created ({probe} is not a folder)")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        where = "" if probe == out.absolute() else f" (in {probe})"
        raise DunetError(f"{option} {out}: not writable{where}: {exc.strerror}") from None
    return out


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then raise them (files that belong together).

    For a group of writes that must all happen or none (``metrics.jsonl`` +
    ``best.pt`` + ``last.pt`` of one epoch, the files of one report): a signal
    that arrives inside is re-raised after the block as ``KeyboardInterrupt``
    (SIGINT) or :class:`~dunet_deploy.errors.Interrupted` (SIGTERM). Outside
    the main thread the block runs unprotected (signals go to the main thread).
    """
    previous_handlers = [signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)]
    if threading.current_thread() is not threading.main_thread() or None in previous_handlers:
        # Not the main thread (signals go there), or a handler installed outside Python
        # (Triton's python-backend stub): it could not be put back, so leave them alone.
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted(received[0]) if received[0] == signal.SIGTERM else KeyboardInterrupt()


def write_json(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> None:
    """Atomically write ``doc`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def read_sidecar(path: str | os.PathLike[str]) -> ArtifactInfo:
    """Read an engine sidecar or ``model.json``."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DunetError(f"{path}: sidecar not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DunetError(f"{path}: unreadable sidecar ({e})") from None
    return ArtifactInfo.from_json_dict(doc, str(path))


def read_onnx_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """Read the metadata of an ONNX file without loading its weights into memory twice."""
    # Base dependency, imported lazily to keep `import dunet_deploy.artifacts` cheap. Signals
    # held: an exception raised by a handler inside onnx's C++ initialisation aborts the process.
    with deferred_interrupts():
        import onnx

    path = Path(path)
    if not path.is_file():
        raise DunetError(f"{path}: model file not found")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, RuntimeError, ... for garbage
        raise DunetError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return ArtifactInfo.from_metadata(meta, str(path))


def read_artifact_info(path: str | os.PathLike[str]) -> ArtifactInfo:
    """The :class:`ArtifactInfo` of an ``.onnx`` file or of an engine with its sidecar."""
    from dunet_deploy.filetypes import MODEL, check_kind

    path = Path(path)
    if not path.exists():
        raise DunetError(f"{path}: model file not found")
    kind = check_kind(path, MODEL, "--engine")  # a checkpoint, scan or sidecar given as model
    if path.suffix == ".onnx" or (kind is not None and kind.name == "onnx"):
        return read_onnx_info(path)
    side = sidecar_path(path)
    # Neither ONNX nor a TensorRT plan, by its bytes or by its name (a plan's tag can
    # change between TensorRT versions, so the name counts too).
    if not side.exists() and kind is None and path.suffix not in (".plan", ".engine"):
        raise DunetError(f"{path}: not an exported model (neither ONNX nor a TensorRT engine); "
                         "--engine takes a .onnx file, or a TensorRT engine with its sidecar")
    if not side.exists():
        raise DunetError(f"{path}: no sidecar {side.name} beside the engine")
    return read_sidecar(side)
