"""What should ``dunet-infer``'s default ``--workers`` be on this machine?

Runs ``Segmenter.predict_files`` (what ``dunet-infer`` does) on N synthetic
full-size volumes (197×233×189, int16 + ``scl_slope`` ``.nii.gz``) with the
zero-cost stand-in model, for each worker count, each run in its own child
process (``dunet_deploy.bench.pipeline_bench``). The worker counts are
interleaved, in a rotated order per repeat, so that load from other users of
a shared machine falls on all of them alike; the median of the repeats is
reported, with min and max.

Usage::

    python benchmarks/workers.py [--volumes 16] [--workers 0,1,2,3] [--repeat 3] [--out DIR]

Writes ``DIR/workers.json`` and ``DIR/workers.md`` (with the CPU model and flags). Then runs
``dunet-infer --calibrate-workers``'s calibration (its cache in a scratch folder: this machine's
default is left as it is) and records which count it picks, beside the fastest measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import atomic_write_bytes, write_json
from dunet_deploy.bench.pipeline_bench import (
    _run_child,
    pipeline_spec,
    write_standin_onnx,
    write_volumes,
)
from dunet_deploy.bench.workers_calibration import calibrate_workers
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime.workers import default_workers
from dunet_deploy.spec import ATLAS_SHAPE


def measure(volumes: int, workers: list[int], repeat: int, work: Path) -> dict[str, Any]:
    spec = pipeline_spec(ATLAS_SHAPE)
    paths = write_volumes(work / "volumes", volumes, spec.volume_shape)["int16"]
    model = write_standin_onnx(work / "standin.onnx", spec)
    load_start = list(os.getloadavg())
    runs: list[dict[str, Any]] = []
    for r in range(repeat):
        order = workers[r % len(workers):] + workers[: r % len(workers)]
        for w in order:
            job = {"model": "standin", "model_path": str(model), "workers": w,
                   "inputs": [str(p) for p in paths], "out_dir": str(work / f"out_{r}_{w}"),
                   "backend": "auto", "threads": None, "batch_size": 16,
                   "save_prob": False, "tta": "none"}
            row = {"repeat": r, "workers": w, **_run_child(job)}
            runs.append(row)
            print(f"repeat {r} workers={w}: {row['volumes_per_s']:.3f} volumes/s, "
                  f"{row['core_s_per_volume']:.3f} core-s/volume", flush=True)
    summary = {}
    for w in workers:
        rates = [x["volumes_per_s"] for x in runs if x["workers"] == w]
        summary[str(w)] = {"median": statistics.median(rates), "min": min(rates),
                           "max": max(rates), "runs": rates}
    return {"config": {"volumes": volumes, "shape": list(spec.volume_shape),
                       "image_size": spec.image_size, "workers": workers, "repeat": repeat,
                       "model": "standin", "encoding": "int16"},
            "machine": machine_info(), "default_workers_today": default_workers(2),
            "loadavg": {"start": load_start, "end": list(os.getloadavg())},
            "summary": summary, "runs": runs}


def render(doc: dict[str, Any]) -> str:
    m, cfg = doc["machine"], doc["config"]
    flags = " ".join(m.get("cpu_flags") or [])
    best = max(doc["summary"], key=lambda w: doc["summary"][w]["median"])
    lines = [
        "# dunet-infer --workers on this machine",
        "",
        f"CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores; flags: {flags or '?'}.",
        f"{cfg['volumes']} volumes of {'x'.join(map(str, cfg['shape']))} (int16 .nii.gz) at "
        f"S={cfg['image_size']}, stand-in model, {cfg['repeat']} interleaved repeats; load "
        f"average {doc['loadavg']['start'][0]:.2f} at the start, "
        f"{doc['loadavg']['end'][0]:.2f} at the end (the machine is shared).",
        "",
        "| workers | volumes/s median | min | max |",
        "|---:|---:|---:|---:|",
    ]
    for w, s in doc["summary"].items():
        mark = " (today's default)" if int(w) == doc["default_workers_today"] else ""
        lines.append(f"| {w}{mark} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} |")
    lines += ["", f"Fastest by median: --workers {best}."]
    cal = doc.get("calibration")
    if cal:
        rates = ", ".join(f"{w}: {v:.3f}" for w, v in cal["median"].items())
        lines += ["", f"`dunet-infer --calibrate-workers` (run after, {cal['volumes']} volumes x "
                      f"{cal['repeat']} repeats; load average {cal['loadavg'][0]:.2f} -> "
                      f"{cal['loadavg'][1]:.2f}): picks --workers {cal['workers']} (core rule: "
                      f"{cal['rule']}); volumes/s median by workers: {rates}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--workers", default="0,1,2,3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/2026-12-05-amd-epyc-zen3-2c"))
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="dunet-workers-") as tmp:
        doc = measure(args.volumes, workers, args.repeat, Path(tmp))
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        picked = calibrate_workers(log=print)
        doc["calibration"] = {"workers": picked["workers"], "rule": picked["rule"],
                              "median": {str(w): v for w, v in picked["median"].items()},
                              "volumes": picked["volumes"], "repeat": picked["repeat"],
                              "loadavg": picked["loadavg"]}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "workers.json", doc)
    atomic_write_bytes(args.out / "workers.md", render(doc).encode())
    print(render(doc))


if __name__ == "__main__":
    main()
