"""Ray's overhead: ``segment_on_ray`` against in-process ``predict_files`` on the same machine.

N synthetic full-size volumes (197×233×189, int16 ``.nii.gz``), the zero-cost stand-in model
(what is measured is the host work and Ray's data movement), save_prob off. Ray runs on a
local two-node cluster on loopback (``tests/ray_cluster.py``: one CPU per node, Ray's default
object store, one actor),
started once; in-process and each Ray configuration (``--ray-cpus``: CPUs each actor / each
task holds) are interleaved ``--repeat`` times.

From the in-process run's per-stage seconds and the Ray runs' rate, a table projects the
volumes/s of a cluster of M CPU cores and N GPU actors: the host stages need
``core-s per volume`` (measured: the cluster's CPUs ÷ Ray's volumes/s, since the zero-cost model
leaves Ray CPU-bound), the network ``t_net`` seconds per volume on one actor (a sweep value:
no GPU here); the smaller of ``M / core-s`` and ``N / t_net`` is the rate, and names the stage
that limits.

Usage::

    python benchmarks/ray_overhead.py [--volumes 16] [--repeat 2] [--ray-cpus 1:1 0.5:0.5]
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
    ap.add_argument("--volumes", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ray-cpus", nargs="+", default=["1:1", "0.5:0.5"],
                    help="Ray configurations, each ACTOR_CPUS:TASK_CPUS")
    ap.add_argument("--net-seconds", nargs="+", type=float, default=[0.05, 0.25, 1.0],
                    help="network seconds per volume on one GPU actor, for the projection")
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/2026-12-05-amd-epyc-zen3-2c"))
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    configs = {f"ray {c}": tuple(float(x) for x in c.split(":")) for c in args.ray_cpus}
    rates: dict[str, list[float]] = {"in-process": [], **{k: [] for k in configs}}
    stages: list[dict[str, float]] = []
    starts: dict[str, list[float]] = {k: [] for k in rates}
    walls: dict[str, list[float]] = {k: [] for k in rates}
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="dunet-ray-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        spec = pipeline_spec(ATLAS_SHAPE)
        volumes = write_volumes(work / "v", args.volumes, spec.volume_shape)["int16"]
        paths = [str(p) for p in volumes]
        model = write_standin_onnx(work / "standin.onnx", spec)
        cluster = start_cluster(stack, object_store_mb=None)  # Ray's default store, as users run
        order = list(rates)
        for r in range(args.repeat):
            for name in (order if r % 2 == 0 else order[::-1]):
                out = work / f"{name.replace(' ', '_')}{r}"
                done: list[float] = []  # when each case finished

                def finished(_result: Any, done: list[float] = done) -> None:
                    done.append(time.perf_counter())

                t0 = time.perf_counter()
                if name in configs:
                    actor_cpus, task_cpus = configs[name]
                    segment_on_ray(model, paths, out, None,
                                   ClusterOptions(address=cluster.address,
                                                  cpus_per_actor=actor_cpus,
                                                  cpus_per_task=task_cpus),
                                   runner_factory=StandInRunner, on_result=finished)
                else:
                    with Segmenter(model, runner_factory=StandInRunner) as seg:
                        summary = seg.predict_files(paths, out, workers=0, on_result=finished)
                    stages += [c["times"] for c in summary["cases"]]
                wall = time.perf_counter() - t0
                # steady state: from the first finished case to the last (start-up left out)
                rate = (len(done) - 1) / (done[-1] - done[0])
                rates[name].append(rate)
                starts[name].append(done[0] - t0)
                walls[name].append(args.volumes / wall)
                print(f"repeat {r} {name}: {rate:.3f} volumes/s steady, first case after "
                      f"{done[0] - t0:.1f} s, {args.volumes / wall:.3f} volumes/s overall",
                      flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    best = max(configs, key=lambda k: med[k])
    stage_s = {k: statistics.mean(t[k] for t in stages) for k in stages[0]}
    cluster_cpus = 2.0
    core_s = cluster_cpus / med[best]  # CPU-bound: every core busy with host work
    doc: dict[str, Any] = {"volumes": args.volumes, "repeat": args.repeat, "rates": rates,
                           "first_case_s": starts, "overall_rates": walls,
                           "median": med, "configs": {k: list(v) for k, v in configs.items()},
                           "ray_overhead": {k: 1 - med[k] / med["in-process"] for k in configs},
                           "in_process_stage_s": stage_s, "ray_core_s_per_volume": core_s,
                           "machine": machine_info(),
                           "loadavg": {"start": load_start, "end": list(os.getloadavg())}}
    m = doc["machine"]
    overhead = {k: f"{100 * v:.0f} %" for k, v in doc["ray_overhead"].items()}
    host = stage_s["read"] + stage_s["preprocess"] + stage_s["postprocess"] + stage_s["write"]
    rows = []
    for cores in (2, 8, 32, 128):
        for actors in (1, 4, 8):
            cells = []
            for t_net in args.net_seconds:
                cpu_rate, net_rate = cores / core_s, actors / t_net
                limit = "CPU" if cpu_rate < net_rate else "network"
                cells.append(f"{min(cpu_rate, net_rate):.1f} ({limit})")
            rows.append(f"| {cores} | {actors} | " + " | ".join(cells) + " |\n")
    md = (f"# Ray overhead (stand-in model)\n\nCPU: {m['cpu_model']} family {m['cpu_family']} "
          f"(flags {' '.join(m['cpu_flags'])}), {m.get('cores')} cores; {args.volumes} volumes of "
          f"197x233x189 int16, {args.repeat} interleaved repeats; load average "
          f"{load_start[0]:.2f} -> {doc['loadavg']['end'][0]:.2f}. volumes/s: steady state, "
          "from the first finished case to the last; start-up (Ray Data's plan, actor creation, "
          "model load; the cluster was started before) is the time to the first case. "
          "`ray A:T`: each actor holds A CPUs, each read/write task T (the cluster has 2).\n\n"
          "| path | volumes/s median | runs | overhead vs in-process | first case after s | "
          "volumes/s with start-up |\n|---|---:|---|---:|---:|---:|\n"
          + "".join(f"| {k} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in v)} | "
                    f"{overhead.get(k, '')} | {statistics.median(starts[k]):.1f} | "
                    f"{statistics.median(walls[k]):.3f} |\n" for k, v in rates.items())
          + f"\nPer-stage seconds per volume in-process (mean over {len(stages)} cases): "
          + ", ".join(f"{k} {v:.3f}" for k, v in stage_s.items())
          + f" (host stages {host:.3f} s). Under Ray ({best}) the host work costs "
          f"{core_s:.2f} core-s per volume (2 CPUs ÷ {med[best]:.3f} volumes/s), read, "
          "preprocess, pickling through the object store, postprocess and write.\n\n"
          "## Projection: volumes/s with M CPU cores and N GPU actors\n\n"
          f"min(M ÷ {core_s:.2f} core-s, N ÷ t_net); t_net = one actor's network seconds per "
          "volume, a sweep value (no GPU was measured here); the stage in brackets limits.\n\n"
          "| M cores | N actors | " + " | ".join(f"t_net {t:g} s" for t in args.net_seconds)
          + " |\n|---:|---:|" + "---:|" * len(args.net_seconds) + "\n" + "".join(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ray_overhead.json", doc)
    atomic_write_bytes(args.out / "ray_overhead.md", md.encode())
    print(md)


if __name__ == "__main__":
    main()
