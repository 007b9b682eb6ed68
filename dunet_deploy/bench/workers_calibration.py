"""A short calibration of ``dunet-infer``'s default ``--workers`` on this machine.

No rule on the core count picks the best worker count on every CPU measured
(on 2 cores: 0 on an Intel Xeon and an AMD Zen 3, 3 on an AMD Zen 4), so
``dunet-infer --calibrate-workers`` measures it::

    for each repeat, each count (rotated order: load from other users falls on all alike):
        a child process runs predict_files(workers=count) on V full-size synthetic volumes
        with the zero-cost stand-in model (the host work that workers take over)
    best = the fastest count by median volumes/s, kept only if it beats the core
           rule's count by MARGIN (else the rule's count: within noise)
    -> runtime.workers.save_calibration(best): default_workers() returns it on this machine

Nothing here imports torch.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dunet_deploy.bench.pipeline_bench import (
    _run_child,
    pipeline_spec,
    write_standin_onnx,
    write_volumes,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.workers import default_workers, save_calibration
from dunet_deploy.spec import ATLAS_SHAPE

__all__ = ["CANDIDATES", "MARGIN", "calibrate_workers"]

#: Worker counts tried.
CANDIDATES = (0, 1, 2, 3)
#: A count other than the core rule's must be this much faster (median volumes/s) to be kept.
MARGIN = 0.05


def calibrate_workers(
    *,
    volumes: int = 4,
    repeat: int = 2,
    candidates: Sequence[int] = CANDIDATES,
    shape: Sequence[int] = ATLAS_SHAPE,
    work: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure each worker count and save the best as this machine's default.

    Args:
        volumes: Synthetic volumes per run (int16 ``.nii.gz``, ``shape``).
        repeat: Runs per count (interleaved).
        candidates: Worker counts to try (>= 0, at least two).
        shape: Volume shape (the ATLAS grid: what a real cohort costs).
        work: Scratch folder (default: a temporary one, removed after).
        log: Called with a line per run.

    Returns:
        ``{"workers": chosen, "rule": the core rule's count, "median": {count:
        volumes/s}, "runs": [...], "loadavg": [start, end], "volumes", "repeat",
        "shape", "path": the calibration file}``.

    Raises:
        DunetError: for fewer than two candidates, a negative one, or a run that fails.
    """
    counts = sorted({int(c) for c in candidates})
    if len(counts) < 2 or counts[0] < 0 or volumes < 1 or repeat < 1:
        raise DunetError(f"calibration: need >= 2 worker counts >= 0, volumes >= 1 and "
                         f"repeat >= 1 (got {list(candidates)}, {volumes}, {repeat})")
    if work is None:
        with tempfile.TemporaryDirectory(prefix="dunet-calibrate-") as tmp:
            return calibrate_workers(volumes=volumes, repeat=repeat, candidates=counts,
                                     shape=shape, work=Path(tmp), log=log)
    spec = pipeline_spec(shape)
    paths = write_volumes(work / "volumes", volumes, spec.volume_shape)["int16"]
    model = write_standin_onnx(work / "standin.onnx", spec)
    load = [os.getloadavg()[0]]
    runs: list[dict[str, Any]] = []
    for r in range(repeat):
        for w in counts[r % len(counts):] + counts[: r % len(counts)]:
            job = {"model": "standin", "model_path": str(model), "workers": w,
                   "inputs": [str(p) for p in paths], "out_dir": str(work / f"out_{r}_{w}"),
                   "backend": "auto", "threads": None, "batch_size": 16, "save_prob": False,
                   "tta": "none"}
            rate = float(_run_child(job)["volumes_per_s"])
            runs.append({"repeat": r, "workers": w, "volumes_per_s": rate})
            if log is not None:
                log(f"workers {w}: {rate:.3f} volumes/s")
    load.append(os.getloadavg()[0])
    median = {w: statistics.median(x["volumes_per_s"] for x in runs if x["workers"] == w)
              for w in counts}
    rule = default_workers(_rule_cores())
    best = max(median, key=lambda w: median[w])
    if rule in median and median[best] < median[rule] * (1 + MARGIN):
        best = rule  # within noise of the rule's choice
    measured = {"median": {str(w): round(v, 4) for w, v in median.items()}, "runs": runs,
                "loadavg": load, "volumes": volumes, "repeat": repeat, "shape": list(shape),
                "rule": rule}
    path = save_calibration(best, measured)
    return {"workers": best, **measured, "median": median, "path": str(path)}


def _rule_cores() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(n or 1)
