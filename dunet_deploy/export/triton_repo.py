"""A Triton Inference Server model repository for an exported model.

Layout (``name`` defaults to ``dunet``)::

    ROOT/NAME/config.pbtxt
    ROOT/NAME/1/model.onnx      platform "onnxruntime_onnx"   (or)
    ROOT/NAME/1/model.plan      platform "tensorrt_plan"      (or)
    ROOT/NAME/1/model.py        backend "python": our runtime (OpenVINO / ONNX Runtime)
    ROOT/NAME/1/model.onnx        on model.onnx, for CPU servers
    ROOT/dunet_volume/config.pbtxt   backend "python": NIfTI bytes in, mask bytes out,
    ROOT/dunet_volume/1/model.py       the whole pipeline, calling NAME through BLS

The python-backend ``model.py`` files only import :mod:`dunet_deploy.serving`:
the server's Python must find our package (``dunet-serve --repository`` sets
``PYTHONPATH``; see README, "Serving").

``config.pbtxt`` declares the batch dimension implicitly (``max_batch_size``;
``dims`` exclude it), enables the dynamic batcher, and carries the model's
:meth:`~dunet_deploy.artifacts.ArtifactInfo.to_metadata` as ``parameters`` —
among them ``dunet.spec``, the preprocessing spec as JSON — so a client can
fetch everything it needs from the server's model configuration and parse it
with :meth:`~dunet_deploy.artifacts.ArtifactInfo.from_metadata`.

A TensorRT model's instance group names every optimisation profile of the
engine (read from its sidecar), and ``max_batch_size`` must be a batch those
profiles serve from 1 up (:func:`trt_instance_profiles` has Triton's rules).

The text is written directly (no protobuf dependency at export time); the
tests parse it with Triton's own ``ModelConfig`` message.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from dunet_deploy import __version__
from dunet_deploy.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    ArtifactInfo,
    EngineSidecar,
    read_artifact_info,
)
from dunet_deploy.data.nifti import DEFAULT_LIMITS, NiftiLimits
from dunet_deploy.errors import DunetError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "PLATFORMS",
    "VOLUME_MODEL_NAME",
    "read_config",
    "triton_config_text",
    "trt_instance_profiles",
    "volume_config_text",
    "write_spec_model",
    "write_triton_repo",
    "write_volume_model",
]

DEFAULT_MODEL_NAME = "dunet"
VOLUME_MODEL_NAME = "dunet_volume"
#: backend -> (Triton platform, file name in the version folder, instance kind);
#: "python" is Triton's python backend running :mod:`dunet_deploy.serving.network_model`.
PLATFORMS: dict[str, tuple[str, str, str]] = {
    "onnx": ("onnxruntime_onnx", "model.onnx", "KIND_AUTO"),  # GPU when the server has one
    "trt": ("tensorrt_plan", "model.plan", "KIND_GPU"),
    "python": ("python", "model.onnx", "KIND_CPU"),
}
#: Runtime options of a python-backend network model, as config parameters.
RUNTIME_DEFAULTS = {"runtime.backend": "auto", "runtime.precision": "auto",
                    "runtime.threads": "", "runtime.model_file": "model.onnx"}
_MODEL_PY = """\"\"\"{doc} Written by dunet-export {version}.

The code is dunet_deploy.serving.{module}: the server's Python must import
dunet_deploy (dunet-serve --repository sets PYTHONPATH; see README, Serving).
\"\"\"

try:
    from dunet_deploy.serving.{module} import TritonPythonModel  # noqa: F401
except ImportError as exc:
    raise ImportError(
        f"{{exc}}: this model needs the dunet_deploy package on the Triton server's "
        "PYTHONPATH (dunet-serve --repository sets it)"
    ) from exc
"""


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


#: ``(min, opt, max)`` input shapes ``[N, C, S, S]`` of one TensorRT optimisation profile.
Profile = tuple[Sequence[int], Sequence[int], Sequence[int]]


def trt_instance_profiles(profiles: Sequence[Profile], max_batch_size: int,
                          chw: Sequence[int]) -> list[str]:
    """The profile names an instance group of a TensorRT model must list.

    Triton's TensorRT backend (triton-inference-server/tensorrt_backend,
    ``src/model_state.cc`` ``GetProfileIndices`` / ``GetMaxSupportedBatchSize``
    and ``src/instance_state.cc`` ``InitOptimizationProfiles`` /
    ``GetMostOptimizedProfile``): an instance group without ``profile`` uses
    profile 0 only; the model refuses to load when ``max_batch_size`` exceeds the
    largest batch of the profiles named; each instance runs a batch on the named
    profile nearest its ``opt`` among those whose min..max hold it, and fails the
    batch when none does. Since the dynamic batcher may form any batch from 1 to
    ``max_batch_size``, every instance names all the engine's profiles, and
    together they must hold every such batch and the ``[C, S, S]`` of ``slabs``.

    Args:
        profiles: the engine's profiles, in profile order (its sidecar's ``profiles``).
        max_batch_size: the configuration's ``max_batch_size``.
        chw: ``(C, S, S)`` of input ``slabs``.

    Returns:
        ``["0", "1", ...]``, one name per profile.

    Raises:
        DunetError: when the profiles cannot serve every batch of 1..max_batch_size.
    """
    if not profiles:
        raise DunetError("a TensorRT Triton model needs the engine's optimisation profiles "
                         "(the engine sidecar's 'profiles')")
    ranges = []
    for i, (smallest, _opt, largest) in enumerate(profiles):
        if list(smallest[1:]) != list(chw) or list(largest[1:]) != list(chw):
            raise DunetError(f"engine profile {i} is for inputs {list(smallest)}..{list(largest)}"
                             f", the model's 'slabs' are [N, {', '.join(map(str, chw))}]")
        ranges.append((int(smallest[0]), int(largest[0])))
    covered = 0  # every batch 1..covered is held by some profile
    for lo, hi in sorted(ranges):
        if lo > covered + 1:
            break
        covered = max(covered, hi)
    if covered < max_batch_size:
        shown = ", ".join(f"{lo}..{hi}" for lo, hi in ranges)
        raise DunetError(f"max_batch_size {max_batch_size} is not served by the engine's "
                         f"profiles (batches {shown}): rebuild the engine with a batch range "
                         f"from 1 to at least {max_batch_size}")
    return [str(i) for i in range(len(profiles))]


def triton_config_text(
    info: ArtifactInfo,
    *,
    backend: str,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    instances: int = 1,
    name: str = DEFAULT_MODEL_NAME,
    runtime: Mapping[str, str] | None = None,
    profiles: Sequence[Profile] = (),
) -> str:
    """The ``config.pbtxt`` of a dunet model.

    Args:
        info: the model's self-description (spec -> tensor dims; metadata ->
            ``parameters``).
        backend: ``"onnx"``, ``"trt"`` or ``"python"`` (our runtime on ``model.onnx``).
        max_batch_size: largest batch the server may form (the engine's
            profile maximum for ``trt``).
        preferred_batch_sizes: batch sizes the dynamic batcher aims for.
        max_queue_delay_us: how long the batcher may hold a request.
        instances: model instances per device.
        name: model name (must equal the folder name).
        runtime: for ``"python"``: overrides of :data:`RUNTIME_DEFAULTS`
            (``runtime.backend``, ``runtime.precision``, ``runtime.threads``,
            ``runtime.model_file``), stored as parameters.
        profiles: for ``"trt"`` (required): the engine's optimisation profiles;
            the instance group names them all (:func:`trt_instance_profiles`).

    Returns:
        Protobuf text of a ``inference.ModelConfig``; input ``slabs``
        ``TYPE_FP32 [C, S, S]``, output ``prob`` ``TYPE_FP32 [1, S, S]``.

    Raises:
        DunetError: an unknown backend, a bad batch size, profiles that cannot
            serve ``max_batch_size``.
    """
    if backend not in PLATFORMS:
        raise DunetError(f"unknown Triton backend {backend!r}; use one of {sorted(PLATFORMS)}")
    if max_batch_size < 1:
        raise DunetError(f"Triton max_batch_size must be >= 1, got {max_batch_size}")
    platform, filename, kind = PLATFORMS[backend]
    spec = info.spec
    s = spec.image_size
    group_profiles = (trt_instance_profiles(profiles, max_batch_size, (spec.in_channels, s, s))
                      if backend == "trt" else [])
    preferred = sorted({int(b) for b in preferred_batch_sizes if 1 <= int(b) <= max_batch_size})
    params = dict(info.to_metadata())
    if backend == "python":
        unknown = set(runtime or {}) - set(RUNTIME_DEFAULTS)
        if unknown:
            raise DunetError(f"unknown runtime parameter(s) {sorted(unknown)}")
        params.update({**RUNTIME_DEFAULTS, **(runtime or {})})
        head = ['backend: "python"']
    else:
        head = [f"platform: {_quote(platform)}", f"default_model_filename: {_quote(filename)}"]
    lines = [
        f"# Written by dunet-export {__version__}: {info.model_name} ({info.precision}), "
        f"spec digest {spec.digest()}.",
        f"name: {_quote(name)}",
        *head,
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        "  {",
        f"    name: {_quote(INPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_dims((spec.in_channels, s, s))}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quote(OUTPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_dims((1, s, s))}",
        "  }",
        "]",
        "dynamic_batching {",
    ]
    if preferred:
        lines.append(f"  preferred_batch_size: {_dims(preferred)}")
    lines += [
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {int(instances)}",
        f"    kind: {kind}",
        *([f"    profile: [ {', '.join(_quote(p) for p in group_profiles)} ]"]
          if group_profiles else []),
        "  }",
        "]",
    ]
    return "\n".join(lines + _parameters(params)) + "\n"


def _parameters(params: Mapping[str, str]) -> list[str]:
    lines = []
    for key, value in sorted(params.items()):
        lines += [
            "parameters {",
            f"  key: {_quote(key)}",
            f"  value: {{ string_value: {_quote(value)} }}",
            "}",
        ]
    return lines


def write_triton_repo(
    root: str | os.PathLike[str],
    model_file: str | os.PathLike[str] | None,
    info: ArtifactInfo,
    *,
    backend: str,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    instances: int = 1,
    name: str = DEFAULT_MODEL_NAME,
    runtime: Mapping[str, str] | None = None,
    profiles: Sequence[Profile] | None = None,
) -> Path:
    """Write ``ROOT/NAME/config.pbtxt`` and copy ``model_file`` into ``ROOT/NAME/1/``.

    Args:
        root: the repository folder (created if needed).
        model_file: the ``.onnx`` (``backend="onnx"`` or ``"python"``, which
            also gets a ``model.py``) or ``.plan`` (``"trt"``); ``None`` with
            ``"python"`` when ``runtime["runtime.model_file"]`` names an absolute
            path to use in place (``dunet-serve --engine``).
        info: see :func:`triton_config_text` (the rest of the arguments too).
        profiles: for ``"trt"``: the engine's profiles; by default those of the
            sidecar beside ``model_file``.

    Returns:
        The model folder ``ROOT/NAME``.
    """
    if backend == "trt" and profiles is None and model_file is not None:
        profiles = EngineSidecar.from_info(read_artifact_info(model_file), str(model_file)).profiles
    text = triton_config_text(
        info,
        backend=backend,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        name=name,
        runtime=runtime,
        profiles=profiles or (),
    )
    model_dir = Path(root) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if model_file is not None:
        shutil.copyfile(model_file, version_dir / PLATFORMS[backend][1])
        _copy_template(Path(model_file), info, version_dir)
    elif backend != "python" or not Path(dict(runtime or {}).get("runtime.model_file",
                                                                  "")).is_absolute():
        raise ValueError("model_file=None needs backend 'python' and an absolute "
                         "runtime.model_file")
    if backend == "python":
        _write_model_py(version_dir, "network_model",
                        "Triton python-backend model: slabs -> probabilities via our runtime.")
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


def _copy_template(model_file: Path, info: ArtifactInfo, version_dir: Path) -> None:
    """The registration template beside the model goes beside its copy (``dunet_volume`` reads it).

    Raises:
        DunetError: when the model records a template that is not beside it.
    """
    if not info.template:
        return
    name = str(info.template.get("file", "template.nii.gz"))
    source = model_file.parent / name
    if not source.is_file():
        raise DunetError(f"{model_file}: its registration template {name} is missing beside it")
    shutil.copyfile(source, version_dir / name)


def _write_model_py(version_dir: Path, module: str, doc: str) -> None:
    text = _MODEL_PY.format(doc=doc, version=__version__, module=module)
    (version_dir / "model.py").write_text(text, encoding="utf-8")


def volume_config_text(
    info: ArtifactInfo,
    *,
    network: str = DEFAULT_MODEL_NAME,
    batch_size: int = 16,
    instances: int = 2,
    limits: NiftiLimits = DEFAULT_LIMITS,
    name: str = VOLUME_MODEL_NAME,
) -> str:
    """The ``config.pbtxt`` of ``dunet_volume`` (:mod:`dunet_deploy.serving.volume_model`).

    Args:
        info: the network model's description (its spec preprocesses requests).
        network: the network model called through BLS.
        batch_size: slabs per BLS call (at most the network's ``max_batch_size``).
        instances: model instances (requests handled at once).
        limits: what one request may cost (bytes sent, voxels, voxel bytes).
        name: model name (must equal the folder name).

    Returns:
        Protobuf text: input ``nifti`` ``TYPE_STRING [1]``, outputs ``mask``
        and ``summary`` ``TYPE_STRING [1]``, no batching, parameters
        ``dunet.*`` (the network's metadata, checked at load) and ``volume.*``.
    """
    if batch_size < 1 or instances < 1:
        raise DunetError(f"dunet_volume batch size and instances must be >= 1, got "
                         f"{batch_size} and {instances}")
    params = {
        **info.to_metadata(),
        "volume.network_model": network,
        "volume.batch_size": str(int(batch_size)),
        "volume.max_request_bytes": str(limits.max_file_bytes),
        "volume.max_voxels": str(limits.max_voxels),
        "volume.max_voxel_bytes": str(limits.max_voxel_bytes),
    }
    lines = [
        f"# Written by dunet-export {__version__}: NIfTI bytes -> mask bytes through "
        f"{network!r} ({info.model_name}), spec digest {info.spec.digest()}.",
        f"name: {_quote(name)}",
        'backend: "python"',
        "max_batch_size: 0",
        "input [",
        '  { name: "nifti" data_type: TYPE_STRING dims: [ 1 ] }',
        "]",
        "output [",
        '  { name: "mask" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "summary" data_type: TYPE_STRING dims: [ 1 ] }',
        "]",
        "instance_group [",
        f"  {{ count: {int(instances)} kind: KIND_CPU }}",
        "]",
    ]
    return "\n".join(lines + _parameters(params)) + "\n"


def write_volume_model(root: str | os.PathLike[str], info: ArtifactInfo, **options: object) -> Path:
    """Write ``ROOT/dunet_volume/`` (``config.pbtxt`` and ``1/model.py``).

    Args:
        root: the repository folder holding the network model.
        info: the network model's description.
        **options: see :func:`volume_config_text`.

    Returns:
        The model folder.
    """
    text = volume_config_text(info, **options)  # type: ignore[arg-type]
    model_dir = Path(root) / str(options.get("name", VOLUME_MODEL_NAME))
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    _write_model_py(model_dir / "1", "volume_model",
                    "Triton python-backend model: NIfTI bytes -> lesion mask bytes + summary.")
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


def write_spec_model(root: str | os.PathLike[str], info: ArtifactInfo, name: str) -> Path:
    """Write ``ROOT/NAME/`` (python backend): returns ``info`` as JSON (``dunet-serve --engine``).

    Input ``request`` ``TYPE_INT32 [1]``, output ``info`` ``TYPE_STRING [1]``, no batching;
    see :mod:`dunet_deploy.serving.spec_model`.

    Returns:
        The model folder.
    """
    lines = [
        f"# Written by dunet-serve {__version__}: the description of {info.model_name}.",
        f"name: {_quote(name)}",
        'backend: "python"',
        "max_batch_size: 0",
        'input [ { name: "request" data_type: TYPE_INT32 dims: [ 1 ] } ]',
        'output [ { name: "info" data_type: TYPE_STRING dims: [ 1 ] } ]',
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
    ]
    model_dir = Path(root) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    _write_model_py(model_dir / "1", "spec_model", "Triton python-backend model: the model's "
                    "description as JSON.")
    text = "\n".join(lines + _parameters(info.to_metadata())) + "\n"
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir


_PARAM = re.compile(
    r'parameters\s*[:]?\s*\{\s*key\s*:\s*"((?:[^"\\]|\\.)*)"\s*value\s*:?\s*\{\s*'
    r'string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}\s*\}'
)
_UNESCAPE = {"n": "\n", "t": "\t", "r": "\r"}


def _unquote(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m[1], m[1]), text)


def read_config(path: str | os.PathLike[str]) -> tuple[dict[str, str], int]:
    """The string parameters and ``max_batch_size`` of a ``config.pbtxt`` we wrote.

    Args:
        path: the model's ``config.pbtxt``.

    Returns:
        (parameters, max_batch_size; 0 when not set).

    Raises:
        DunetError: when the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DunetError(f"{path}: cannot read the model configuration ({exc.strerror})") from None
    params = {_unquote(k): _unquote(v) for k, v in _PARAM.findall(text)}
    found = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", text, re.MULTILINE)
    return params, int(found[1]) if found else 0
