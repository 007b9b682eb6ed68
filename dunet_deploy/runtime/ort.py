"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner, fixed_precision, one_line
from dunet_deploy.runtime.executed import Executed, onnxruntime_executed

__all__ = ["OnnxRuntimeRunner", "pick_providers"]

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def pick_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers for a ``--device`` request, best first, CPU as fallback.

    ``auto`` takes CUDA when the installed ONNX Runtime has it (not the
    TensorRT provider: it builds an engine at every session start; build a
    ``.plan`` with dunet-export instead).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``tensorrt``.
        available: ``onnxruntime.get_available_providers()``.

    Returns:
        The ``providers`` list for ``InferenceSession``.

    Raises:
        DunetError: when the requested provider is not available.
    """
    wanted = {"cpu": [], "cuda": [CUDA_EP], "tensorrt": [TRT_EP, CUDA_EP]}
    if device == "auto":
        return [CUDA_EP, CPU_EP] if CUDA_EP in available else [CPU_EP]
    if device not in wanted:
        raise DunetError(
            f"onnxruntime: unknown device {device!r}; choose auto, cpu, cuda or tensorrt"
        )
    missing = [p for p in wanted[device] if p not in available]
    if missing:
        raise DunetError(
            f"onnxruntime: --device {device} needs {missing[0]}, but this onnxruntime only has "
            f"{', '.join(available)} (install onnxruntime-gpu with CUDA/TensorRT)"
        )
    return [*wanted[device], CPU_EP]


class OnnxRuntimeRunner(Runner):
    """A model run by an ONNX Runtime ``InferenceSession``.

    Full graph optimisation, sequential execution, ``threads`` intra-op
    threads (ONNX Runtime's default, one per physical core, when ``None``).
    The precision is the exported graph's (an fp16 export runs fp16).

    Args:
        model_path: The ``.onnx`` file.
        info: Its :class:`ArtifactInfo`.
        threads: Intra-op threads, ``None`` for the default.
        precision: ``auto`` or the model's own precision.
        device: ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (execution provider).

    Raises:
        DunetError: when onnxruntime is missing, the provider is unavailable,
            or the graph cannot be loaded or does not fit its metadata.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        info: ArtifactInfo,
        *,
        threads: int | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        super().__init__(model_path, info)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise DunetError(f"onnxruntime is not importable ({one_line(exc)})") from None
        self._precision = fixed_precision(self.model_path, self.backend, precision, info.precision)
        providers = pick_providers(device, list(ort.get_available_providers()))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1  # one sequential graph: inter-op threads only idle
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.log_severity_level = 3  # errors only; warnings would clutter the CLI
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=opts, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise DunetError(
                f"{self.model_path}: onnxruntime cannot load the model ({one_line(exc)})"
            ) from None
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if INPUT_NAME not in inputs or OUTPUT_NAME not in outputs:
            raise DunetError(
                f"{self.model_path}: graph must have input '{INPUT_NAME}' and output "
                f"'{OUTPUT_NAME}', has {sorted(inputs)} -> {sorted(outputs)}"
            )
        node = inputs[INPUT_NAME]
        self._in_dtype = _ORT_DTYPES.get(node.type)
        if self._in_dtype is None:
            raise DunetError(f"{self.model_path}: unsupported input type {node.type}")
        dims = list(node.shape)
        if len(dims) != 4:
            raise DunetError(f"{self.model_path}: input '{INPUT_NAME}' must be 4D, got {dims}")
        graph = [d if isinstance(d, int) and d > 0 else None for d in dims]
        self._check_graph_shape(graph)
        self._static_batch: int | None = graph[0]
        self._c, self._s = self.spec.in_channels, self.spec.image_size
        self._providers = self._session.get_providers()
        self.threads = threads
        self._executed: Executed | None = None
        if info.precision == "int8":  # report the kernels that run, not the label
            self._executed = onnxruntime_executed(
                lambda o: ort.InferenceSession(str(self.model_path), o, providers=providers),
                opts, "fp32")
            self._precision = self._executed.precision

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        return (self._static_batch, self._c, self._s, self._s)

    @property
    def max_batch(self) -> int | None:
        return self._static_batch

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> str:
        if TRT_EP in self._providers:
            return "cuda (TensorRT EP)"
        return "cuda" if CUDA_EP in self._providers else "cpu"

    def describe(self) -> dict[str, Any]:
        executed = {"executed": self._executed.to_dict()} if self._executed else {}
        return {**super().describe(), "providers": list(self._providers), "threads": self.threads,
                **executed}

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        x = slabs if self._in_dtype is np.float32 else slabs.astype(self._in_dtype)
        n = x.shape[0]
        if self._static_batch is not None and n < self._static_batch:
            # A static-batch export: pad the last batch, drop the padding after.
            pad = np.zeros((self._static_batch - n, *x.shape[1:]), dtype=x.dtype)
            x = np.concatenate([x, pad])
        out: np.ndarray = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        return out[:n]

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]  # frees the session
        super().close()
