"""OpenVINO backend: the ONNX file compiled for the CPU, bf16 where the CPU has it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.executed import Executed, int8_float_request, openvino_executed
from dunet_deploy.runtime.loaders import import_backend, openvino_compile, openvino_read

__all__ = ["OpenVINORunner", "choose_precision_hint"]

# Our precision names -> OpenVINO element type names, and back.
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_NAMES = {v: k for k, v in _HINTS.items()}
# OPTIMIZATION_CAPABILITIES entry that says the CPU computes a precision natively.
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}


def choose_precision_hint(
    requested: str, capabilities: Sequence[str], cpu_name: str = "CPU"
) -> str:
    """Map a precision request to an ``INFERENCE_PRECISION_HINT`` value.

    ``auto`` is bf16 on CPUs that report ``BF16`` in
    ``OPTIMIZATION_CAPABILITIES`` (AVX512-BF16 or AMX), fp32 elsewhere. An
    explicit ``bf16`` / ``fp16`` on a CPU without it is refused, because
    OpenVINO would silently compute in fp32 instead.

    Args:
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        capabilities: ``core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")``.
        cpu_name: For the error message.

    Returns:
        ``"f32"``, ``"bf16"`` or ``"f16"``.

    Raises:
        DunetError: when the CPU cannot compute the requested precision.
    """
    caps = {str(c).upper() for c in capabilities}
    if requested == "auto":
        return "bf16" if "BF16" in caps else "f32"
    if requested not in _HINTS:
        raise DunetError(f"openvino: unknown precision {requested!r}")
    needed = _CAPABILITY.get(requested)
    if needed is not None and needed not in caps:
        raise DunetError(
            f"precision {requested!r}: openvino on {cpu_name} has no native {requested} "
            f"(OPTIMIZATION_CAPABILITIES: {', '.join(sorted(caps)) or 'none'}); use precision "
            "fp32 or auto", option="precision"
        )
    return _HINTS[requested]


class OpenVINORunner(Runner):
    """A model compiled by OpenVINO for the CPU, with one reused infer request.

    The ONNX is read directly (no IR conversion step). Its input is reshaped
    to ``[?, C, S, S]`` so any batch size runs without recompiling. The
    latency performance hint gives one stream using all ``threads``.

    Args:
        model_path: The ``.onnx`` file.
        info: Its :class:`ArtifactInfo`.
        threads: ``INFERENCE_NUM_THREADS``; ``None`` lets OpenVINO use all cores.
        precision: ``auto`` (bf16 if the CPU has it, else fp32), ``fp32``,
            ``bf16`` or ``fp16``.
        device: ``auto`` or ``cpu``.

    Raises:
        DunetError: when openvino is missing, the precision is not native on
            this CPU, or the model cannot be read or compiled.
    """

    backend = "openvino"

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
        if device not in ("auto", "cpu"):
            raise DunetError(f"openvino: only the CPU is supported, not --device {device}")
        ov = import_backend("openvino")
        core = ov.Core()
        self._cpu_name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
        caps = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        float_request = int8_float_request(self.model_path, precision, info.precision)
        hint = choose_precision_hint(float_request, caps, self._cpu_name)
        model = openvino_read(core, self.model_path)
        # A tensor may carry several names; the one we look for counts.
        inputs = [INPUT_NAME if INPUT_NAME in p.get_names() else p.get_any_name()
                  for p in model.inputs]
        outputs = [OUTPUT_NAME if OUTPUT_NAME in o.get_names() else o.get_any_name()
                   for o in model.outputs]
        pshape = model.input(0).get_partial_shape()
        graph: tuple[int | None, ...] = ()
        if not pshape.rank.is_dynamic:
            graph = tuple(None if d.is_dynamic else d.get_length() for d in pshape)
        self._check_io(inputs, outputs, graph)
        c, s = self.spec.in_channels, self.spec.image_size
        if not (pshape[0].is_dynamic and graph[1:] == (c, s, s)):
            # Dynamic batch, static slab: any N runs without recompiling.
            model.reshape({INPUT_NAME: ov.PartialShape([-1, c, s, s])})
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self._compiled = openvino_compile(core, model, "CPU", config, self.model_path)
        actual = self._compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self._precision = _NAMES.get(actual, actual)
        self._executed: Executed | None = None
        if info.precision == "int8":  # what the compiled graph runs, not the label
            self._executed = openvino_executed(self._compiled, self._precision)
            self._precision = self._executed.precision
        self._threads = int(self._compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self._compiled.create_infer_request()
        self._out_index = next(
            i for i, o in enumerate(self._compiled.outputs) if OUTPUT_NAME in o.get_names()
        )
        self._c, self._s = c, s
        self.version = ov.get_version()

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        return (None, self._c, self._s, self._s)

    @property
    def precision(self) -> str:
        return self._precision

    @property
    def device(self) -> str:
        return f"cpu ({self._cpu_name})"

    def describe(self) -> dict[str, Any]:
        executed = {"executed": self._executed.to_dict()} if self._executed else {}
        return {**super().describe(), "threads": self._threads, "openvino": self.version,
                **executed}

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        # share_inputs: no copy of the (contiguous float32) slabs into OpenVINO.
        self._request.infer({0: slabs}, share_inputs=True)
        # The output tensor is reused by the next call: hand out a copy.
        return np.array(self._request.get_output_tensor(self._out_index).data, copy=True)

    def close(self) -> None:
        self._request = None
        self._compiled = None
        super().close()
