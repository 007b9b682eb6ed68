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
#: Backends timed end to end: the runtime's, and torch eager (on CUDA: what a GPU image
#: without TensorRT can run behind the pipeline).
E2E_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "torch")


def _torch_runner_factory(art: Any, precision: str, device: str) -> Callable[[Path, Any], Any]:
    """A factory of :class:`~dunet_deploy.runtime.base.Runner` s running the torch model.

    The pipeline takes any runner; this one wraps the bench's torch session (pinned
    staging buffers on CUDA), so the end-to-end figure has torch as the model.
    """
    from dunet_deploy.bench.backends import _torch_session
    from dunet_deploy.runtime.base import Runner

    class TorchRunner(Runner):
        backend = "torch"

        def __init__(self, path: Path, info: Any) -> None:
            super().__init__(path, info)
            self._session = _torch_session(art, precision, device, graphs=False)

        @property
        def input_shape(self) -> tuple[int | None, int, int, int]:
            return (None, self.spec.in_channels, self.spec.image_size, self.spec.image_size)

        @property
        def precision(self) -> str:
            return precision

        @property
        def device(self) -> str:
            return device

        def _run(self, slabs: Any) -> Any:
            out = self._session.run(slabs)
            self._session.sync()
            return out

        def close(self) -> None:
            self._session.close()
            super().close()

    return TorchRunner


def run_e2e(
    cfg: BenchConfig, art: Any, records: list[Record], work: Path, log: Log
) -> tuple[list[dict[str, Any]], list[Skip]]:
    """Runtime pipeline (one synthetic volume) against ``runner.infer`` on its slabs.

    Done for every runtime backend × precision that produced records for the model.
    """
    from dunet_deploy.bench.backends import Unavailable

    rows: list[dict[str, Any]] = []
    skipped: list[Skip] = []
    todo = list(dict.fromkeys((r.backend, r.precision) for r in records
                              if r.model == art.name and r.backend in E2E_BACKENDS
                              and (r.backend != "torch" or cfg.device != "cpu")))
    if not todo:
        return rows, skipped
    try:
        from dunet_deploy.data.synth import write_dataset
        from dunet_deploy.runtime.pipeline import InputItem, prepare_volume
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
    for backend, precision in todo:
        try:
            model_runs, pipe_runs, step = _measure_backend(cfg, art, backend, precision, prep,
                                                           vol_path, work)
        except (Unavailable, DunetError, RuntimeError, OSError) as exc:
            skipped.append(Skip(art.name, f"{backend} (e2e)", precision, one_line(exc)))
            log(f"  e2e {backend} {precision}: skipped ({one_line(exc)})")
            continue
        pipeline_s, summary = min(pipe_runs, key=lambda t: t[0])
        model_s = min(model_runs)
        row = {"model": art.name, "backend": backend, "precision": precision,
               "volume_shape": list(shape), "slabs_run": int(prep.indices.size),
               "batch_size": step, **e2e_ratio(pipeline_s, model_s),
               "volumes_per_s": 1.0 / pipeline_s if pipeline_s > 0 else None,
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




def _measure_backend(
    cfg: BenchConfig, art: Any, backend: str, precision: str, prep: Any, vol_path: Path,
    work: Path,
) -> tuple[list[float], list[tuple[float, dict[str, Any]]], int]:
    """Interleaved repeats of pure model time and pipeline time for one backend × precision.

    Returns:
        ``(model seconds per repeat, (pipeline seconds, summary) per repeat, batch size)``.
    """
    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.data.preprocess import slices_to_slabs
    from dunet_deploy.runtime.base import open_runner
    from dunet_deploy.runtime.segmenter import segment_files

    spec = art.spec
    dev = "cpu" if cfg.device == "cpu" else "cuda"
    opts: dict[str, Any] = {}
    factory = None
    if backend == "tensorrt":
        path = art.engine(precision)
    elif backend == "torch":
        path = art.onnx()  # its metadata (spec) only; the torch model runs
        factory = _torch_runner_factory(art, precision, cfg.device)
    else:
        use16 = precision == "fp16" and backend == "onnxruntime"
        path = art.onnx_fp16() if use16 else art.onnx()
        opts = {"threads": cfg.threads, "precision": precision, "device": dev}
    local: dict[str, Any] = {} if factory is not None else {
        "backend": backend, "threads": cfg.threads if backend != "tensorrt" else None,
        "precision": precision, "device": dev if backend != "tensorrt" else "auto"}
    model_runs: list[float] = []
    pipe_runs: list[tuple[float, dict[str, Any]]] = []
    step = cfg.e2e_batch_size
    # Interleaved repeats, best of each: a burst of other work on the machine hits one
    # run, not the ratio.
    for rep in range(cfg.e2e_repeats):
        runner = (factory(path, read_artifact_info(path)) if factory is not None
                  else open_runner(path, backend, **opts))
        with runner:
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
        summary = segment_files(path, [vol_path], work / f"e2e_{backend}_{precision}_{rep}",
                                batch_size=cfg.e2e_batch_size, runner_factory=factory, **local)
        case = summary["cases"][0]
        if case["status"] != "ok":
            raise DunetError(str(case["message"]))
        pipe_runs.append((float(summary["wall_s"]) - float(summary["model_load_s"]), summary))
    return model_runs, pipe_runs, step
