"""Matrix-multiply peak of this machine, measured in the same run as the models.

The "percent of peak" of a model is only meaningful against a ceiling measured
on the same device, at the same precision, with the same thread count and at
the same moment (CPU clocks, other tenants). :func:`matmul_peak` multiplies
large square matrices — a GEMM is the best case for every BLAS/oneDNN/cuBLAS
library, so it is the attainable peak, not the data-sheet one — and reports the
best GFLOP/s over a few sizes; :func:`measure_peaks` takes the best of the
libraries the backends themselves use (:func:`libraries_for`).

On CUDA, ``fp32`` is measured with TF32 tensor cores allowed, because that is
what cuDNN, ONNX Runtime and TensorRT compute "fp32" convolutions with by
default on Ampere and newer GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from dunet_deploy.bench.core import Skip, cpu_features

__all__ = [
    "CPU_SIZES",
    "CUDA_SIZES",
    "libraries_for",
    "matmul_peak",
    "measure_peaks",
    "precision_unavailable",
]

#: Square sizes tried on the CPU: big enough to be compute bound, small enough
#: that one product takes well under a second on two cores.
CPU_SIZES = (256, 384, 512, 1024, 2048)
CUDA_SIZES = (4096, 8192, 16384)


def precision_unavailable(device: str, precision: str) -> str | None:
    """Why ``precision`` cannot be measured natively on ``device``; ``None`` when it can.

    Emulated low precision (converting to fp32 for each product) would measure
    the conversion, not the hardware, so it is reported as skipped instead.
    """
    if device == "cpu" and precision in ("bf16", "fp16"):
        feats = cpu_features()
        native = feats["native_bf16"] if precision == "bf16" else feats["native_fp16"]
        if not native:
            needed = "avx512_bf16/amx_bf16" if precision == "bf16" else "avx512_fp16/amx_fp16"
            return (
                f"CPU '{feats['model']}' has no native {precision} ({needed} not in "
                "/proc/cpuinfo flags); an emulated figure would measure conversions"
            )
    return None


def _torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _best_time(fn: Callable[[], Any], sync: Callable[[], None], min_time_s: float,
               min_reps: int) -> float:
    """Shortest wall time of ``fn`` + ``sync`` after one warm-up call."""
    fn()  # warm-up: library dispatch, JIT kernels, page faults
    sync()
    best = float("inf")
    reps, t_start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t_start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return best


def _matmul_onnx(n: int) -> bytes:
    """A one-node ONNX graph ``Y = A @ B`` (``B`` a constant), fp32, ``n``×``n``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime / openvino we support
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def _runner_for(library: str, device: str, precision: str, n: int, threads: int | None
                ) -> tuple[Callable[[], Any], Callable[[], None]]:
    """``(call, sync)`` computing one ``n``×``n`` product with ``library``."""
    import numpy as np

    if library == "torch":
        import torch

        dtype = _torch_dtype(precision)
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)

        def call_torch() -> None:
            with torch.inference_mode():
                torch.matmul(a, b, out=out)

        cuda = device.startswith("cuda")
        return call_torch, (torch.cuda.synchronize if cuda else (lambda: None))
    a_np = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    if precision == "int8":
        from dunet_deploy.export.int8 import qdq_matmul_onnx

        graph = qdq_matmul_onnx(n)
    else:
        graph = _matmul_onnx(n)
    if library == "onnxruntime":
        from dunet_deploy.runtime.loaders import CPU_EP, ort_session

        sess = ort_session(graph, [CPU_EP], threads=threads, source="matmul peak")
        return (lambda: sess.run(None, {"A": a_np})), (lambda: None)
    if library == "openvino":
        import openvino as ov

        from dunet_deploy.runtime.loaders import openvino_compile, openvino_read

        core = ov.Core()
        model = openvino_read(core, graph)
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}[precision]
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        request = openvino_compile(core, model, "CPU", config, "matmul peak").create_infer_request()
        return (lambda: request.infer({0: a_np}, share_inputs=True)), (lambda: None)
    raise ValueError(f"unknown matmul library {library!r}")


def libraries_for(device: str, precision: str) -> tuple[str, ...]:
    """Matmul libraries measured for ``precision`` on ``device``.

    The CPU peak is the best of torch (MKL / oneDNN), ONNX Runtime (MLAS) and
    OpenVINO (oneDNN JIT): on some CPUs one library's GEMM is well below what
    another's convolutions reach (e.g. MKL on AMD), and a "peak" below what a
    model achieves would be no ceiling. ONNX Runtime has no bf16/fp16 CPU GEMM.
    On CUDA cuBLAS (through torch) is the reference.
    """
    if device.startswith("cuda"):
        return ("torch",)
    if precision == "int8":  # a QDQ graph both CPU runtimes fuse into an integer GEMM
        return ("onnxruntime", "openvino")
    return ("torch", "openvino") if precision != "fp32" else ("torch", "onnxruntime", "openvino")


def matmul_peak(
    device: str = "cpu",
    precision: str = "fp32",
    *,
    threads: int | None = None,
    sizes: tuple[int, ...] | None = None,
    min_time_s: float = 0.3,
    min_reps: int = 3,
    library: str = "torch",
) -> dict[str, Any]:
    """Best matmul GFLOP/s of one library over ``sizes`` for ``precision`` on ``device``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        threads: CPU threads (the benchmark's count).
        sizes: square sizes ``n`` (``2 n^3`` FLOPs per product).
        min_time_s: time each size at least this long...
        min_reps: ...and at least this many products.
        library: ``"torch"``, ``"onnxruntime"`` or ``"openvino"`` (CPU only).

    Returns:
        ``{"device", "precision", "library", "gflops", "best_size", "by_size",
        "threads"}``; ``by_size`` maps ``str(n)`` to the best GFLOP/s of that size.
    """
    import torch

    cuda = device.startswith("cuda")
    if threads is not None and not cuda:
        torch.set_num_threads(int(threads))
    if sizes is None:
        sizes = CUDA_SIZES if cuda else CPU_SIZES
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # see module docstring
    by_size: dict[str, float] = {}
    try:
        for n in sizes:
            call, sync = _runner_for(library, device, precision, n, threads)
            by_size[str(n)] = 2.0 * n**3 / _best_time(call, sync, min_time_s, min_reps) / 1e9
            del call
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    best_n = max(by_size, key=lambda k: by_size[k])
    return {
        "device": device,
        "precision": precision,
        "library": library,
        "gflops": by_size[best_n],
        "best_size": int(best_n),
        "by_size": by_size,
        "threads": None if cuda else (threads or torch.get_num_threads()),
    }


def measure_peaks(
    device: str, precisions: tuple[str, ...] | list[str], *, threads: int | None = None,
    sizes: tuple[int, ...] | None = None, min_time_s: float = 0.3,
) -> tuple[dict[str, dict[str, Any]], list[Skip]]:
    """The peak for each precision (best library, see :func:`libraries_for`), or why not.

    Returns:
        ``(peaks, skipped)``; ``peaks[precision]`` is the best library's
        :func:`matmul_peak` result plus ``by_library`` (GFLOP/s of each
        library, or the reason it could not run) and ``method``.
    """
    peaks: dict[str, dict[str, Any]] = {}
    skipped: list[Skip] = []
    for p in precisions:
        reason = precision_unavailable(device, p)
        results: dict[str, dict[str, Any]] = {}
        errors: dict[str, str] = {}
        if reason is None:
            for lib in libraries_for(device, p):
                try:
                    results[lib] = matmul_peak(device, p, threads=threads, sizes=sizes,
                                               min_time_s=min_time_s, library=lib)
                except Exception as exc:  # library missing or without this dtype: others count
                    errors[lib] = " ".join(str(exc).split())[:200] or type(exc).__name__
            if not results:
                reason = "no matmul library could run it: " + "; ".join(
                    f"{k}: {v}" for k, v in errors.items())
        if reason is not None:
            skipped.append(Skip(model="(peak)", backend="matmul", precision=p, reason=reason))
            continue
        best = max(results.values(), key=lambda r: r["gflops"])
        peaks[p] = {
            **best,
            "by_library": {**{k: v["gflops"] for k, v in results.items()}, **errors},
            "method": "n×n matmul, best repetition per size, best size, best library"
            + (" (TF32 allowed for fp32)" if device.startswith("cuda") else ""),
        }
    return peaks, skipped
