"""Ray's overhead: ``segment_on_ray`` against in-process ``predict_files``, by difference.

Whole runs of N and of 2N synthetic full-size volumes (197×233×189, int16 ``.nii.gz``)
with the zero-cost stand-in model (what is measured is the host work and Ray's data
movement), save_prob off, on each path: in-process (``workers=0``, ``dunet-infer``'s default
on this machine) and Ray in each layout of ``--layouts`` (``ray-fused``: one whole-case actor
per CPU, the default without GPUs; ``ray-split``: read/write tasks around one model actor, the
default with GPUs) on a local cluster on loopback (``tests/ray_cluster.py``; Ray's default
object store), started once before the runs: two nodes with one CPU each (``--nodes 2``, the
default; in ``ray-split`` each volume's payload moves between the nodes' object stores) or one
node with two CPUs
(``--nodes 1``: what a user with one 2-core machine runs). Each Ray run connects, plans,
starts its actor and tasks and shuts its connection down, as ``dunet-infer --ray`` does.
The runs of a repeat are interleaved (the order reversed every other repeat).

- **Steady-state rate** = N ÷ (T(2N) − T(N)) for each path and repeat: the start-up, and
  whatever host work Ray does during it, is in both runs and cancels. It holds when the
  N-volume run outlasts the start-up: the table gives how many volumes Ray had read and
  preprocessed when its first case finished, in each run (below N, and about the same in
  both, for the difference to be the cost of N more volumes).
- **Start-up** = T(N) − N ÷ rate.
- **Core-seconds per volume** (steady state) = (C(2N) − C(N)) ÷ N, C the CPU seconds of
  the driver process plus every process of the cluster's nodes (``/proc``, sampled), or
  in-process of every process of the benchmark's session (the driver and its ``--workers``
  processes: run the benchmark under ``setsid``): all the work, Ray's own included, not
  the machine's other load.
- **Per-stage costs inside Ray**: each task and actor measures its own wall and CPU
  seconds and its pickling (:attr:`~dunet_deploy.runtime.ray_exec.RayRun.timing`); the
  cases' ``times`` (read, preprocess, infer, postprocess, write) are measured there too.

The projection to M cores and N GPU actors uses the split layout's measured costs (see
the report's formula); the GPU network seconds per volume are sweep values (no GPU here).

Usage::

    setsid python benchmarks/ray_overhead.py [--volumes 32] [--repeat 4] [--nodes 2] \
        [--layouts fused,split] [--also-workers 1 2]

It writes ``ray_layouts.{md,json}`` (two nodes) or ``ray_layouts_one_node.{md,json}``
(one node) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
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
from dunet_deploy.runtime.ray_exec import TIMED_STAGES, ClusterOptions, RayRun, segment_on_ray
from dunet_deploy.runtime.segmenter import Segmenter
from dunet_deploy.spec import ATLAS_SHAPE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from ray_cluster import RayCluster, start_cluster

CASE_TIMES = ("read", "preprocess", "infer", "postprocess", "write")
BASELINE = "in-process"
#: The cluster's nodes: the report's file name and words, by ``--nodes``.
NODES = {
    2: ("ray_layouts", "two-node loopback cluster, one CPU per node",
        "the other node's CPU is held by the actor"),
    1: ("ray_layouts_one_node", "one-node loopback cluster (the head alone), two CPUs",
        "the actor holds the other CPU"),
}


def _session_ticks(sessions: set[int]) -> dict[int, tuple[int, str]]:
    """utime + stime (clock ticks) and name of every live process in these sessions, by pid."""
    ticks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            head, tail = (proc / "stat").read_text().rsplit(")", 1)
        except OSError:  # gone meanwhile
            continue
        fields = tail.split()  # state ppid pgrp session ... utime stime
        if int(fields[3]) in sessions:
            ticks[int(proc.name)] = (int(fields[11]) + int(fields[12]), head.split("(", 1)[1])
    return ticks


class ClusterCpu:
    """CPU seconds of the cluster's processes over a run, short-lived workers included.

    Ray ends a job's workers when its driver disconnects, and their parent does not
    account for them, so the processes are sampled every ``interval`` s in a thread
    (its own CPU time is left out of the driver's): each one's last value counts.
    """

    def __init__(self, sessions: Iterable[int], interval: float = 0.1) -> None:
        self.sessions, self.interval = set(sessions), interval
        self.base = _session_ticks(self.sessions)
        self.last = dict(self.base)
        self.own_cpu = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        c0 = time.thread_time()
        while not self._stop.wait(self.interval):
            self.last.update(_session_ticks(self.sessions))
        self.own_cpu = time.thread_time() - c0

    def stop(self) -> dict[str, float]:
        """The cluster's CPU seconds since the start, by process name (Ray's process titles)."""
        self._stop.set()
        self._thread.join()
        self.last.update(_session_ticks(self.sessions))
        out: dict[str, float] = {}
        for pid, (ticks, name) in self.last.items():
            spent = (ticks - self.base.get(pid, (0, ""))[0]) / os.sysconf("SC_CLK_TCK")
            out[name] = out.get(name, 0.0) + spent
        return out


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine have been busy (``/proc/stat``), everyone's."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def driver_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def ray_imports_from(address: str) -> str:
    """Where a task on the cluster imports ``dunet_deploy`` from (PYTHONPATH check)."""
    import ray

    ray.init(address=address, log_to_driver=False)
    try:
        @ray.remote
        def where() -> str:
            import dunet_deploy

            return str(dunet_deploy.__file__)

        return str(ray.get(where.remote()))
    finally:
        ray.shutdown()


def one_run(path: str, model: Path, inputs: Sequence[str], out: Path,
            cluster: RayCluster, ray_cpus: tuple[float, float]) -> dict[str, Any]:
    """One whole run; its wall and CPU seconds, and the costs measured per case."""
    first: list[float] = []

    def finished(_result: Any) -> None:
        if not first:
            first.append(time.time())

    run = RayRun()
    on_ray = path.startswith("ray-")
    # in-process: this process and its --workers processes (run it as a session leader,
    # ``setsid``, so that nothing else is counted)
    sampler = ClusterCpu(cluster.sessions if on_ray else (os.getsid(0),))
    c0, busy0 = driver_cpu_s(), machine_busy_s()
    e0, t0 = time.time(), time.perf_counter()
    if on_ray:
        summary = segment_on_ray(model, inputs, out, None,
                                 ClusterOptions(address=cluster.address,
                                                cpus_per_actor=ray_cpus[0],
                                                cpus_per_task=ray_cpus[1],
                                                layout=path.removeprefix("ray-")),
                                 runner_factory=StandInRunner, on_result=finished, run=run)
        assert summary["ray"]["layout"] == path.removeprefix("ray-")
    else:
        with Segmenter(model, runner_factory=StandInRunner) as seg:
            workers = int(path.removeprefix(BASELINE).removeprefix("-w") or 0)
            summary = seg.predict_files(inputs, out, workers=workers, on_result=finished)
    wall = time.perf_counter() - t0
    cpu, busy = driver_cpu_s() - c0, machine_busy_s() - busy0
    by_process = sampler.stop()  # (then its thread's own CPU time is known)
    if on_ray:
        by_process["driver"] = cpu - sampler.own_cpu
    else:
        by_process = {"driver and workers": sum(by_process.values()) - sampler.own_cpu}
    cpu = sum(by_process.values())
    assert summary["ok"] == len(inputs), summary["failed"]
    rec: dict[str, Any] = {
        "path": path, "volumes": len(inputs), "wall_s": wall, "core_s": cpu,
        "core_s_by_process": by_process,
        "others_core_s": busy - cpu,  # the machine's other load meanwhile (it is shared)
        "first_case_s": first[0] - e0,
        "case_times": {k: statistics.mean(c["times"][k] for c in summary["cases"])
                       for k in CASE_TIMES}}
    if on_ray:
        rec["actors"] = summary["ray"]["actors"]
        rec["stages"] = {s: [statistics.mean(t[s][i] for t in run.timing.values())
                             for i in range(3)] for s in TIMED_STAGES}
        rec["prepared_before_first_case"] = sum(t["prepare"][3] <= first[0]
                                                for t in run.timing.values())
        # how long the read/write tasks (split) ran their stage code, in all
        rec["task_s"] = sum(t[s][0] for t in run.timing.values() for s in ("prepare", "write"))
    shutil.rmtree(out)
    return rec


def med(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=32, help="N (runs of N and 2N volumes)")
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--distinct", type=int, default=8,
                    help="distinct synthetic volumes written; the rest are copies of them")
    ap.add_argument("--nodes", type=int, choices=sorted(NODES), default=2,
                    help="the loopback cluster: 2 nodes with one CPU each, or 1 node with two")
    ap.add_argument("--layouts", default="fused,split",
                    help="the Ray layouts measured, comma-separated (fused, split)")
    ap.add_argument("--also-workers", type=int, nargs="*", default=[],
                    help="also in-process with these worker counts (paths in-process-wK)")
    ap.add_argument("--ray-cpus", default="1:1",
                    help="ACTOR_CPUS:TASK_CPUS, the CPUs each actor / each task holds")
    ap.add_argument("--net-seconds", nargs="+", type=float, default=[0.05, 0.25, 1.0],
                    help="network seconds per volume on one GPU actor, for the projection")
    ap.add_argument("--out", type=Path,
                    default=Path("benchmarks/results/2026-12-06-amd-epyc-zen3-2c"))
    ap.add_argument("--name", help="the reports' file name (default: by --nodes)")
    ap.add_argument("--from-json", type=Path,
                    help="write the report again from this ray_overhead.json (no runs)")
    args = ap.parse_args()
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        md = report(doc, doc.get("projection", {}).get("net_seconds", args.net_seconds))
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.name or NODES[doc.get("nodes", 2)][0]
        atomic_write_bytes(args.out / f"{stem}.md", md.encode())
        print(md)
        return
    if os.getsid(0) != os.getpid():
        try:
            os.setsid()  # in-process CPU time = this session's processes
        except OSError:
            print("warning: not a session leader (run under setsid): the in-process CPU "
                  "seconds count every process of the caller's session", file=sys.stderr)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # (the cluster's workers inherit it)
    ray_cpus = (float(args.ray_cpus.split(":")[0]), float(args.ray_cpus.split(":")[1]))
    n = args.volumes
    paths_run = ([BASELINE] + [f"{BASELINE}-w{w}" for w in args.also_workers]
                 + [f"ray-{layout}" for layout in args.layouts.split(",")])
    runs: list[dict[str, Any]] = []
    load_start = list(os.getloadavg())
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dunet-ray-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        spec = pipeline_spec(ATLAS_SHAPE)
        distinct = write_volumes(work / "v", min(args.distinct, 2 * n), spec.volume_shape)["int16"]
        (work / "in").mkdir()
        paths = []
        for i in range(2 * n):  # copies: the same bytes, each its own case and output name
            dest = work / "in" / f"case_{i:03d}.nii.gz"
            shutil.copyfile(distinct[i % len(distinct)], dest)
            paths.append(str(dest))
        model = write_standin_onnx(work / "standin.onnx", spec)
        # Ray's default store, as users run
        cluster = start_cluster(stack, object_store_mb=None, nodes=args.nodes)
        imports_from = ray_imports_from(cluster.address)
        print(f"cluster up; tasks import dunet_deploy from {imports_from}", flush=True)
        for path in paths_run:  # warm-up (page cache, imports), not recorded
            one_run(path, model, paths[:4], work / "warm", cluster, ray_cpus)
        for r in range(args.repeat):
            order = [(p, size) for size in (n, 2 * n) for p in paths_run]
            for path, size in (order if r % 2 == 0 else order[::-1]):
                rec = one_run(path, model, paths[:size], work / "out", cluster, ray_cpus)
                rec["repeat"] = r
                runs.append(rec)
                print(f"repeat {r} {path} {size}: {rec['wall_s']:.2f} s, "
                      f"{rec['core_s']:.1f} core-s, first case after {rec['first_case_s']:.1f} s"
                      + (f", {rec['prepared_before_first_case']} prepared by then"
                         if path.startswith("ray-") else ""), flush=True)
    total_s = time.perf_counter() - t_start
    doc = analyse(runs, n, args.repeat, paths_run)
    doc["others_cores"] = sum(r["others_core_s"] for r in runs) / sum(r["wall_s"] for r in runs)
    doc.update({"volumes": n, "repeat": args.repeat, "distinct_volumes": args.distinct,
                "nodes": args.nodes,
                "ray_cpus": list(ray_cpus), "runs": runs, "benchmark_s": total_s,
                "ray_tasks_import_from": imports_from, "machine": machine_info(),
                "loadavg": {"start": load_start, "end": list(os.getloadavg())}})
    md = report(doc, args.net_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or NODES[args.nodes][0]
    write_json(args.out / f"{stem}.json", doc)
    atomic_write_bytes(args.out / f"{stem}.md", md.encode())
    print(md)


def analyse(runs: list[dict[str, Any]], n: int, repeat: int,
            paths_run: Sequence[str]) -> dict[str, Any]:
    """Rates by difference, start-up, core-s per volume; for each Ray layout its stages' costs."""
    by = {(r["path"], r["volumes"], r["repeat"]): r for r in runs}

    def diff(path: str, value: Any) -> float:
        """Median over the repeats of (value(2N run) − value(N run)) ÷ N."""
        return med((value(by[(path, 2 * n, rep)]) - value(by[(path, n, rep)])) / n
                   for rep in range(repeat))

    paths: dict[str, Any] = {}
    for path in paths_run:
        rates = [n / (by[(path, 2 * n, rep)]["wall_s"] - by[(path, n, rep)]["wall_s"])
                 for rep in range(repeat)]
        walls = {size: [by[(path, size, rep)]["wall_s"] for rep in range(repeat)]
                 for size in (n, 2 * n)}
        cases = [r for r in runs if r["path"] == path]
        paths[path] = {
            "rates": rates, "rate": med(rates),
            "startup_s": [w - n / rate for w, rate in zip(walls[n], rates)],
            "core_s_per_volume": [(by[(path, 2 * n, rep)]["core_s"]
                                   - by[(path, n, rep)]["core_s"]) / n for rep in range(repeat)],
            "wall_s": {str(k): v for k, v in walls.items()},
            "overall_rate": {str(k): k / med(v) for k, v in walls.items()},
            "case_times": {k: statistics.mean(r["case_times"][k] for r in cases)
                           for k in CASE_TIMES}}
        paths[path]["startup"] = med(paths[path]["startup_s"])
        paths[path]["core_s"] = med(paths[path]["core_s_per_volume"])
        if not path.startswith("ray-"):
            continue
        ray = paths[path]
        ray["actors"] = cases[0]["actors"]
        ray["stages"] = {s: dict(zip(("wall", "cpu", "pickle"),
                                     (statistics.mean(r["stages"][s][i] for r in cases)
                                      for i in range(3))))
                         for s in TIMED_STAGES}
        ray["ray_own_core_s"] = ray["core_s"] - sum(ray["stages"][s]["cpu"]
                                                    for s in TIMED_STAGES)
        names = {k for r in cases for k in r["core_s_by_process"]}
        ray["core_s_by_process"] = {
            name: diff(path, lambda r, name=name: r["core_s_by_process"].get(name, 0.0))
            for name in sorted(names)}
        ray["task_s_per_volume"] = diff(path, lambda r: r["task_s"])
        ray["prepared_before_first_case"] = {
            str(size): [r["prepared_before_first_case"] for r in cases if r["volumes"] == size]
            for size in (n, 2 * n)}
        ratio = [a / b for a, b in zip(ray["rates"], paths[BASELINE]["rates"])]
        ray["overhead"] = 1 - ray["rate"] / paths[BASELINE]["rate"]
        ray["overhead_per_repeat"] = [1 - x for x in ratio]
        ray["extra_core_s"] = ray["core_s"] / paths[BASELINE]["core_s"] - 1
        ray["overhead_against"] = {k: 1 - ray["rate"] / v["rate"] for k, v in paths.items()
                                   if k.startswith(f"{BASELINE}-w")}
    return {"paths": paths}


def projection(doc: dict[str, Any], net_seconds: Sequence[float]
               ) -> tuple[list[str], dict[str, float]]:
    """Rows of the M cores × N GPU actors table, from the split layout's costs measured in Ray."""
    ray = doc["paths"]["ray-split"]
    st = ray["stages"]
    cpu = {"read+preprocess": st["prepare"]["cpu"], "postprocess+write": st["write"]["cpu"],
           "Ray's own work": max(ray["ray_own_core_s"], 0.0)}
    c_host = sum(cpu.values())
    actor_s = st["infer"]["wall"]  # the actor's host part per volume (stand-in network)
    per_actor = doc["ray_cpus"][0]
    rows = []
    for cores in (2, 8, 32, 128):
        for actors in (1, 4, 8):
            free = cores - actors * per_actor
            cells = []
            for t_net in net_seconds:
                if free <= 0:
                    cells.append("—")
                    continue
                cpu_rate, net_rate = free / c_host, actors / (actor_s + t_net)
                limit = (f"CPU: {max(cpu, key=cpu.__getitem__)}" if cpu_rate < net_rate
                         else "GPU actors")
                cells.append(f"{min(cpu_rate, net_rate):.1f} ({limit})")
            rows.append(f"| {cores} | {actors} | " + " | ".join(cells) + " |\n")
    return rows, {"c_host": c_host, "actor_s": actor_s, "read+preprocess": cpu["read+preprocess"],
                  "postprocess+write": cpu["postprocess+write"], "ray_own": cpu["Ray's own work"],
                  "here": (2 - per_actor) / c_host}


def _join(xs: Sequence[float], fmt: str = ".2f") -> str:
    return ", ".join(f"{x:{fmt}}" for x in xs)


def _header(doc: dict[str, Any]) -> str:
    m, n = doc["machine"], doc["volumes"]
    _stem, nodes, _ = NODES[doc["nodes"]]
    return (
        "# Ray's overhead by layout (stand-in model), by difference\n\n"
        f"CPU: {m['cpu_model']} family {m['cpu_family']} model {m['cpu_model_id']} (Zen 3; "
        f"flags {' '.join(m['cpu_flags'])}), {m.get('cores')} cores. Volumes 197x233x189 int16 "
        f".nii.gz ({doc['distinct_volumes']} distinct, the rest copies), zero-cost stand-in "
        f"model, save_prob off. Whole runs of N = {n} and 2N = {2 * n} volumes on each path, "
        f"{doc['repeat']} interleaved repeats. in-process: `predict_files(workers=0)`, "
        f"`dunet-infer`'s default on this machine (in-process-wK: `workers=K`). Ray: {nodes}, "
        f"Ray's default object store, "
        f"started before the runs; each run connects, plans, starts its actors and "
        f"disconnects, as `dunet-infer --ray` does; `ray-fused`: one whole-case actor per CPU "
        f"(the default without GPUs), `ray-split`: read/write tasks around one model actor "
        f"(the default with GPUs; CPUs per actor:task {doc['ray_cpus'][0]:g}:"
        f"{doc['ray_cpus'][1]:g}). Ray's workers imported dunet_deploy from "
        f"`{doc['ray_tasks_import_from']}`. Load average {doc['loadavg']['start'][0]:.2f} -> "
        f"{doc['loadavg']['end'][0]:.2f}; other processes on the machine (it is shared) used "
        f"{doc['others_cores']:.2f} of the 2 cores on average during the timed runs; the "
        f"benchmark took {doc['benchmark_s'] / 60:.1f} min.\n\n"
        "rate = N ÷ (T(2N) − T(N)) (steady state); start-up = T(N) − N ÷ rate; core-s per "
        "volume = (C(2N) − C(N)) ÷ N, C = CPU seconds of the driver and of every process of "
        "the cluster.\n\n")


def _rates_table(doc: dict[str, Any]) -> str:
    n, p = doc["volumes"], doc["paths"]
    return (
        "| path | actors | volumes/s (median) | per repeat | start-up s | core-s per volume | "
        f"T({n}) s | T({2 * n}) s | volumes/s overall, {n} / {2 * n} |\n"
        "|---|---:|---:|---|---:|---:|---|---|---|\n"
        + "".join(
            f"| {k} | {v.get('actors', '')} | {v['rate']:.3f} | {_join(v['rates'], '.3f')} | "
            f"{v['startup']:.1f} | {v['core_s']:.3f} | {_join(v['wall_s'][str(n)])} | "
            f"{_join(v['wall_s'][str(2 * n)])} | {v['overall_rate'][str(n)]:.2f} / "
            f"{v['overall_rate'][str(2 * n)]:.2f} |\n"
            for k, v in p.items())
        + "\n")


def _overheads(doc: dict[str, Any]) -> str:
    p = doc["paths"]
    lines = []
    for k, v in p.items():
        if not k.startswith("ray-"):
            continue
        cohort = v["startup"] + 1000 / v["rate"]
        per_repeat = _join([100 * x for x in v["overhead_per_repeat"]], ".0f")
        read = _join(v["prepared_before_first_case"][str(doc["volumes"])], "d")
        base = p[BASELINE]["startup"] + 1000 / p[BASELINE]["rate"]
        lines.append(
            f"- **{k}: Ray's steady-state overhead {100 * v['overhead']:.0f} %** (1 − Ray ÷ "
            f"in-process rate; per repeat {per_repeat} %); CPU per volume "
            f"{100 * v['extra_core_s']:+.0f} % against in-process; a 1,000-volume cohort "
            f"{cohort:.0f} s (in-process {base:.0f} s). Volumes read when the first case "
            f"finished: {read} ({doc['volumes']}-volume runs)."
            + "".join(f" Against {other}: {100 * x:.0f} %."
                      for other, x in v.get("overhead_against", {}).items()))
    return "\n".join(lines) + "\n\n"


def _stages_table(doc: dict[str, Any]) -> str:
    p = doc["paths"]
    ray_paths = [k for k in p if k.startswith("ray-")]
    where = {"prepare": ("read + preprocess", "task"), "infer": ("network (stand-in)", "actor"),
             "write": ("postprocess + write", "task")}
    out = ("## Per-stage costs, measured inside Ray's tasks and actors (mean per volume)\n\n"
           "wall s / CPU s of its thread / of the wall, pickling s. In `ray-fused` every stage "
           "runs in the actor.\n\n"
           "| stage | " + " | ".join(ray_paths) + " |\n|---|" + "---:|" * len(ray_paths) + "\n")
    for stage in TIMED_STAGES:
        name, split_where = where[stage]
        out += f"| {name} (split: {split_where}) | " + " | ".join(
            "{wall:.3f} / {cpu:.3f} / {pickle:.3f}".format(**p[k]["stages"][stage])
            for k in ray_paths) + " |\n"
    out += ("| Ray's own work, CPU s (core-s on Ray − the stages' CPU) | "
            + " | ".join(f"{p[k]['ray_own_core_s']:.3f}" for k in ray_paths) + " |\n\n")
    for k in ray_paths:
        out += (f"Core-s per volume by process, {k} (by difference; `ray::IDLE` and "
                "`ray::MapWorker` as the processes were last seen): "
                + ", ".join(f"{name} {v:.3f}" for name, v in sorted(
                    p[k]["core_s_by_process"].items(), key=lambda kv: -kv[1]) if abs(v) >= 0.005)
                + ".\n\n")
    out += ("The cases' own stage times (wall s, mean per volume): "
            + "; ".join(f"{k}: " + ", ".join(f"{s} {v['case_times'][s]:.3f}" for s in CASE_TIMES)
                        for k, v in p.items()) + ".\n\n")
    return out


def _projection(doc: dict[str, Any], net_seconds: Sequence[float]) -> str:
    p = doc["paths"]
    out = "## Projection: volumes/s with M CPU cores and N GPU actors\n\n"
    if "ray-fused" in p:
        fused = p["ray-fused"]
        out += (f"Without GPUs (`ray-fused`, every CPU an actor) the CPUs limit: M ÷ "
                f"{fused['core_s']:.3f} core-s per volume (measured here: "
                f"{2 / fused['core_s']:.2f} volumes/s from the formula, {fused['rate']:.2f} "
                f"run), plus what the network costs on a CPU (zero for the stand-in).\n\n")
    if "ray-split" not in p:
        return out
    rows, proj = projection(doc, net_seconds)
    doc["projection"] = {**proj, "net_seconds": list(net_seconds)}
    split = p["ray-split"]
    _stem, nodes, _ = NODES[doc["nodes"]]
    return out + (
        f"With GPU actors (`ray-split`): min((M − N × {doc['ray_cpus'][0]:g} CPU per actor) ÷ "
        f"{proj['c_host']:.3f} core-s, N ÷ ({proj['actor_s']:.3f} s + t_net)). The host needs, "
        f"per volume, the CPU seconds measured above: read+preprocess "
        f"{proj['read+preprocess']:.3f}, postprocess+write {proj['postprocess+write']:.3f} and "
        f"Ray's own work {proj['ray_own']:.3f} (sum {proj['c_host']:.3f}); each actor holds one "
        f"CPU and spends {proj['actor_s']:.3f} s of host work per volume besides the network. "
        "t_net (one actor's network seconds per volume) is a sweep value: no GPU was measured. "
        "The limiting stage is in brackets (for CPU, the largest share of the host's work). "
        f"For this machine (M = 2, N = 1, t_net ≈ 0) the formula gives {proj['here']:.2f} "
        f"volumes/s; measured: {split['rate']:.2f}. Ray's own work depends on the layout it "
        f"was measured on ({nodes}).\n\n"
        "| M cores | N actors | " + " | ".join(f"t_net {t:g} s" for t in net_seconds)
        + " |\n|---:|---:|" + "---:|" * len(net_seconds) + "\n" + "".join(rows))


def report(doc: dict[str, Any], net_seconds: Sequence[float]) -> str:
    return (_header(doc) + _rates_table(doc) + _overheads(doc) + _stages_table(doc)
            + _projection(doc, net_seconds))


if __name__ == "__main__":
    main()
