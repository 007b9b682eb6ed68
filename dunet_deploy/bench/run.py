"""One ``dunet-bench`` run: peaks, records, ratios; ``bench.json`` rewritten after each record."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from dunet_deploy.bench.config import BenchConfig, validate_config
from dunet_deploy.bench.core import Record, RssMonitor, Skip, compute_ratios, machine_info
from dunet_deploy.bench.measure import Deadline, bench_model

__all__ = ["bench_document", "run_bench", "write_partial"]

Log = Callable[[str], None]


def _gpu_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def bench_document(
    cfg: BenchConfig, *, started: str, wall_s: float, command: str, machine: dict[str, Any],
    peaks: dict[str, dict[str, Any]], records: list[Record], e2e_rows: list[dict[str, Any]],
    skipped: list[Skip], complete: bool,
) -> dict[str, Any]:
    """The ``bench.json`` document (``complete`` is false while the run is still going)."""
    return {
        "format": "dunet-bench",
        "format_version": 1,
        "complete": complete,
        "started": started,
        "wall_s": round(wall_s, 1),
        "command": command,
        "config": {**asdict(cfg), "peak_sizes": list(cfg.peak_sizes or []) or None,
                   "models": list(cfg.models), "backends": list(cfg.backends),
                   "precisions": list(cfg.precisions), "batch_sizes": list(cfg.batch_sizes)},
        "machine": machine,
        "peak": peaks,
        "records": [r.to_dict() for r in records],
        "ratios": compute_ratios(records, e2e_rows),
        "skipped": [s.to_dict() for s in skipped],
    }


def write_partial(out_dir: str | os.PathLike[str], doc: dict[str, Any]) -> Path:
    """Rewrite ``out_dir/bench.json`` atomically (a crash keeps what was measured)."""
    from dunet_deploy.artifacts import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", doc)
    return out / "bench.json"


def _final_peaks(cfg: BenchConfig, peaks: dict[str, dict[str, Any]], records: list[Record],
                 emit: Log) -> None:
    """The peak again at the end; the higher of the two is the ceiling for % of peak.

    A large drift means the machine was not quiet (other tenants, thermal
    limits); a burst of other work only ever lowers a figure.
    """
    from dunet_deploy.bench.peak import measure_peaks

    peaks_end, _ = measure_peaks(cfg.device, list(peaks), threads=cfg.threads,
                                 sizes=cfg.peak_sizes)
    for p, v in peaks_end.items():
        peaks[p]["gflops_at_start"] = peaks[p]["gflops"]
        peaks[p]["gflops_at_end"] = v["gflops"]
        if v["gflops"] > peaks[p]["gflops"]:
            peaks[p].update({k: v[k] for k in ("gflops", "library", "best_size", "by_size")})
        emit(f"  matmul peak {p} at the end: {v['gflops']:.1f} GFLOP/s; peak used: "
             f"{peaks[p]['gflops']:.1f} GFLOP/s")
    for r in records:
        if r.peak_precision in peaks:
            r.set_peak(peaks[r.peak_precision]["gflops"])


def run_bench(
    cfg: BenchConfig, out_dir: str | os.PathLike[str] | None = None, *,
    log: Log | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; write the outputs to ``out_dir`` if given.

    ``bench.json`` is rewritten (atomically) after every record and skip, so a
    crash or a kill keeps everything measured so far (``"complete": false``);
    ``bench.md`` and ``bench.png`` are written at the end.

    Args:
        cfg: what to measure.
        out_dir: folder for ``bench.json``, ``bench.md``, ``bench.png``.
        log: progress lines (default: stderr).
        command: the command line to record (default: ``sys.argv``).

    Returns:
        The ``bench.json`` document.

    Raises:
        DunetError: for an invalid configuration or an unusable device.
    """
    validate_config(cfg)
    deadline = Deadline(cfg.deadline_s)
    emit: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    import torch

    from dunet_deploy.bench.e2e import run_e2e
    from dunet_deploy.bench.peak import measure_peaks

    t_start = time.perf_counter()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    torch.set_num_threads(cfg.threads)
    machine = machine_info()
    if cfg.device == "cuda":
        machine["gpu"] = _gpu_info()
    emit(f"dunet-bench: {machine['cpu_model']}, {machine['cores']} cores, device {cfg.device}, "
         f"{cfg.threads} threads")
    peaks, skipped = measure_peaks(
        cfg.device, list(cfg.precisions), threads=cfg.threads, sizes=cfg.peak_sizes
    )
    for p, v in peaks.items():
        emit(f"  matmul peak {p}: {v['gflops']:.1f} GFLOP/s (n={v['best_size']})")
    records: list[Record] = []
    e2e_rows: list[dict[str, Any]] = []
    cmd = command if command is not None else shlex.join(sys.argv)

    def document(complete: bool) -> dict[str, Any]:
        return bench_document(cfg, started=started, wall_s=time.perf_counter() - t_start,
                              command=cmd, machine=machine, peaks=peaks, records=records,
                              e2e_rows=e2e_rows, skipped=skipped, complete=complete)

    def progress() -> None:
        if out_dir is not None:
            write_partial(out_dir, document(False))

    rss = RssMonitor()
    with tempfile.TemporaryDirectory(prefix="dunet-bench-") as tmp:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(tmp) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        for name in cfg.models:
            emit(f"{name}:")
            art = bench_model(cfg, name, cache, peaks, rss, records, skipped, emit,
                              deadline=deadline, on_record=progress)
            if cfg.e2e and name == cfg.e2e_model:
                if deadline.passed():
                    skipped.append(Skip(name, "(e2e)", "-", deadline.reason()))
                else:
                    rows, sk = run_e2e(cfg, art, records, Path(tmp), emit)
                    e2e_rows += rows
                    skipped += sk
                progress()
            del art
            gc.collect()
    if cfg.e2e and cfg.e2e_model not in cfg.models:
        skipped.append(Skip(cfg.e2e_model, "(e2e)", "-",
                            f"--e2e-model {cfg.e2e_model} is not among --models"))
    if deadline.passed():
        emit("  deadline reached: no second peak measurement")
    else:
        _final_peaks(cfg, peaks, records, emit)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc = document(True)
    if out_dir is not None:
        from dunet_deploy.bench.report import write_outputs

        paths = write_outputs(out_dir, doc)
        emit("wrote " + ", ".join(str(p) for p in paths.values()))
    return doc
