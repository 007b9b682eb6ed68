"""ONNX Runtime backend: CPU, CUDA or TensorRT execution providers.

On a GPU provider the session is run through IOBinding: the input is copied
into a device ``OrtValue`` kept per batch size and the output is bound to
another one, so each call costs one host->device and one device->host copy,
as in the TensorRT runner and the torch bench sessions (plain ``session.run``
with numpy arrays would stage pageable memory on every call). With
``cuda_graph=True`` the CUDA provider captures one CUDA graph per batch size
(``enable_cuda_graph``, a ``gpu_graph_id`` per size) and replays it.

The TensorRT provider gets engine and timing caches (``<model>.trt-ep-cache/``
beside the model) and the batch profile 1..64 (opt 32). ONNX Runtime builds
TensorRT networks weakly typed: with ``trt_fp16_enable`` the FP32 islands of the
mixed-precision policy would not be kept, so an FP16 model is refused there
(a ``.plan`` from ``dunet-export``, strongly typed, is the path that honours
them) and FP16 is never enabled. An int8 (QDQ) model gets ``trt_int8_enable``
(TensorRT builds the Q/DQ layers only with INT8 configured, and needs no
calibration table for them); its executed precision is read from the
runner's own session, which records the provider of each node: ONNX Runtime
cannot write the optimised graph of TensorRT-compiled nodes
(:mod:`dunet_deploy.runtime.executed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner, fixed_precision, one_line
from dunet_deploy.runtime.executed import (
    Executed,
    onnxruntime_executed,
    provider_assignment,
    tensorrt_provider_executed,
)
from dunet_deploy.runtime.loaders import (
    CPU_EP,
    CUDA_EP,
    TRT_EP,
    import_backend,
    ort_errors,
    ort_session,
)

__all__ = ["OnnxRuntimeRunner", "pick_providers", "provider_options"]

#: Batch profile of the TensorRT provider: (min, opt, max).
TRT_EP_PROFILE = (1, 32, 64)

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
            f"device {device!r}: needs {missing[0]}, but this onnxruntime only has "
            f"{', '.join(available)} (install onnxruntime-gpu with CUDA/TensorRT)",
            option="device"
        )
    return [*wanted[device], CPU_EP]


def provider_options(
    providers: list[str], model_path: Path, precision: str, chw: tuple[int, int, int],
    *, cuda_graph: bool = False,
) -> dict[str, dict[str, str]]:
    """Provider options for a session over ``model_path``.

    Args:
        providers: from :func:`pick_providers`.
        model_path: the ``.onnx`` (the TensorRT provider's caches go beside it).
        precision: the model's precision (``fp16`` is refused on the TensorRT provider).
        chw: ``(C, S, S)`` of the input, for the TensorRT provider's profile.
        cuda_graph: capture CUDA graphs on the CUDA provider.

    Returns:
        ``{provider: {option: value}}`` (values as strings, ONNX Runtime's form).

    Raises:
        DunetError: for an fp16 model on the TensorRT provider.
    """
    out: dict[str, dict[str, str]] = {}
    if TRT_EP in providers:
        cache = model_path.with_name(model_path.name + ".trt-ep-cache")
        dims = "x".join(str(d) for d in chw)
        lo, opt, hi = TRT_EP_PROFILE
        if precision == "fp16":
            # trt_fp16_enable builds weakly typed: TensorRT may then run the FP32 islands
            # of the mixed-precision graph (SE branch, head) in fp16, against docs/fp16.md.
            raise DunetError(
                f"{model_path}: ONNX Runtime's TensorRT provider cannot run an fp16 model as "
                "typed (its trt_fp16_enable lets TensorRT put the FP32 SE branch and head in "
                "fp16); build the strongly typed engine (dunet-export --format trt) and run "
                "that engine (model.plan), or use device 'cuda'"
            )
        out[TRT_EP] = {
            "trt_fp16_enable": "0",
            # Q/DQ layers build only with INT8 configured (explicit quantization: no
            # calibration table, the model's scales are used).
            "trt_int8_enable": "1" if precision == "int8" else "0",
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": f"{INPUT_NAME}:{lo}x{dims}",
            "trt_profile_opt_shapes": f"{INPUT_NAME}:{opt}x{dims}",
            "trt_profile_max_shapes": f"{INPUT_NAME}:{hi}x{dims}",
        }
    if CUDA_EP in providers and cuda_graph:
        out[CUDA_EP] = {"enable_cuda_graph": "1"}
    return out


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
        cuda_graph: CUDA graphs on the CUDA provider (``device="cuda"``).
        io_binding: Run through IOBinding (default: on a GPU provider only).

    Raises:
        DunetError: when onnxruntime is missing, the provider is unavailable or
            does not load, or the graph cannot be loaded or does not fit its metadata.
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
        cuda_graph: bool = False,
        io_binding: bool | None = None,
    ) -> None:
        super().__init__(model_path, info)
        ort = import_backend("onnxruntime")
        self._precision = fixed_precision(self.model_path, self.backend, precision, info.precision)
        providers = pick_providers(device, list(ort.get_available_providers()))
        if cuda_graph and CUDA_EP not in providers:
            raise DunetError(f"cuda_graph: needs ONNX Runtime's CUDA provider (device "
                             f"'cuda'), not used for {self.model_path}", option="cuda_graph")
        self._c, self._s = self.spec.in_channels, self.spec.image_size
        options = provider_options(providers, self.model_path, info.precision,
                                   (self._c, self._s, self._s), cuda_graph=cuda_graph)
        on_trt = TRT_EP in providers and info.precision == "int8"
        # "auto" may fall back to the CPU (reported by .device); an explicit device may not.
        self._session = ort_session(self.model_path, providers, provider_options=options,
                                    threads=threads, require_providers=device != "auto",
                                    record_assignment=on_trt)
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = [o.name for o in self._session.get_outputs()]
        node = inputs.get(INPUT_NAME)
        dims = list(node.shape) if node is not None else []
        graph = [d if isinstance(d, int) and d > 0 else None for d in dims]
        self._check_io(list(inputs), outputs, graph)
        assert node is not None  # checked above
        self._in_dtype = _ORT_DTYPES.get(node.type)
        if self._in_dtype is None:
            raise DunetError(f"{self.model_path}: unsupported input type {node.type}")
        self._static_batch: int | None = graph[0]
        self._providers = self._session.get_providers()
        self.threads = threads
        self._errors = ort_errors()
        gpu = CUDA_EP in self._providers or TRT_EP in self._providers
        use_binding = gpu if io_binding is None else io_binding
        self._binding_device = ("cuda" if gpu else "cpu") if use_binding else None
        self._cuda_graph = cuda_graph
        self._bound: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._ort = ort
        self._executed: Executed | None = None
        if info.precision == "int8":  # report the kernels that run, not the label
            self._executed = self._read_executed(providers, options, threads)
            self._precision = self._executed.precision

    def _read_executed(self, providers: list[str], options: dict[str, dict[str, str]],
                       threads: int | None) -> Executed:
        """The int8 model's executed precision (see :mod:`dunet_deploy.runtime.executed`)."""
        if TRT_EP in self._providers:
            # TensorRT-compiled nodes cannot be serialised: read this session's assignment.
            import onnx

            graph = onnx.load(str(self.model_path), load_external_data=False).graph
            assignment = provider_assignment(self._session, self._ort.__version__)
            return tensorrt_provider_executed(graph, assignment, "fp32")
        return onnxruntime_executed(
            lambda path: ort_session(self.model_path, providers, provider_options=options,
                                     threads=threads, require_providers=False,
                                     optimized_model_path=path), "fp32")

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
                "io_binding": self._binding_device, "cuda_graph": self._cuda_graph, **executed}

    def _binding(self, n: int, dtype: Any) -> tuple[Any, Any, Any, Any]:
        """``(binding, input, output, run options)`` for batch ``n`` (made once)."""
        if n not in self._bound:
            ort, dev = self._ort, self._binding_device
            x = ort.OrtValue.ortvalue_from_shape_and_type((n, self._c, self._s, self._s), dtype,
                                                          dev, 0)
            prob = next(o for o in self._session.get_outputs() if o.name == OUTPUT_NAME)
            out_type = _ORT_DTYPES.get(prob.type, np.float32)
            y = ort.OrtValue.ortvalue_from_shape_and_type((n, 1, self._s, self._s), out_type,
                                                          dev, 0)
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(INPUT_NAME, x)
            binding.bind_ortvalue_output(OUTPUT_NAME, y)
            run_options = ort.RunOptions()
            if self._cuda_graph:
                # One captured graph per batch size (ids > 0; -1 means "no graph").
                run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
            self._bound[n] = (binding, x, y, run_options)
        return self._bound[n]

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        x = slabs if self._in_dtype is np.float32 else slabs.astype(self._in_dtype)
        n = x.shape[0]
        if self._static_batch is not None and n < self._static_batch:
            # A static-batch export: pad the last batch, drop the padding after.
            pad = np.zeros((self._static_batch - n, *x.shape[1:]), dtype=x.dtype)
            x = np.concatenate([x, pad])
        try:
            if self._binding_device is None:
                out: np.ndarray = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
            else:
                binding, x_dev, y_dev, run_options = self._binding(x.shape[0], x.dtype)
                x_dev.update_inplace(np.ascontiguousarray(x))
                self._session.run_with_iobinding(binding, run_options)
                out = y_dev.numpy()
        except self._errors as exc:  # e.g. CUDA out of memory at a large batch
            raise DunetError(f"{self.model_path}: onnxruntime failed on a batch of "
                             f"{x.shape[0]} ({one_line(exc)})") from None
        return out[:n]

    def close(self) -> None:
        self._bound = {}
        self._session = None  # frees the session
        super().close()
