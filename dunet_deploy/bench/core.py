"""Timing, statistics, memory and the records of a benchmark run (torch-free).

Everything here is plain Python + numpy so the statistics and the ratio
arithmetic can be unit-tested without a model. The definitions used in every
table of ``bench.md``:

* latency: wall time of one ``infer`` call on a batch (device synchronised);
* ``ms_per_slab_p50`` = ``latency_ms_p50 / batch_size``;
* ``slabs_per_s`` = ``1000 * batch_size / latency_ms_p50``;
* ``volumes_per_s`` = ``slabs_per_s / 189`` (ATLAS volumes have 189 axial slices);
* ``gflops_achieved`` = ``gflop_per_slab * slabs_per_s``;
* ``pct_of_peak`` = ``100 * gflops_achieved / peak_gflops`` where the peak is the
  matmul peak measured in the same run at the same precision on the same device.
"""

from __future__ import annotations

import math
import platform
import re
import resource
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.choices import BENCH_BACKENDS, BENCH_PRECISIONS
from dunet_deploy.machine import cpu_features, machine_info

__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "SLABS_PER_VOLUME",
    "LatencyStats",
    "Record",
    "RssMonitor",
    "Skip",
    "TimingResult",
    "compute_ratios",
    "cpu_features",
    "dunet_vs_unet3d",
    "e2e_ratio",
    "machine_info",
    "make_record",
    "percentile",
    "slug",
    "summarize",
    "time_callable",
    "vs_torch_eager",
]

#: Axial slices of an ATLAS R1.1 volume: one slab per slice.
SLABS_PER_VOLUME = 189
#: Backends ``dunet-bench`` knows, in report order.
BACKENDS = BENCH_BACKENDS
PRECISIONS = BENCH_PRECISIONS
#: The runtime issue's goal for end-to-end volume time over pure model time.
E2E_GOAL = 1.15


# --------------------------------------------------------------------------- statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics.

    This is numpy's default (``method="linear"``): for ``n`` sorted values the
    position is ``q/100 * (n - 1)``.

    Raises:
        ValueError: for an empty sequence or ``q`` outside [0, 100].
    """
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q={q} outside [0, 100]")
    xs = sorted(float(v) for v in values)
    pos = q / 100.0 * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of a list of latencies in milliseconds."""

    n: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float


def summarize(latencies_ms: Sequence[float]) -> LatencyStats:
    """Percentiles, mean, spread of ``latencies_ms``.

    Raises:
        ValueError: for an empty sequence or a non-finite latency.
    """
    if len(latencies_ms) == 0:
        raise ValueError("no latencies to summarise")
    arr = np.asarray(latencies_ms, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("non-finite latency")
    return LatencyStats(
        n=int(arr.size),
        mean=float(arr.mean()),
        std=float(arr.std()),
        min=float(arr.min()),
        max=float(arr.max()),
        p50=percentile(latencies_ms, 50),
        p95=percentile(latencies_ms, 95),
        p99=percentile(latencies_ms, 99),
    )


# --------------------------------------------------------------------------- timing
@dataclass
class TimingResult:
    """Latencies of the timed iterations and how many warm-ups ran."""

    latencies_ms: list[float]
    warmup_done: int


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int,
    iters: int,
    sync: Callable[[], None] | None = None,
    time_budget_s: float | None = None,
    min_iters: int = 2,
    expected_call_s: float | None = None,
) -> TimingResult:
    """Run ``fn`` up to ``warmup`` times untimed, then time up to ``iters`` calls.

    Args:
        fn: one inference call.
        warmup: untimed calls first (allocations, kernel selection, JIT).
        iters: timed calls (the most; see ``time_budget_s``).
        sync: called after ``fn`` inside the timed region so asynchronous
            devices are finished (``torch.cuda.synchronize``); ``None`` on CPU.
            The wall clock around ``fn`` + ``sync`` is what a caller waits.
        time_budget_s: a call (warm-up or timed) is started only if it is
            expected to end within this many seconds of the start, judged by
            the previous call's duration; ``min_iters`` timed calls always run.
            Slow models on small CPUs would otherwise run for hours.
        min_iters: timed calls that run whatever the budget.
        expected_call_s: duration of one call guessed by the caller (e.g. from
            the previous batch size) for the budget check before the first
            call; without it the first warm-up always runs.

    Returns:
        The per-call latencies in milliseconds and the warm-ups done.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    start = time.perf_counter()
    last = expected_call_s

    def fits() -> bool:
        if time_budget_s is None:
            return True
        return time.perf_counter() - start + (last or 0.0) <= time_budget_s

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - t0

    done = 0
    for _ in range(warmup):
        if not fits():
            break
        last = timed()
        done += 1
    lat: list[float] = []
    for i in range(iters):
        if i >= min_iters and not fits():
            break
        last = timed()
        lat.append(last * 1e3)
    return TimingResult(lat, done)


# --------------------------------------------------------------------------- memory
def _read_status_kb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _ru_maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 1024.0 / (1024.0 if platform.system() == "Darwin" else 1.0)


class RssMonitor:
    """Peak resident set size of this process over a region of code.

    On Linux writing ``5`` to ``/proc/self/clear_refs`` resets the high-water
    mark ``VmHWM`` to the current RSS, so each record gets its own peak. Where
    that is not possible the lifetime peak (``getrusage``) is reported and
    :attr:`method` says so.
    """

    def __init__(self) -> None:
        self.method = "VmHWM" if self._can_reset() else "ru_maxrss"

    @staticmethod
    def _can_reset() -> bool:
        if _read_status_kb("VmHWM") is None:
            return False
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        """Start a new region (resets the high-water mark where possible)."""
        if self.method == "VmHWM":
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.method = "ru_maxrss"

    def peak_mb(self) -> float:
        """Peak RSS in MiB since the last :meth:`reset` (lifetime peak as fallback)."""
        if self.method == "VmHWM":
            kb = _read_status_kb("VmHWM")
            if kb is not None:
                return kb / 1024.0
        return _ru_maxrss_mb()


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Skip:
    """A combination that was not measured, and why."""

    model: str
    backend: str
    precision: str
    reason: str
    batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``batch_size`` omitted when the whole combination is skipped)."""
        d = asdict(self)
        if d["batch_size"] is None:
            del d["batch_size"]
        return d


@dataclass
class Record:
    """One measured model × backend × precision × batch size."""

    model: str
    backend: str
    precision: str
    batch_size: int
    device: str
    image_size: int
    in_channels: int
    threads: int
    iters: int
    warmup: int
    latency_ms_mean: float
    latency_ms_min: float
    latency_ms_max: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    ms_per_slab_p50: float
    slabs_per_s: float
    volumes_per_s: float
    gflop_per_slab: float | None
    gflops_achieved: float | None
    peak_gflops: float | None
    peak_precision: str | None
    pct_of_peak: float | None
    rss_mb: float | None
    rss_method: str | None = None
    gpu_mem_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def set_peak(self, peak_gflops: float) -> None:
        """Replace the peak (e.g. by a later, higher measurement) and recompute ``pct_of_peak``."""
        self.peak_gflops = peak_gflops
        if self.gflops_achieved is not None and peak_gflops > 0:
            self.pct_of_peak = 100.0 * self.gflops_achieved / peak_gflops

    def to_dict(self) -> dict[str, Any]:
        """JSON form; floats rounded for readability, ``None`` where not measured."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = _round(v)
        return d


def _round(x: float) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    # Six significant digits: enough for every ratio recomputed from the JSON.
    return float(f"{x:.6g}")


def make_record(
    *,
    model: str,
    backend: str,
    precision: str,
    batch_size: int,
    device: str,
    image_size: int,
    in_channels: int,
    threads: int,
    warmup: int,
    latencies_ms: Sequence[float],
    gflop_per_slab: float | None,
    peak_gflops: float | None,
    peak_precision: str | None,
    rss_mb: float | None,
    rss_method: str | None = None,
    gpu_mem_mb: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Record:
    """Build a :class:`Record`, deriving throughput and work figures from the latencies.

    Derived quantities follow the module docstring; work figures are ``None``
    when the FLOP count or the peak is unknown.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    st = summarize(latencies_ms)
    slabs_per_s = 1000.0 * batch_size / st.p50
    achieved = gflop_per_slab * slabs_per_s if gflop_per_slab is not None else None
    pct = (
        100.0 * achieved / peak_gflops
        if achieved is not None and peak_gflops is not None and peak_gflops > 0
        else None
    )
    return Record(
        model=model,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        device=device,
        image_size=image_size,
        in_channels=in_channels,
        threads=threads,
        iters=st.n,
        warmup=warmup,
        latency_ms_mean=st.mean,
        latency_ms_min=st.min,
        latency_ms_max=st.max,
        latency_ms_p50=st.p50,
        latency_ms_p95=st.p95,
        latency_ms_p99=st.p99,
        ms_per_slab_p50=st.p50 / batch_size,
        slabs_per_s=slabs_per_s,
        volumes_per_s=slabs_per_s / SLABS_PER_VOLUME,
        gflop_per_slab=gflop_per_slab,
        gflops_achieved=achieved,
        peak_gflops=peak_gflops,
        peak_precision=peak_precision,
        pct_of_peak=pct,
        rss_mb=rss_mb,
        rss_method=rss_method,
        gpu_mem_mb=gpu_mem_mb,
        extra=dict(extra or {}),
    )


# --------------------------------------------------------------------------- ratios
def _get(r: Record | Mapping[str, Any], key: str) -> Any:
    return r[key] if isinstance(r, Mapping) else getattr(r, key)


def _best(records: Iterable[Record | Mapping[str, Any]]) -> dict[tuple[str, str, str], Any]:
    """Per (model, backend, precision): the record with the lowest ms per slab."""
    best: dict[tuple[str, str, str], Any] = {}
    for r in records:
        key = (_get(r, "model"), _get(r, "backend"), _get(r, "precision"))
        if key not in best or _get(r, "ms_per_slab_p50") < _get(best[key], "ms_per_slab_p50"):
            best[key] = r
    return best


def dunet_vs_unet3d(
    records: Iterable[Record | Mapping[str, Any]],
    numerator: str = "dunet",
    denominator: str = "unet3d",
) -> list[dict[str, Any]]:
    """D-UNet / 3D UNet per-slab latency on each backend × precision, best batch of each.

    A ratio below 1 means D-UNet is cheaper; the target is ≤ 0.25.
    """
    best = _best(records)
    out = []
    for (model, backend, precision), r in best.items():
        if model != numerator or (denominator, backend, precision) not in best:
            continue
        d = best[(denominator, backend, precision)]
        out.append(
            {
                "backend": backend,
                "precision": precision,
                f"{numerator}_ms_per_slab": _get(r, "ms_per_slab_p50"),
                f"{numerator}_batch_size": _get(r, "batch_size"),
                f"{denominator}_ms_per_slab": _get(d, "ms_per_slab_p50"),
                f"{denominator}_batch_size": _get(d, "batch_size"),
                "ratio": _get(r, "ms_per_slab_p50") / _get(d, "ms_per_slab_p50"),
            }
        )
    return sorted(out, key=lambda e: (_order(BACKENDS, e["backend"]), e["precision"]))


def vs_torch_eager(records: Iterable[Record | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each non-torch backend against torch eager, same model and precision, best batches.

    ``speedup`` = torch ms per slab / backend ms per slab (> 1: the backend is faster).
    """
    best = _best(records)
    out = []
    for (model, backend, precision), r in best.items():
        ref = best.get((model, "torch", precision))
        if backend == "torch" or ref is None:
            continue
        out.append(
            {
                "model": model,
                "backend": backend,
                "precision": precision,
                "backend_ms_per_slab": _get(r, "ms_per_slab_p50"),
                "backend_batch_size": _get(r, "batch_size"),
                "torch_ms_per_slab": _get(ref, "ms_per_slab_p50"),
                "torch_batch_size": _get(ref, "batch_size"),
                "speedup": _get(ref, "ms_per_slab_p50") / _get(r, "ms_per_slab_p50"),
            }
        )
    return sorted(
        out, key=lambda e: (e["model"], _order(BACKENDS, e["backend"]), e["precision"])
    )


def e2e_ratio(pipeline_s: float, model_s: float, goal: float = E2E_GOAL) -> dict[str, Any]:
    """End-to-end volume time over pure model time and whether it meets ``goal``."""
    if pipeline_s <= 0 or model_s <= 0:
        raise ValueError("times must be positive")
    ratio = pipeline_s / model_s
    return {"pipeline_s": pipeline_s, "model_s": model_s, "ratio": ratio, "goal": goal,
            "meets_goal": ratio <= goal}


def compute_ratios(
    records: Iterable[Record | Mapping[str, Any]], e2e: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The ``ratios`` section of ``bench.json``."""
    recs = list(records)
    return {
        "dunet_vs_unet3d": dunet_vs_unet3d(recs),
        "vs_torch_eager": vs_torch_eager(recs),
        "e2e": [dict(e) for e in e2e],
    }


def _order(seq: Sequence[str], item: str) -> int:
    return seq.index(item) if item in seq else len(seq)


# --------------------------------------------------------------------------- machine
def slug(text: str) -> str:
    """A folder-name-safe lower-case slug: ``"AMD EPYC 9B45"`` -> ``"amd-epyc-9b45"``."""
    s = re.sub(r"\((r|tm)\)", "", text.lower())
    s = re.sub(r"(cpu|processor|\d+-core)", " ", s)
    s = re.sub(r"@.*$", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"
