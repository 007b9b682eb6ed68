"""Timing every backend × precision × batch of one model (``dunet-bench``'s main loop)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.bench.config import BenchConfig, spec_for
from dunet_deploy.bench.core import Record, RssMonitor, Skip, make_record, time_callable
from dunet_deploy.errors import DunetError, one_line

__all__ = ["Deadline", "bench_model"]

Log = Callable[[str], None]


class Deadline:
    """The wall-clock cap of a run (``seconds=None``: none)."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._end = None if seconds is None else clock() + seconds

    def left(self) -> float | None:
        """Seconds left (``None`` without a cap; never below 0)."""
        return None if self._end is None else max(0.0, self._end - self._clock())

    def passed(self) -> bool:
        """Whether the cap has been reached."""
        left = self.left()
        return left is not None and left <= 0.0

    def reason(self) -> str:
        return f"deadline of {self.seconds:g} s reached before this was measured"


def _time_batch(
    cfg: BenchConfig, session: Any, x: np.ndarray, rss: RssMonitor, guess_s: float | None,
    budget_s: float | None,
) -> tuple[list[float], int] | str:
    """Warm up and time one batch; the latencies and warm-ups done, or why it failed.

    ``guess_s`` is the expected duration of one call (from the previous batch
    size of the same session) for the time budget.
    """
    try:
        session.prepare(len(x))
        session.reset_gpu_memory()
        rss.reset()
        res = time_callable(lambda: session.run(x), warmup=cfg.warmup, iters=cfg.iters,
                            sync=session.sync, time_budget_s=budget_s,
                            min_iters=cfg.min_iters, expected_call_s=guess_s)
    except (RuntimeError, MemoryError, DunetError) as exc:
        if cfg.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        return one_line(exc)
    return res.latencies_ms, res.warmup_done


def _budget(cfg: BenchConfig, deadline: Deadline) -> float | None:
    """Per-record time budget: the configured one, capped by what the deadline leaves."""
    left = deadline.left()
    if left is None:
        return cfg.time_budget_s
    return left if cfg.time_budget_s is None else min(cfg.time_budget_s, left)


def bench_model(
    cfg: BenchConfig, name: str, cache: Path, peaks: dict[str, dict[str, Any]],
    rss: RssMonitor, records: list[Record], skipped: list[Skip], log: Log,
    deadline: Deadline | None = None, on_record: Callable[[], None] = lambda: None,
) -> Any:
    """All backends × precisions × batches of one model; returns its artefacts.

    ``on_record`` is called after every record or skip (the run writes
    ``bench.json`` there); once ``deadline`` has passed the rest is skipped.
    """
    deadline = deadline or Deadline(None)
    import torch

    from dunet_deploy.bench.backends import (
        ModelArtifacts,
        Unavailable,
        backend_unavailable,
        open_session,
    )
    from dunet_deploy.models import create_model, model_info

    torch.manual_seed(cfg.seed)
    overrides = {} if cfg.base_filters is None else {"base_filters": cfg.base_filters}
    try:
        model = create_model(name, **overrides).eval()
    except ValueError as exc:
        raise DunetError(f"--models {name}: cannot build it with {overrides}: {exc}") from None
    channels = int(model_info(name).kwargs["in_channels"])
    spec = spec_for(name, cfg.image_size)
    art = ModelArtifacts(name, model, spec, cache, max(cfg.batch_sizes))
    s = cfg.image_size
    gflop: float | None = None
    try:
        from dunet_deploy.flops import count_flops

        gflop = count_flops(art.onnx(), (1, channels, s, s))["per_sample"] / 1e9
    except Exception as exc:  # export or count failed: time anyway, no work figures
        log(f"  {name}: no FLOP count ({one_line(exc)})")
    data = np.random.default_rng(cfg.seed).standard_normal(
        (max(cfg.batch_sizes), channels, s, s), dtype=np.float32)
    dev_kind = "cpu" if cfg.device == "cpu" else "cuda"
    for backend in cfg.backends:
        for precision in cfg.precisions:
            reason = deadline.reason() if deadline.passed() else backend_unavailable(
                backend, precision, dev_kind)
            if reason is None:
                try:
                    session = open_session(art, backend, precision, device=cfg.device,
                                           threads=cfg.threads, cuda_graph=cfg.cuda_graph)
                except Unavailable as exc:
                    reason = str(exc)
            if reason is not None:
                skipped.append(Skip(name, backend, precision, reason))
                log(f"  {name} {backend} {precision}: skipped ({reason})")
                on_record()
                continue
            try:
                per_slab_s: float | None = None
                for batch in cfg.batch_sizes:
                    guess = per_slab_s * batch if per_slab_s is not None else None
                    rec = (deadline.reason() if deadline.passed() else
                           _time_batch(cfg, session, data[:batch], rss, guess,
                                       _budget(cfg, deadline)))
                    if isinstance(rec, str):
                        # e.g. CUDA out of memory at a large batch: skip that batch only
                        skipped.append(Skip(name, backend, precision, rec, batch))
                        log(f"  {name} {backend} {precision} b{batch}: failed ({rec})")
                        on_record()
                        continue
                    lat, warm = rec
                    peak = peaks.get(precision)
                    r = make_record(
                        model=name, backend=backend, precision=precision, batch_size=batch,
                        device=cfg.device, image_size=s, in_channels=channels,
                        threads=cfg.threads, warmup=warm, latencies_ms=lat,
                        gflop_per_slab=gflop, peak_gflops=peak["gflops"] if peak else None,
                        peak_precision=precision if peak else None, rss_mb=rss.peak_mb(),
                        rss_method=rss.method, gpu_mem_mb=session.gpu_memory_mb(),
                        extra={k: v for k, v in session.info.items()
                               if isinstance(v, (str, int, float, bool, type(None), list))},
                    )
                    records.append(r)
                    on_record()
                    per_slab_s = r.ms_per_slab_p50 / 1e3
                    pct = f", {r.pct_of_peak:.1f}% of peak" if r.pct_of_peak is not None else ""
                    log(f"  {name} {backend} {precision} b{batch}: p50 {r.latency_ms_p50:.1f} ms"
                        f", {r.ms_per_slab_p50:.2f} ms/slab, {r.slabs_per_s:.1f} slabs/s{pct} "
                        f"({r.iters} iters)")
            finally:
                session.close()
    return art


