"""ONNX Runtime's TensorRT execution provider, faked on the CPU build of ONNX Runtime.

The real provider needs onnxruntime-gpu, TensorRT and a GPU. This stand-in
keeps everything the runner sees real (the session options it builds, the
ONNX model, the CPU session that computes the outputs) and fakes only what the
provider decides, failing the ways ONNX Runtime fails with it:

* ``optimized_model_filepath`` with TensorRT-compiled nodes: session creation
  raises ``Fail`` ("Unable to serialize model as it contains compiled nodes");
* a Q/DQ model without ``trt_int8_enable``: TensorRT cannot build the engine
  (``EPFail``, "int8 is not configured in the builder");
* ``get_provider_graph_assignment_info`` without
  ``session.record_ep_graph_assignment_info=1``: ``Fail``;
* an ORT without that method (``assignment_api=False``, older releases).

Device ``OrtValue``s and IOBinding are host arrays, so the runner's GPU path
(IOBinding on, as for any GPU provider) runs too.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as state

TRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
ASSIGNMENT = "session.record_ep_graph_assignment_info"
REAL_SESSION = ort.InferenceSession


class FakeOrtValue:
    """A "device" tensor backed by a host array."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    @staticmethod
    def ortvalue_from_shape_and_type(shape: Iterable[int], dtype: Any, device: str,
                                     index: int) -> FakeOrtValue:
        assert device == "cuda" and index == 0, (device, index)
        return FakeOrtValue(np.zeros(tuple(shape), dtype))

    def update_inplace(self, x: np.ndarray) -> None:
        assert x.shape == self.array.shape and x.dtype == self.array.dtype
        self.array[...] = x

    def numpy(self) -> np.ndarray:
        return self.array.copy()


class FakeBinding:
    def __init__(self) -> None:
        self.inputs: dict[str, FakeOrtValue] = {}
        self.outputs: dict[str, FakeOrtValue] = {}

    def bind_ortvalue_input(self, name: str, value: FakeOrtValue) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name: str, value: FakeOrtValue) -> None:
        self.outputs[name] = value


def _options(entry: Any) -> tuple[str, dict[str, str]]:
    return (entry, {}) if isinstance(entry, str) else (entry[0], dict(entry[1]))


def _config(so: Any, key: str) -> str | None:
    try:
        return str(so.get_session_config_entry(key))
    except RuntimeError:  # ORT raises for a key never set
        return None


class FakeTensorrtSession:
    """A session whose nodes TensorRT takes, except those named in ``refused``."""

    def __init__(self, src: Any, so: Any, providers: list[Any], refused: set[str]) -> None:
        self.provider_options = dict(_options(p) for p in providers)
        self.model = onnx.load_from_string(src) if isinstance(src, bytes) else onnx.load(src)
        graph = self.model.graph
        if so is not None and so.optimized_model_filepath:
            raise state.Fail(
                "[ONNXRuntimeError] : 1 : FAIL : Unable to serialize model as it contains "
                "compiled nodes. Please disable any execution providers which generate compiled "
                "nodes.")
        trt = self.provider_options[TRT_EP]
        qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)
        if qdq and trt.get("trt_int8_enable") != "1":
            raise state.EPFail(
                "[ONNXRuntimeError] : 11 : EP_FAIL : TensorRT EP could not build engine for "
                "fused node: TensorrtExecutionProvider_TRTKernel_graph_main_0_0 (Int8 precision "
                "has been set for a layer or layer output, but int8 is not configured in the "
                "builder)")
        self.record = so is not None and _config(so, ASSIGNMENT) == "1"
        self.refused = refused
        self.cpu = REAL_SESSION(src, providers=[CPU_EP])

    def get_providers(self) -> list[str]:
        return [TRT_EP, CUDA_EP, CPU_EP]

    def get_inputs(self) -> Any:
        return self.cpu.get_inputs()

    def get_outputs(self) -> Any:
        return self.cpu.get_outputs()

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
        return self.cpu.run(names, feed)

    def io_binding(self) -> FakeBinding:
        return FakeBinding()

    def run_with_iobinding(self, binding: FakeBinding, run_options: Any) -> None:
        feed = {k: v.array for k, v in binding.inputs.items()}
        outs = self.cpu.run(list(binding.outputs), feed)
        for value, out in zip(binding.outputs.values(), outs, strict=True):
            value.array[...] = out

    def _assignment(self) -> list[Any]:
        """Runs of consecutive nodes on the same provider, as ORT partitions them."""
        subgraphs: list[tuple[str, list[Any]]] = []
        for node in self.model.graph.node:
            ep = CPU_EP if node.name in self.refused else TRT_EP
            if not subgraphs or subgraphs[-1][0] != ep:
                subgraphs.append((ep, []))
            subgraphs[-1][1].append(types.SimpleNamespace(
                op_type=node.op_type, name=node.name, domain=node.domain))
        return [types.SimpleNamespace(ep_name=ep, get_nodes=lambda nodes=nodes: list(nodes))
                for ep, nodes in subgraphs]


class AssigningSession(FakeTensorrtSession):
    """ORT >= 1.2x: the session can say which provider took which node."""

    def get_provider_graph_assignment_info(self) -> list[Any]:
        if not self.record:
            raise state.Fail(
                f"[ONNXRuntimeError] : 1 : FAIL : Session configuration entry '{ASSIGNMENT}' "
                'must be set to "1" to retrieve EP graph assignment information.')
        return self._assignment()


def install(monkeypatch: Any, *, refused: Iterable[str] = (), assignment_api: bool = True,
            ) -> list[FakeTensorrtSession]:
    """Patch ``onnxruntime`` so that sessions with the TensorRT provider are fakes.

    Sessions without it stay real (a CPU session, or the optimised-graph one).

    Returns:
        The fake sessions made, in order (to inspect their provider options).
    """
    made: list[FakeTensorrtSession] = []
    cls = AssigningSession if assignment_api else FakeTensorrtSession

    def session(src: Any, sess_options: Any = None, providers: Any = None,
                **kw: Any) -> Any:
        names = [_options(p)[0] for p in providers or []]
        if TRT_EP not in names:
            return REAL_SESSION(src, sess_options=sess_options, providers=providers, **kw)
        made.append(cls(src, sess_options, list(providers), set(refused)))
        return made[-1]

    available: Callable[[], list[str]] = lambda: [TRT_EP, CUDA_EP, CPU_EP]  # noqa: E731
    monkeypatch.setattr(ort, "InferenceSession", session)
    monkeypatch.setattr(ort, "get_available_providers", available)
    monkeypatch.setattr(ort, "OrtValue", FakeOrtValue)
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: None, raising=False)
    return made
