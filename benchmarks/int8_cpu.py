"""INT8 on the CPU runtimes: quantizer choice and speed, A/B interleaved in one run.

What ``docs/int8.md`` quotes. Two parts:

* **accuracy** — a tiny D-UNet (base_filters 8, 32×32) trained briefly on synthetic
  data (``tests/export_helpers.train_tiny``), quantized by ONNX Runtime's
  ``quantize_static`` (what ``dunet-export --format onnx-int8`` uses) and, when
  installed, by NNCF 3.x on the ONNX with the same float parts; masks of 8
  synthetic volumes against fp32 through ONNX Runtime and OpenVINO;
* **speed** — the paper's full-width D-UNet (random init) at 192×192, batch 4:
  OpenVINO fp32 / bf16 / int8 and ONNX Runtime fp32 / int8 through the runtime's
  own runners (plus NNCF variants when installed), one batch of each in turn per
  round (interleaved, so drifting load hits all alike), and the int8, bf16 and
  fp32 matmul peaks measured before and after in the same run.

Usage::

    .venv/bin/python benchmarks/int8_cpu.py --out benchmarks/results/<date>-<cpu>/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # export_helpers: the tiny trained model

IGNORED = ["ReduceMean", "MatMul", "Sigmoid"]  # the float parts, as the export's policy


def _nncf_onnx(model: onnx.ModelProto, slabs: np.ndarray) -> onnx.ModelProto | None:
    try:
        import nncf
    except ImportError:
        return None
    ds = nncf.Dataset(list(slabs), lambda x: {"slabs": x[None]})
    scope = nncf.IgnoredScope(names=["/head/Conv"], types=IGNORED, validate=False)
    q: onnx.ModelProto = nncf.quantize(model, ds, preset=nncf.QuantizationPreset.PERFORMANCE,
                                       subset_size=len(slabs), ignored_scope=scope)
    return q


def _nncf_ir(onnx_path: Path, slabs: np.ndarray, out: Path) -> Path | None:
    try:
        import nncf
        import openvino as ov
    except ImportError:
        return None
    m = ov.Core().read_model(str(onnx_path))
    m.reshape({"slabs": ov.PartialShape([-1, *slabs.shape[1:]])})
    scope = nncf.IgnoredScope(names=["/head/Conv"], types=IGNORED, validate=False)
    q = nncf.quantize(m, nncf.Dataset(list(slabs), lambda x: x[None]),
                      preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(slabs),
                      ignored_scope=scope)
    ov.save_model(q, str(out))
    return out


def _ov_raw(path: Path, hint: str, threads: int) -> Callable[[np.ndarray], Any]:
    import openvino as ov

    core = ov.Core()
    cm = core.compile_model(core.read_model(str(path)), "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads})
    req = cm.create_infer_request()
    return lambda x: np.array(req.infer({0: x})[0])


def _with_meta(q: onnx.ModelProto, src: onnx.ModelProto, path: Path) -> Path:
    del q.metadata_props[:]
    q.metadata_props.extend(src.metadata_props)
    for p in q.metadata_props:
        if p.key == "dunet.precision":
            p.value = "int8"
    onnx.save(q, str(path))
    return path


# --------------------------------------------------------------- accuracy
def accuracy(tmp: Path, threads: int) -> list[dict[str, Any]]:
    import export_helpers as H

    from dunet_deploy.data.synth import synthesize_case
    from dunet_deploy.export.int8 import quantize_qdq, synthetic_calibration_slabs
    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.runtime import open_runner
    from dunet_deploy.training.evaluate import predict_volume

    spec = H.tiny_spec()
    model = H.train_tiny(spec, steps=150)
    m32 = export_onnx(model, spec, tmp / "tiny.onnx")
    slabs = synthetic_calibration_slabs(spec, 128, seed=1, volumes=6)
    candidates = {"ort-quantize_static": quantize_qdq(m32, slabs),
                  "nncf-onnx": _nncf_onnx(onnx.load(str(tmp / "tiny.onnx")), slabs)}
    cases = [synthesize_case(spec.volume_shape, seed=s) for s in range(20, 28)]
    rows = []
    for name, q in candidates.items():
        if q is None:
            continue
        path = _with_meta(q, m32, tmp / f"tiny_{name}.onnx")
        for backend in ("onnxruntime", "openvino"):
            ref_p = "fp32" if backend == "openvino" else "auto"
            with open_runner(tmp / "tiny.onnx", backend, precision=ref_p, threads=threads) as r32, \
                    open_runner(path, backend, threads=threads) as r8:
                agree, voxels, inter, tot, d32, d8 = 0, 0, 0, 0, [], []
                for image, truth in cases:
                    a = predict_volume(image, spec, r32) >= 0.5
                    b = predict_volume(image, spec, r8) >= 0.5
                    head = image != 0
                    agree += int(((a == b) & head).sum())
                    voxels += int(head.sum())
                    inter += int((a & b).sum())
                    tot += int(a.sum() + b.sum())
                    for d, m in ((d32, a), (d8, b)):
                        s = m.sum() + (truth > 0).sum()
                        d.append(1.0 if s == 0 else 2 * (m & (truth > 0)).sum() / s)
                rows.append({"quantizer": name, "backend": backend, "executed": r8.precision,
                             "voxel_agreement": agree / voxels,
                             "lesion_dsc_vs_fp32": 2 * inter / max(1, tot),
                             "dsc_fp32": float(np.mean(d32)), "dsc_int8": float(np.mean(d8))})
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ speed
def _peaks(threads: int, sizes: tuple[int, ...]) -> dict[str, float]:
    from dunet_deploy.bench.peak import matmul_peak

    out = {}
    for p in ("fp32", "bf16", "int8"):
        out[p] = max(matmul_peak("cpu", p, threads=threads, sizes=sizes, library=lib)["gflops"]
                     for lib in (("onnxruntime", "openvino") if p == "int8" else ("openvino",)))
    return out


def speed(tmp: Path, threads: int, rounds: int, batch: int,
          peak_sizes: tuple[int, ...]) -> dict[str, Any]:
    import torch

    from dunet_deploy.errors import DunetError
    from dunet_deploy.export.int8 import bench_int8_onnx, synthetic_calibration_slabs
    from dunet_deploy.export.onnx_export import artifact_info, export_onnx
    from dunet_deploy.flops import count_flops
    from dunet_deploy.models import create_model
    from dunet_deploy.runtime import open_runner
    from dunet_deploy.spec import PreprocessSpec

    torch.manual_seed(0)
    spec = PreprocessSpec()
    model = create_model("dunet").eval()
    m32 = export_onnx(model, spec, tmp / "full.onnx")
    flops = count_flops(m32, (1, spec.in_channels, spec.image_size, spec.image_size))["per_sample"]
    info8 = artifact_info(model, spec, precision="int8")
    t0 = time.perf_counter()
    bench_int8_onnx(tmp / "full.onnx", info8, tmp / "full_int8.onnx", n_slabs=32)
    quantize_s = time.perf_counter() - t0
    calib = synthetic_calibration_slabs(spec, 32)
    peaks_start = _peaks(threads, peak_sizes)
    fns: dict[str, Callable[[np.ndarray], Any]] = {}
    executed: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, path, backend, prec in (
        ("openvino fp32", "full.onnx", "openvino", "fp32"),
        ("openvino bf16", "full.onnx", "openvino", "bf16"),
        ("openvino int8 (QDQ ONNX, bf16 elsewhere)", "full_int8.onnx", "openvino", "int8"),
        ("onnxruntime fp32", "full.onnx", "onnxruntime", "fp32"),
        ("onnxruntime int8 (QDQ ONNX)", "full_int8.onnx", "onnxruntime", "int8"),
    ):
        try:
            r = open_runner(tmp / path, backend, precision=prec, threads=threads)
        except DunetError as exc:  # e.g. bf16 on a CPU without native bf16 (AMD Zen 3)
            skipped[name] = str(exc)
            print(f"{name:45s} skipped: {exc}", flush=True)
            continue
        fns[name] = r.infer
        executed[name] = r.describe().get("executed", {"precision": r.precision})
    q = _nncf_onnx(onnx.load(str(tmp / "full.onnx")), calib)  # a loaded file: NNCF wants it
    if q is not None:
        _with_meta(q, m32, tmp / "full_nncf.onnx")
        fns["openvino int8 (NNCF QDQ ONNX)"] = _ov_raw(tmp / "full_nncf.onnx", "bf16", threads)
        ir = _nncf_ir(tmp / "full.onnx", calib, tmp / "full_nncf.xml")
        if ir is not None:
            fns["openvino int8 (NNCF on the OpenVINO model)"] = _ov_raw(ir, "bf16", threads)
    x = np.random.default_rng(0).standard_normal(
        (batch, spec.in_channels, spec.image_size, spec.image_size), dtype=np.float32)
    for f in fns.values():
        f(x)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f(x)
            times[k].append((time.perf_counter() - t) / batch * 1e3)
    peaks_end = _peaks(threads, peak_sizes)
    peaks = {p: max(peaks_start[p], peaks_end[p]) for p in peaks_start}
    rows = {}
    for k, v in times.items():
        med = float(np.median(v))
        rows[k] = {"ms_per_slab_median": med, "ms_per_slab_best": float(min(v)),
                   "tops": flops / (med * 1e-3) / 1e12}
        print(f"{k:45s} median {med:7.2f} best {min(v):7.2f} ms/slab "
              f"{rows[k]['tops']:.3f} TOP/s", flush=True)
    return {"model": "dunet (paper width, random init)", "image_size": spec.image_size,
            "batch": batch, "rounds": rounds, "flops_per_slab": flops,
            "quantize_seconds": quantize_s, "executed": executed, "rows": rows,
            "skipped": skipped,
            "peaks_gops": peaks, "peaks_start": peaks_start, "peaks_end": peaks_end}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--peak-sizes", default="1024,2048")
    args = ap.parse_args()
    from dunet_deploy.machine import cpu_features, machine_info

    with tempfile.TemporaryDirectory(prefix="dunet-int8-bench-") as tmp:
        acc = accuracy(Path(tmp), args.threads)
        spd = speed(Path(tmp), args.threads, args.rounds, args.batch,
                    tuple(int(s) for s in args.peak_sizes.split(",")))
    doc = {"machine": machine_info(), "cpu_features": cpu_features(), "threads": args.threads,
           "loadavg_end": os.getloadavg(), "accuracy": acc, "speed": spd}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {args.out / 'int8.json'}")


if __name__ == "__main__":
    main()
