"""``dunet-bench``: latency, throughput and work accounting of the model zoo per backend.

One call of :func:`run_bench` measures, in one process and one sitting:

1. the matrix-multiply peak of the device at every requested precision
   (:mod:`~dunet_deploy.bench.peak`);
2. every model × backend × precision × batch size (:mod:`~dunet_deploy.bench.backends`):
   warm-up, timed iterations, latency percentiles, throughput, achieved
   GFLOP/s from the ONNX graph's FLOP count and its percentage of the peak,
   peak RSS and GPU memory;
3. the ratios (:func:`~dunet_deploy.bench.core.compute_ratios`): D-UNet / 3D UNet,
   each backend against torch eager, and the runtime pipeline's volume time
   against pure model time on one synthetic volume.

Combinations that cannot run here are *skipped with a reason*, never fatal.
The results go to ``bench.json``, ``bench.md`` and ``bench.png``
(:mod:`~dunet_deploy.bench.report`).

Example::

    from dunet_deploy.bench import BenchConfig, run_bench
    doc = run_bench(BenchConfig(models=("dunet", "unet3d"), batch_sizes=(1, 8), iters=5),
                    out_dir="bench-out")
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.bench.core import (
    BACKENDS,
    PRECISIONS,
    Record,
    RssMonitor,
    Skip,
    compute_ratios,
    e2e_ratio,
    machine_info,
    make_record,
    time_callable,
)
from dunet_deploy.errors import DunetError

__all__ = ["BenchConfig", "run_bench", "validate_config"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        models: registry names.
        backends: from :data:`~dunet_deploy.bench.core.BACKENDS`.
        precisions: from :data:`~dunet_deploy.bench.core.PRECISIONS`.
        batch_sizes: slabs per call, each >= 1.
        iters: timed iterations per record (the most; see ``time_budget_s``).
        warmup: untimed iterations per record.
        time_budget_s: per record, start no warm-up or timed iteration expected
            to end after this many seconds, once ``min_iters`` timed ones ran
            (``None``: always ``warmup`` + ``iters``).
        min_iters: timed iterations that run whatever the budget.
        image_size: network input side ``S`` (multiple of 16).
        threads: CPU threads for torch, ONNX Runtime and OpenVINO.
        device: ``"cpu"`` or ``"cuda"``.
        base_filters: override every model's ``base_filters`` (small quick runs).
        e2e: measure the runtime pipeline against pure model time.
        e2e_model: model used for it.
        e2e_batch_size: batch size used for it (``dunet-infer``'s default is 16).
        e2e_repeats: interleaved repeats of pipeline and pure model (best of each).
        seed: weights and input data.
        cache_dir: keep the ONNX files and engines here (a temporary folder otherwise).
        peak_sizes: square matmul sizes for the peak (``None``: the device's defaults).
    """

    models: tuple[str, ...] = ("dunet", "unet3d", "unet2d")
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    iters: int = 20
    warmup: int = 3
    time_budget_s: float | None = None
    min_iters: int = 2
    image_size: int = 192
    threads: int = field(default_factory=lambda: _usable_cores())
    device: str = "cpu"
    base_filters: int | None = None
    e2e: bool = True
    e2e_model: str = "dunet"
    e2e_batch_size: int = 16
    e2e_repeats: int = 2
    seed: int = 0
    cache_dir: str | None = None
    peak_sizes: tuple[int, ...] | None = None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def validate_config(cfg: BenchConfig) -> None:
    """Refuse a configuration that cannot mean anything, before any work.

    Raises:
        DunetError: one line naming the offending setting.
    """
    from dunet_deploy.models import list_models

    known = list_models()
    for m in cfg.models:
        if m not in known:
            raise DunetError(f"--models: unknown model {m!r}; known: {', '.join(known)}")
    if not cfg.models:
        raise DunetError("--models: give at least one model")
    for b in cfg.backends:
        if b not in BACKENDS:
            raise DunetError(f"--backends: unknown backend {b!r}; known: {', '.join(BACKENDS)}")
    if not cfg.backends:
        raise DunetError("--backends: give at least one backend")
    for p in cfg.precisions:
        if p not in PRECISIONS:
            raise DunetError(f"--precision: unknown precision {p!r}; known: "
                             f"{', '.join(PRECISIONS)}")
    if not cfg.precisions:
        raise DunetError("--precision: give at least one precision")
    if not cfg.batch_sizes:
        raise DunetError("--batch-sizes: give at least one batch size")
    for n in cfg.batch_sizes:
        if n < 1:
            raise DunetError(f"--batch-sizes: batch size {n} must be >= 1")
    if cfg.iters < 1:
        raise DunetError(f"--iters {cfg.iters}: must be >= 1")
    if cfg.warmup < 0:
        raise DunetError(f"--warmup {cfg.warmup}: must be >= 0")
    if not 1 <= cfg.min_iters <= cfg.iters:
        raise DunetError(f"--min-iters {cfg.min_iters}: must be between 1 and --iters {cfg.iters}")
    if cfg.time_budget_s is not None and cfg.time_budget_s <= 0:
        raise DunetError(f"--time-budget {cfg.time_budget_s}: must be > 0")
    if cfg.image_size < 16 or cfg.image_size % 16:
        raise DunetError(f"--image-size {cfg.image_size}: must be a multiple of 16 (four 2×2 "
                         "poolings), at least 16")
    if cfg.threads < 1:
        raise DunetError(f"--threads {cfg.threads}: must be >= 1")
    if cfg.device not in ("cpu", "cuda"):
        raise DunetError(f"--device {cfg.device!r}: choose cpu or cuda")
    if cfg.peak_sizes is not None and (not cfg.peak_sizes or min(cfg.peak_sizes) < 16):
        raise DunetError(f"--peak-sizes {cfg.peak_sizes}: sizes must be >= 16")
    if cfg.base_filters is not None and cfg.base_filters < 1:
        raise DunetError(f"--base-filters {cfg.base_filters}: must be >= 1")
    if cfg.e2e and cfg.e2e_repeats < 1:
        raise DunetError(f"--e2e-repeats {cfg.e2e_repeats}: must be >= 1")
    if cfg.e2e and cfg.e2e_batch_size < 1:
        raise DunetError(f"--e2e-batch-size {cfg.e2e_batch_size}: must be >= 1")
    if cfg.e2e and cfg.e2e_model not in known:
        raise DunetError(f"--e2e-model: unknown model {cfg.e2e_model!r}")
    if cfg.device == "cuda":
        from dunet_deploy.bench.backends import cuda_unavailable

        reason = cuda_unavailable()
        if reason is not None:
            raise DunetError(f"--device cuda: {reason}")


def e2e_volume_shape(image_size: int) -> tuple[int, int, int]:
    """Synthetic volume for the pipeline ratio: ATLAS geometry at 192, else a small one.

    At other sizes the in-plane shape is ``(S, S + S/4)`` (x, y) so that the
    centred square crop is exactly ``S`` and no resize is needed; 189 slices
    keep the slab count of an ATLAS volume.
    """
    from dunet_deploy.spec import ATLAS_SHAPE

    if image_size == 192:
        return ATLAS_SHAPE
    return (image_size, image_size + image_size // 4, 189)


def _spec_for(model: str, image_size: int) -> Any:
    from dunet_deploy.models import model_info
    from dunet_deploy.spec import PreprocessSpec

    shape = e2e_volume_shape(image_size)
    return PreprocessSpec.for_geometry(shape, image_size=image_size, model_name=model,
                                       slab_offsets=model_info(model).slab_offsets)


def _gpu_info() -> dict[str, Any]:
    import torch

    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _time_batch(
    cfg: BenchConfig, session: Any, x: np.ndarray, rss: RssMonitor, guess_s: float | None
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
                            sync=session.sync, time_budget_s=cfg.time_budget_s,
                            min_iters=cfg.min_iters, expected_call_s=guess_s)
    except (RuntimeError, MemoryError, DunetError) as exc:
        if cfg.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        return _one_line(exc)
    return res.latencies_ms, res.warmup_done


def _bench_model(
    cfg: BenchConfig, name: str, cache: Path, peaks: dict[str, dict[str, Any]],
    rss: RssMonitor, records: list[Record], skipped: list[Skip], log: Log,
) -> Any:
    """All backends × precisions × batches of one model; returns its artefacts."""
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
    spec = _spec_for(name, cfg.image_size)
    art = ModelArtifacts(name, model, spec, cache, max(cfg.batch_sizes))
    s = cfg.image_size
    gflop: float | None = None
    try:
        from dunet_deploy.flops import count_flops

        gflop = count_flops(art.onnx(), (1, channels, s, s))["per_sample"] / 1e9
    except Exception as exc:  # export or count failed: time anyway, no work figures
        log(f"  {name}: no FLOP count ({_one_line(exc)})")
    data = np.random.default_rng(cfg.seed).standard_normal(
        (max(cfg.batch_sizes), channels, s, s), dtype=np.float32)
    dev_kind = "cpu" if cfg.device == "cpu" else "cuda"
    for backend in cfg.backends:
        for precision in cfg.precisions:
            reason = backend_unavailable(backend, precision, dev_kind)
            if reason is None:
                try:
                    session = open_session(art, backend, precision, device=cfg.device,
                                           threads=cfg.threads)
                except Unavailable as exc:
                    reason = str(exc)
            if reason is not None:
                skipped.append(Skip(name, backend, precision, reason))
                log(f"  {name} {backend} {precision}: skipped ({reason})")
                continue
            try:
                per_slab_s: float | None = None
                for batch in cfg.batch_sizes:
                    guess = per_slab_s * batch if per_slab_s is not None else None
                    rec = _time_batch(cfg, session, data[:batch], rss, guess)
                    if isinstance(rec, str):
                        # e.g. CUDA out of memory at a large batch: skip that batch only
                        skipped.append(Skip(name, backend, precision, rec, batch))
                        log(f"  {name} {backend} {precision} b{batch}: failed ({rec})")
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
                    per_slab_s = r.ms_per_slab_p50 / 1e3
                    pct = f", {r.pct_of_peak:.1f}% of peak" if r.pct_of_peak is not None else ""
                    log(f"  {name} {backend} {precision} b{batch}: p50 {r.latency_ms_p50:.1f} ms"
                        f", {r.ms_per_slab_p50:.2f} ms/slab, {r.slabs_per_s:.1f} slabs/s{pct} "
                        f"({r.iters} iters)")
            finally:
                session.close()
    return art


def _e2e(
    cfg: BenchConfig, art: Any, records: list[Record], work: Path, log: Log
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """Runtime pipeline (one synthetic volume) against ``runner.infer`` on its slabs.

    Done for every runtime backend × precision that produced records for the model.
    """
    from dunet_deploy.bench.backends import RUNNER_BACKENDS, Unavailable

    rows: list[dict[str, Any]] = []
    skipped: list[Skip] = []
    todo = list(dict.fromkeys((r.backend, r.precision) for r in records
                              if r.model == art.name and r.backend in RUNNER_BACKENDS))
    if not todo:
        return rows, skipped
    try:
        from dunet_deploy.data.preprocess import slices_to_slabs
        from dunet_deploy.data.synth import write_dataset
        from dunet_deploy.runtime.base import open_runner
        from dunet_deploy.runtime.pipeline import InputItem, prepare_volume, segment_files
    except ImportError as exc:
        skipped.append(Skip(art.name, "(e2e)", "-", f"runtime pipeline unavailable ({exc})"))
        return rows, skipped
    spec = art.spec
    shape = spec.volume_shape
    # Stored as dunet-synth stores it (int16 + slope, gzip): reading costs what a scan costs.
    (case,) = write_dataset(work / "e2e_data", cases=1, layout="pairs", shape=shape,
                            seed=cfg.seed)
    vol_path = case.image
    prep = prepare_volume(InputItem(vol_path), spec)
    if not prep.result.ok or prep.slices is None or prep.indices is None:
        skipped.append(Skip(art.name, "(e2e)", "-", f"volume not usable: {prep.result.message}"))
        return rows, skipped
    dev = "cpu" if cfg.device == "cpu" else "cuda"
    for backend, precision in todo:
        model_runs: list[float] = []
        pipe_runs: list[tuple[float, dict[str, Any]]] = []
        try:
            opts: dict[str, Any] = {}
            if backend == "tensorrt":
                path = art.engine(precision)
            else:
                use16 = precision == "fp16" and backend == "onnxruntime"
                path = art.onnx_fp16() if use16 else art.onnx()
                opts = {"threads": cfg.threads, "precision": precision, "device": dev}
            # Interleaved repeats, best of each: a burst of other work on the machine
            # hits one run, not the ratio.
            for rep in range(cfg.e2e_repeats):
                with open_runner(path, backend, **opts) as runner:
                    step = cfg.e2e_batch_size if runner.max_batch is None else min(
                        cfg.e2e_batch_size, runner.max_batch)
                    batches = [slices_to_slabs(prep.slices, spec, prep.indices[i:i + step])
                               for i in range(0, prep.indices.size, step)]
                    runner.infer(batches[0])  # warm-up, as the pipeline's first batch is not
                    model_s = 0.0
                    for slabs in batches:
                        t0 = time.perf_counter()
                        runner.infer(slabs)
                        model_s += time.perf_counter() - t0
                model_runs.append(model_s)
                summary = segment_files(
                    path, [vol_path], work / f"e2e_{backend}_{precision}_{rep}",
                    backend=backend, batch_size=cfg.e2e_batch_size,
                    threads=cfg.threads if backend != "tensorrt" else None,
                    precision=precision, device=dev if backend != "tensorrt" else "auto")
                case = summary["cases"][0]
                if case["status"] != "ok":
                    raise DunetError(str(case["message"]))
                pipe_runs.append((float(summary["wall_s"]) - float(summary["model_load_s"]),
                                  summary))
        except (Unavailable, DunetError, RuntimeError, OSError) as exc:
            skipped.append(Skip(art.name, f"{backend} (e2e)", precision, _one_line(exc)))
            log(f"  e2e {backend} {precision}: skipped ({_one_line(exc)})")
            continue
        pipeline_s, summary = min(pipe_runs, key=lambda t: t[0])
        model_s = min(model_runs)
        row = {"model": art.name, "backend": backend, "precision": precision,
               "volume_shape": list(shape), "slabs_run": int(prep.indices.size),
               "batch_size": step, **e2e_ratio(pipeline_s, model_s),
               "ratio_with_load": (pipeline_s + float(summary["model_load_s"])) / model_s,
               "model_load_s": float(summary["model_load_s"]),
               "repeats": cfg.e2e_repeats,
               "model_s_runs": [round(t, 4) for t in model_runs],
               "pipeline_s_runs": [round(t, 4) for t, _ in pipe_runs],
               "stages_s": {k: round(float(v), 4)
                            for k, v in summary["cases"][0]["times"].items()}}
        rows.append(row)
        log(f"  e2e {backend} {precision}: pipeline {pipeline_s:.2f} s, model {model_s:.2f} s, "
            f"ratio {row['ratio']:.3f} (best of {cfg.e2e_repeats})")
    return rows, skipped


def run_bench(
    cfg: BenchConfig, out_dir: str | os.PathLike[str] | None = None, *,
    log: Log | None = None, command: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark described by ``cfg``; write the outputs to ``out_dir`` if given.

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
    emit: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    import torch

    from dunet_deploy.bench.peak import measure_peaks

    t_start = time.perf_counter()
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    torch.set_num_threads(cfg.threads)
    machine = machine_info()
    if cfg.device == "cuda":
        machine["gpu"] = _gpu_info()
    emit(f"dunet-bench: {machine['cpu_model']}, {machine['cores']} cores, device {cfg.device}, "
         f"{cfg.threads} threads")
    # Peaks only for precisions some requested backend could use here.
    peaks, skipped = measure_peaks(
        cfg.device, list(cfg.precisions), threads=cfg.threads, sizes=cfg.peak_sizes
    )
    for p, v in peaks.items():
        emit(f"  matmul peak {p}: {v['gflops']:.1f} GFLOP/s (n={v['best_size']})")
    records: list[Record] = []
    e2e_rows: list[dict[str, Any]] = []
    rss = RssMonitor()
    with tempfile.TemporaryDirectory(prefix="dunet-bench-") as tmp:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(tmp) / "models"
        cache.mkdir(parents=True, exist_ok=True)
        for name in cfg.models:
            emit(f"{name}:")
            art = _bench_model(cfg, name, cache, peaks, rss, records, skipped, emit)
            if cfg.e2e and name == cfg.e2e_model:
                rows, sk = _e2e(cfg, art, records, Path(tmp), emit)
                e2e_rows += rows
                skipped += sk
            del art
            gc.collect()
    if cfg.e2e and cfg.e2e_model not in cfg.models:
        skipped.append(Skip(cfg.e2e_model, "(e2e)", "-",
                            f"--e2e-model {cfg.e2e_model} is not among --models"))
    # The peak again: a large drift between start and end means the machine was not
    # quiet (other tenants, thermal limits) and every figure of this run is suspect. The
    # higher of the two is the ceiling (a burst of other work only ever lowers a figure).
    peaks_end, _ = measure_peaks(
        cfg.device, list(peaks), threads=cfg.threads, sizes=cfg.peak_sizes
    )
    for p, v in peaks_end.items():
        peaks[p]["gflops_at_start"] = peaks[p]["gflops"]
        peaks[p]["gflops_at_end"] = v["gflops"]
        if v["gflops"] > peaks[p]["gflops"]:
            peaks[p].update({k: v[k] for k in ("gflops", "library", "best_size", "by_size")})
        emit(f"  matmul peak {p} at the end: {v['gflops']:.1f} GFLOP/s; peak used: "
             f"{peaks[p]['gflops']:.1f} GFLOP/s")
    for r in records:  # % of peak against the better of the two measurements
        if r.peak_precision in peaks:
            r.set_peak(peaks[r.peak_precision]["gflops"])
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc: dict[str, Any] = {
        "format": "dunet-bench",
        "format_version": 1,
        "started": started,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "command": command if command is not None else shlex.join(sys.argv),
        "config": {**asdict(cfg), "peak_sizes": list(cfg.peak_sizes or []) or None,
                   "models": list(cfg.models), "backends": list(cfg.backends),
                   "precisions": list(cfg.precisions), "batch_sizes": list(cfg.batch_sizes)},
        "machine": machine,
        "peak": peaks,
        "records": [r.to_dict() for r in records],
        "ratios": compute_ratios(records, e2e_rows),
        "skipped": [s.to_dict() for s in skipped],
    }
    if out_dir is not None:
        from dunet_deploy.bench.report import write_outputs

        paths = write_outputs(out_dir, doc)
        emit("wrote " + ", ".join(str(p) for p in paths.values()))
    return doc
