"""How much does ``dunet-infer`` cost beyond the model itself?

On one synthetic ATLAS-size volume (197×233×189) and the real-size ``dunet``
at 192×192 (random weights: timing does not depend on them), per backend:

* **pure model**: ``runner.infer`` over the volume's non-empty slabs, in the
  same batches ``dunet-infer`` uses (slabs built beforehand, one warm-up call);
* **end-to-end**: ``python -m dunet_deploy.cli.infer`` on the volume, wall
  time of the whole process (interpreter start, imports, model load, read,
  preprocess, inference, post-process, write, summary).

and prints ``end-to-end / pure model`` (target <= 1.15), also without the
process start and model load, plus the per-stage times from summary.json.

On a shared machine the two measurements can see different CPU contention,
so they are interleaved ``--repeat`` times and the fastest of each is used;
``within`` is the end-to-end time over the ``infer`` stage of the same
process (the same contention for both), a robust cross-check.

Usage::

    python benchmarks/infer_overhead.py [--backends onnxruntime,openvino] [--batch-size 16]

The ONNX is exported with torch (needed only here, not by the runtime); the
end-to-end run is a separate, torch-free process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import read_artifact_info
from dunet_deploy.data.preprocess import slices_to_slabs
from dunet_deploy.data.synth import write_dataset
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime import open_runner
from dunet_deploy.runtime.pipeline import InputItem, prepare_volume
from dunet_deploy.spec import ATLAS_SHAPE, PreprocessSpec

# (backend, precision request) pairs: OpenVINO "auto" is bf16 where the CPU has it.
DEFAULT_RUNS = {"onnxruntime": "fp32", "openvino": "auto"}


def export_model(path: Path, seed: int) -> None:
    """Real-size dunet with random weights -> ONNX with our metadata."""
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    torch.manual_seed(seed)
    model = create_model("dunet").eval()
    export_onnx(model, PreprocessSpec.for_geometry(ATLAS_SHAPE), path)


def pure_model_time(model: Path, volume: Path, backend: str, precision: str, batch: int,
                    threads: int | None) -> dict[str, Any]:
    """Seconds in ``runner.infer`` over the volume's non-empty slabs, batch by batch."""
    info = read_artifact_info(model)
    prep = prepare_volume(InputItem(volume), info.spec)
    assert prep.result.ok and prep.slices is not None and prep.indices is not None
    with open_runner(model, backend, info=info, precision=precision, threads=threads) as runner:
        step = batch if runner.max_batch is None else min(batch, runner.max_batch)
        batches = [slices_to_slabs(prep.slices, info.spec, prep.indices[i : i + step])
                   for i in range(0, prep.indices.size, step)]
        runner.infer(batches[0][:1])  # warm-up: first-call allocations
        total = 0.0
        for slabs in batches:
            t0 = time.perf_counter()
            runner.infer(slabs)
            total += time.perf_counter() - t0
        return {"pure_model_s": total, "precision": runner.precision,
                "slabs": int(prep.indices.size), "batches": len(batches)}


def end_to_end(model: Path, volume: Path, out: Path, backend: str, precision: str, batch: int,
               threads: int | None) -> dict[str, Any]:
    """Wall time of a ``dunet-infer`` process on the volume, and its summary."""
    cmd = [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model), str(volume),
           "-o", str(out), "--backend", backend, "--precision", precision,
           "--batch-size", str(batch), "--quiet"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    case = summary["cases"][0]
    return {"end_to_end_s": wall, "summary_wall_s": summary["wall_s"],
            "model_load_s": summary["model_load_s"], "stage_s": case["times"],
            "precision_e2e": summary["precision"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(DEFAULT_RUNS),
                        help="comma-separated: onnxruntime, openvino")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved pure/end-to-end pairs; the fastest of each is used")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/infer_overhead"),
                        help="folder for the model, the volume and the results")
    args = parser.parse_args(argv)

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.onnx"
    if not model.exists():
        export_model(model, args.seed)
    volume = work / "data" / "imagesTr" / "case_000.nii.gz"
    if not volume.exists():
        write_dataset(work / "data", cases=1, layout="pairs", shape=ATLAS_SHAPE, seed=args.seed)

    rows = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        precision = DEFAULT_RUNS.get(backend, "auto")
        pures, e2es = [], []
        for _ in range(max(1, args.repeat)):
            pures.append(pure_model_time(model, volume, backend, precision, args.batch_size,
                                         args.threads))
            e2es.append(end_to_end(model, volume, work / f"out_{backend}", backend, precision,
                                   args.batch_size, args.threads))
        pure = min(pures, key=lambda r: r["pure_model_s"])
        e2e = min(e2es, key=lambda r: r["end_to_end_s"])
        row = {"backend": backend, "batch_size": args.batch_size, **pure, **e2e,
               "pure_all_s": [r["pure_model_s"] for r in pures],
               "end_to_end_all_s": [r["end_to_end_s"] for r in e2es]}
        row["ratio"] = e2e["end_to_end_s"] / pure["pure_model_s"]
        # Inside the process, after the model is loaded: what a long run pays per volume.
        row["ratio_per_volume"] = (e2e["summary_wall_s"] - e2e["model_load_s"]) / pure[
            "pure_model_s"]
        row["ratio_within"] = e2e["end_to_end_s"] / e2e["stage_s"]["infer"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    machine = machine_info()
    print(f"\nCPU: {machine['cpu_model']} ({machine['logical_cpus']} logical CPUs), "
          f"volume {ATLAS_SHAPE}, batch {args.batch_size}")
    print(f"{'backend':12} {'precision':9} {'slabs':>5} {'model s':>8} {'e2e s':>8} "
          f"{'ratio':>6} {'per-vol':>7} {'within':>6}  stages (s)")
    for r in rows:
        stages = " ".join(f"{k}={v:.2f}" for k, v in r["stage_s"].items())
        print(f"{r['backend']:12} {r['precision']:9} {r['slabs']:5d} {r['pure_model_s']:8.2f} "
              f"{r['end_to_end_s']:8.2f} {r['ratio']:6.3f} {r['ratio_per_volume']:7.3f} "
              f"{r['ratio_within']:6.3f}  "
              f"{stages} load={r['model_load_s']:.2f}")
    results = {"machine": machine, "volume_shape": list(ATLAS_SHAPE), "rows": rows,
               "numpy": np.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
