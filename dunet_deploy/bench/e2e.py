"""The runtime pipeline on one synthetic volume against pure model time (``dunet-bench --e2e``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dunet_deploy.bench.config import BenchConfig
from dunet_deploy.bench.core import Record, Skip, e2e_ratio
from dunet_deploy.errors import DunetError, one_line

__all__ = ["run_e2e"]

Log = Callable[[str], None]


def run_e2e(
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
            skipped.append(Skip(art.name, f"{backend} (e2e)", precision, one_line(exc)))
            log(f"  e2e {backend} {precision}: skipped ({one_line(exc)})")
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


