"""The backend-neutral runner interface and the :func:`open_runner` factory.

A :class:`Runner` wraps one loaded model (ONNX Runtime session, OpenVINO
compiled model or TensorRT engine) behind one call::

    with open_runner("model.onnx") as runner:
        probs = runner.infer(slabs)        # float32 [N, C, S, S] -> [N, 1, S, S]

Backends are imported lazily: importing this module (or ``dunet-infer
--help``) needs none of onnxruntime, openvino or tensorrt, and nothing in
:mod:`dunet_deploy.runtime` ever imports torch.

Backend choice for ``backend="auto"``:

* ``.plan`` / ``.engine`` -> ``tensorrt`` (a serialised engine runs nowhere else);
* ``.onnx`` -> ``openvino`` when it is installed, else ``onnxruntime``.
  OpenVINO reads the ONNX directly and, on CPUs with native BF16
  (AVX512-BF16 / AMX), runs it in bf16: that is our fastest CPU path. On other
  CPUs it runs fp32, which is on par with ONNX Runtime.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo, read_artifact_info
from dunet_deploy.choices import BACKENDS, DEVICES, PRECISIONS, check_choice
from dunet_deploy.errors import DunetError, one_line
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "BACKENDS",
    "DEVICES",
    "PRECISIONS",
    "Runner",
    "backend_for",
    "one_line",
    "open_runner",
]


ENGINE_SUFFIXES = (".plan", ".engine")

# backend name -> (module, class, pip hint); imported only when asked for.
_BACKEND_IMPL: dict[str, tuple[str, str, str]] = {
    "onnxruntime": (
        "dunet_deploy.runtime.ort",
        "OnnxRuntimeRunner",
        "pip install 'dunet-deploy[cpu]' (or onnxruntime-gpu)",
    ),
    "openvino": (
        "dunet_deploy.runtime.openvino_runner",
        "OpenVINORunner",
        "pip install 'dunet-deploy[openvino]'",
    ),
    "tensorrt": (
        "dunet_deploy.runtime.tensorrt_runner",
        "TensorRTRunner",
        "pip install 'dunet-deploy[gpu]'",
    ),
}
# Checked up front for a uniform "not installed" message; the TensorRT runner
# itself tells apart a missing TensorRT, missing CUDA bindings and a missing GPU.
_BACKEND_MODULE = {"onnxruntime": "onnxruntime", "openvino": "openvino"}


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    if module in sys.modules:  # already imported (or blocked with None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_C = TypeVar("_C", bound="Closeable")


class Closeable(abc.ABC):
    """Something that holds resources until :meth:`close`; a context manager that closes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the resources."""

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Runner(Closeable):
    """One loaded model that maps slabs to probabilities.

    Subclasses implement :meth:`_run` for one batch of at most
    :attr:`max_batch` slabs; :meth:`infer` validates the input, splits it into
    such batches and times the call. A runner is not thread-safe (it reuses
    one request / buffers); use one per thread.

    Attributes:
        backend: Backend name (``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``).
        model_path: The model file.
        info: The model's self-description (spec, model name, precision...).
        last_infer_s: Wall time of the last :meth:`infer` call in seconds.
    """

    backend: ClassVar[str] = ""

    def __init__(self, model_path: str | Path, info: ArtifactInfo) -> None:
        self.model_path = Path(model_path)
        self.info = info
        self.last_infer_s = 0.0
        self._closed = False

    # ----------------------------------------------------------- metadata
    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing spec the model was trained with."""
        return self.info.spec

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int | None, int, int, int]:
        """Model input shape ``(N, C, S, S)``; ``N`` is ``None`` when dynamic."""

    @property
    def max_batch(self) -> int | None:
        """Largest batch one backend call takes; ``None`` when unlimited."""
        return None

    @property
    @abc.abstractmethod
    def precision(self) -> str:
        """Precision the backend actually computes in (``fp32``, ``bf16``, ``fp16``)."""

    @property
    def device(self) -> str:
        """Where the model runs, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``."""
        return "cpu"

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for logs and ``summary.json``."""
        return {
            "path": str(self.model_path),
            "model_name": self.info.model_name,
            "model_precision": self.info.precision,
            "spec_digest": self.spec.digest(),
            "backend": self.backend,
            "precision": self.precision,
            "device": self.device,
            "input_shape": list(self.input_shape),
            "max_batch": self.max_batch,
        }

    # ---------------------------------------------------------- inference
    def infer(self, slabs: npt.ArrayLike) -> np.ndarray:
        """Run the model on a stack of slabs.

        Usable directly as a ``predict(slabs) -> probs`` callable.

        Args:
            slabs: float ``[N, C, S, S]`` with ``C = spec.in_channels`` and
                ``S = spec.image_size``; any ``N >= 0`` (split into batches of
                at most :attr:`max_batch`).

        Returns:
            float32 ``[N, 1, S, S]`` probabilities.

        Raises:
            DunetError: when the runner is closed or ``slabs`` has the wrong shape.
        """
        if self._closed:
            raise DunetError(f"{self.model_path}: runner is closed")
        x = np.ascontiguousarray(slabs, dtype=np.float32)
        _, c, h, w = self.input_shape
        if x.ndim != 4 or x.shape[1:] != (c, h, w):
            raise DunetError(
                f"{self.model_path}: slabs must be [N, {c}, {h}, {w}], got shape {x.shape}"
            )
        t0 = time.perf_counter()
        n = x.shape[0]
        if n == 0:
            out = np.zeros((0, 1, h, w), dtype=np.float32)
        else:
            step = n if self.max_batch is None else self.max_batch
            parts = [self._run(x[i : i + step]) for i in range(0, n, step)]
            out = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out = np.asarray(out, dtype=np.float32).reshape(n, 1, h, w)
        self.last_infer_s = time.perf_counter() - t0
        return out

    __call__ = infer

    @abc.abstractmethod
    def _run(self, slabs: np.ndarray) -> np.ndarray:
        """Run one batch.

        Args:
            slabs: C-contiguous float32 ``[n, C, S, S]``, ``1 <= n <= max_batch``.

        Returns:
            ``[n, 1, S, S]`` probabilities (any float dtype); must not alias a
            buffer the runner reuses.
        """

    # ---------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the backend's resources; further :meth:`infer` calls fail."""
        self._closed = True

    # ------------------------------------------------------------ helpers
    def _check_io(
        self, inputs: Sequence[str], outputs: Sequence[str], shape: Sequence[int | None]
    ) -> None:
        """The checks every backend makes on a loaded graph, in one place.

        Args:
            inputs: the graph's input names (exactly ``[INPUT_NAME]`` is accepted).
            outputs: its output names (``OUTPUT_NAME`` must be among them).
            shape: the input's shape, ``None`` for a dynamic dimension.

        Raises:
            DunetError: on other names, a rank other than 4, or a slab shape
                that disagrees with the model's own preprocessing spec.
        """
        if list(inputs) != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise DunetError(
                f"{self.model_path}: graph must have one input '{INPUT_NAME}' and an output "
                f"'{OUTPUT_NAME}', has {sorted(inputs)} -> {sorted(outputs)}"
            )
        if len(shape) != 4:
            raise DunetError(
                f"{self.model_path}: input '{INPUT_NAME}' must be 4D, got {list(shape)}"
            )
        want = (self.spec.in_channels, self.spec.image_size, self.spec.image_size)
        if tuple(shape[1:]) != want:
            raise DunetError(
                f"{self.model_path}: graph input '{INPUT_NAME}' has shape {list(shape)} but its "
                f"preprocessing spec needs [N, {want[0]}, {want[1]}, {want[2]}]"
            )


def fixed_precision(model_path: Path, backend: str, requested: str, model_precision: str) -> str:
    """Resolve ``requested`` for backends whose precision is baked into the model.

    ONNX Runtime runs the graph as exported and a TensorRT engine as built, so
    only ``auto`` or the model's own precision can be honoured.

    Returns:
        The model's precision.

    Raises:
        DunetError: when another precision is requested.
    """
    if requested not in ("auto", model_precision):
        raise DunetError(
            f"precision {requested!r}: not possible, {backend} runs {model_path} in its "
            f"exported precision {model_precision} (use auto or {model_precision}, or "
            f"export/build the model in {requested})", option="precision"
        )
    return model_precision


def backend_for(model_path: str | Path, backend: str = "auto") -> str:
    """Resolve ``backend="auto"`` from the model's file name and what is installed.

    Args:
        model_path: ``.onnx``, ``.plan`` or ``.engine`` file.
        backend: ``"auto"`` or one of :data:`BACKENDS`.

    Returns:
        A backend name from :data:`BACKENDS`.

    Raises:
        DunetError: for an unknown backend, suffix, or a combination that cannot work.
    """
    path = Path(model_path)
    suffix = path.suffix.lower()
    if backend != "auto":
        check_choice("backend", backend, ("auto", *BACKENDS))
        if backend == "tensorrt" and suffix == ".onnx":
            raise DunetError(
                f"backend 'tensorrt': runs built engines (.plan), not {path}; build one with "
                "dunet-export, or use backend 'onnxruntime' with device 'tensorrt'",
                option="backend")
        if backend != "tensorrt" and suffix in ENGINE_SUFFIXES:
            raise DunetError(f"backend {backend!r}: {path} is a TensorRT engine, which only "
                             "backend 'tensorrt' runs", option="backend")
        return backend
    if suffix in ENGINE_SUFFIXES:
        return "tensorrt"
    if suffix == ".onnx":
        # OpenVINO first: with bf16 it is the fastest CPU path we have.
        if is_installed("openvino"):
            return "openvino"
        if is_installed("onnxruntime"):
            return "onnxruntime"
        raise DunetError(
            f"{path}: no ONNX backend installed; pip install 'dunet-deploy[openvino]' or "
            "'dunet-deploy[cpu]'"
        )
    raise DunetError(
        f"{path}: cannot choose a backend for suffix {suffix or '(none)'!r}; expected .onnx, "
        ".plan or .engine, or give the backend"
    )


def _runner_class(backend: str) -> Callable[..., Runner]:
    module_name, class_name, hint = _BACKEND_IMPL[backend]
    needed = _BACKEND_MODULE.get(backend)
    if needed is not None and not is_installed(needed):
        raise DunetError(f"backend {backend!r} is not installed: {hint}")
    module = importlib.import_module(module_name)
    cls: Callable[..., Runner] = getattr(module, class_name)
    return cls


def open_runner(
    model_path: str | Path,
    backend: str = "auto",
    *,
    info: ArtifactInfo | None = None,
    **opts: Any,
) -> Runner:
    """Load a model with the right backend.

    Args:
        model_path: ``.onnx`` (ONNX Runtime / OpenVINO) or ``.plan`` / ``.engine``
            with its ``.json`` sidecar (TensorRT).
        backend: ``"auto"`` or one of :data:`BACKENDS`; see the module docstring.
        info: The model's :class:`ArtifactInfo` when already read (saves a parse).
        **opts: Backend options: ``threads`` (int or None), ``precision`` (one
            of :data:`PRECISIONS`), ``device`` (one of :data:`DEVICES`); the
            TensorRT backend also takes ``cuda_graph`` (bool) and ``memory`` (a
            ``CudaMemory``), ONNX Runtime takes ``cuda_graph`` (CUDA provider).

    Returns:
        An open :class:`Runner` (use it as a context manager).

    Raises:
        DunetError: one line naming the model and what is wrong (missing file,
            no dunet-deploy metadata, backend not installed, no GPU, ...).
    """
    path = Path(model_path)
    name = backend_for(path, backend)
    if not path.is_file():
        raise DunetError(f"{path}: model file not found")
    check_choice("precision", opts.get("precision", "auto"), PRECISIONS)
    check_choice("device", opts.get("device", "auto"), DEVICES)
    threads = opts.get("threads")
    if threads is not None and int(threads) < 1:
        raise DunetError(f"threads {threads}: must be >= 1", option="threads")
    if opts.get("cuda_graph") and name == "openvino":
        raise DunetError(f"cuda_graph: CUDA graphs need a CUDA backend (backend 'tensorrt', "
                         f"or 'onnxruntime' with device 'cuda'); openvino runs {path} on the "
                         "CPU", option="cuda_graph")
    if not opts.get("cuda_graph", True):
        opts.pop("cuda_graph")
    if info is None:
        info = read_artifact_info(path)
    cls = _runner_class(name)
    return cls(path, info, **opts)
