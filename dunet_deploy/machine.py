"""Facts about the machine a figure or a result came from (standard library only).

One place for the CPU model, its precision features and the library versions:
``summary.json`` of ``dunet-infer``, ``bench.json``, ``dunet-eval`` and the
runtime's precision choices all read them here, so every figure can name the
CPU it ran on.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

__all__ = ["cpu_features", "machine_info"]


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip(), v.strip())
    return info


def cpu_features() -> dict[str, Any]:
    """CPU model and the low-precision features that decide what can run natively.

    Returns:
        ``model``, ``flags`` (the relevant subset) and booleans ``native_bf16``
        (AVX512-BF16 / AMX-BF16 on x86, BF16 on Arm) and ``native_fp16``
        (AVX512-FP16 / AMX-FP16 on x86, half-precision SIMD on Arm) and
        ``native_int8`` (VNNI / AMX-INT8 on x86, dot-product SIMD on Arm); ``amx``
        lists the AMX flags.
    """
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    model = info.get("model name") or info.get("Model name") or platform.processor() or "unknown"
    x86_bf16 = {"avx512_bf16", "amx_bf16"} & flags
    x86_fp16 = {"avx512_fp16", "amx_fp16"} & flags
    x86_int8 = {"avx512_vnni", "avx_vnni", "amx_int8"} & flags
    arm = platform.machine().lower() in ("aarch64", "arm64")
    relevant = sorted(f for f in flags if re.match(r"(avx|amx|fma|f16c|bf16|asimd|sve|fphp)", f))
    return {
        "model": model,
        "family": info.get("cpu family"),
        "model_id": info.get("model"),
        "flags": relevant,
        "native_bf16": bool(x86_bf16) or (arm and "bf16" in flags),
        "native_fp16": bool(x86_fp16) or (arm and "asimdhp" in flags),
        "native_int8": bool(x86_int8) or (arm and "asimddp" in flags),
        "amx": sorted(f for f in flags if f.startswith("amx")),
    }


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # not installed, or metadata missing
        return None


def machine_info() -> dict[str, Any]:
    """CPU, core count, library versions and load: the ``machine`` section of ``bench.json``.

    GPU fields are added by the caller (it knows whether CUDA was used).
    """
    feats = cpu_features()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = float(line.split()[1])
    except OSError:
        pass
    versions = {
        name: _version(dist)
        for name, dist in [
            ("dunet_deploy", "dunet-deploy"),
            ("torch", "torch"),
            ("onnx", "onnx"),
            ("onnxruntime", "onnxruntime"),
            ("onnxruntime_gpu", "onnxruntime-gpu"),
            ("openvino", "openvino"),
            ("tensorrt", "tensorrt"),
            ("numpy", "numpy"),
        ]
    }
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": feats["model"],
        "cpu_family": feats["family"],
        "cpu_model_id": feats["model_id"],
        "cpu_flags": feats["flags"],
        "cpu_native_bf16": feats["native_bf16"],
        "cpu_native_fp16": feats["native_fp16"],
        "cpu_native_int8": feats["native_int8"],
        "cores": usable,
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024**2, 1) if mem_kb else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {k: v for k, v in versions.items() if v is not None},
    }
