"""Ray's overhead: ``segment_on_ray`` against in-process ``predict_files`` on the same machine.

N synthetic full-size volumes (197×233×189, int16 ``.nii.gz``), the zero-cost stand-in model
(what is measured is the host work and Ray's data movement), save_prob off. Ray runs on a
local two-node cluster on loopback (``tests/ray_cluster.py``: one CPU per node, one actor),
started once; the two paths are interleaved ``--repeat`` times.

Usage::

    python benchmarks/ray_overhead.py [--volumes 8] [--repeat 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import atomic_write_bytes, write_json
from dunet_deploy.bench.pipeline_bench import (
    StandInRunner,
    pipeline_spec,
    write_standin_onnx,
    write_volumes,
)
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime.ray_exec import ClusterOptions, segment_on_ray
from dunet_deploy.runtime.segmenter import Segmenter
from dunet_deploy.spec import ATLAS_SHAPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import start_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/2026-12-05-amd-epyc-zen3-2c"))
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    rates: dict[str, list[float]] = {"in-process": [], "ray": []}
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="dunet-ray-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        spec = pipeline_spec(ATLAS_SHAPE)
        volumes = write_volumes(work / "v", args.volumes, spec.volume_shape)["int16"]
        paths = [str(p) for p in volumes]
        model = write_standin_onnx(work / "standin.onnx", spec)
        cluster = start_cluster(stack)
        for r in range(args.repeat):
            for name in (("in-process", "ray") if r % 2 == 0 else ("ray", "in-process")):
                out = work / f"{name}{r}"
                t0 = time.perf_counter()
                if name == "ray":
                    segment_on_ray(model, paths, out, None,
                                   ClusterOptions(address=cluster.address),
                                   runner_factory=StandInRunner)
                else:
                    with Segmenter(model, runner_factory=StandInRunner) as seg:
                        seg.predict_files(paths, out)
                rate = args.volumes / (time.perf_counter() - t0)
                rates[name].append(rate)
                print(f"repeat {r} {name}: {rate:.3f} volumes/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    doc: dict[str, Any] = {"volumes": args.volumes, "repeat": args.repeat, "rates": rates,
                           "median": med, "ray_overhead": 1 - med["ray"] / med["in-process"],
                           "machine": machine_info(),
                           "loadavg": {"start": load_start, "end": list(os.getloadavg())}}
    m = doc["machine"]
    md = (f"# Ray overhead (stand-in model)\n\nCPU: {m['cpu_model']} family {m['cpu_family']} "
          f"(flags {' '.join(m['cpu_flags'])}), {m.get('cores')} cores; {args.volumes} volumes of "
          f"197x233x189 int16, {args.repeat} interleaved repeats; load average "
          f"{load_start[0]:.2f} -> {doc['loadavg']['end'][0]:.2f}. Wall time includes Ray Data's "
          f"start (actor creation, model load) but not the cluster's.\n\n"
          "| path | volumes/s median | runs |\n|---|---:|---|\n"
          + "".join(f"| {k} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |\n"
                    for k, v in rates.items())
          + f"\nRay's overhead: {100 * doc['ray_overhead']:.0f} % of in-process volumes/s.\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ray_overhead.json", doc)
    atomic_write_bytes(args.out / "ray_overhead.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
