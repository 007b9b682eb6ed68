"""The pipeline's ceiling: whole files through ``Segmenter.predict_files``, model cost aside.

``dunet-bench --pipeline`` writes N synthetic volumes (each stored twice: as
float32 and as int16 + ``scl_slope``, both ``.nii.gz``) and runs them through
the real file pipeline — read, preprocess, infer, postprocess, write,
``summary.json`` — with

* ``standin``: a zero-cost model. A real ONNX file with the real IO
  (``slabs float32 [N, C, S, S] -> prob float32 [N, 1, S, S]``) and metadata;
  its runner returns a constant probability map (a disc of lesion in every
  slab) without computing anything, so what is measured is the host work;
* ``real``: an exported model run by a CPU backend (ONNX Runtime / OpenVINO).

Each run is one child process (``python -m dunet_deploy.bench.pipeline_bench``)
so that peak RSS and core-seconds (``getrusage`` user + sys of the child and of
its own worker processes) belong to that run alone. Nothing here imports torch;
only :func:`export_random_model` needs it (``dunet-bench`` installs it).
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.choices import TTA_MODES
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.base import Runner
from dunet_deploy.spec import ATLAS_SHAPE, PreprocessSpec

__all__ = [
    "ENCODINGS",
    "MODELS",
    "PipelineConfig",
    "StandInRunner",
    "parse_shape",
    "pipeline_spec",
    "run_one",
    "run_pipeline_bench",
    "run_to_folder",
    "supports_workers",
    "write_standin_onnx",
    "write_volumes",
]

#: How the synthetic volumes are stored.
ENCODINGS = ("float32", "int16")
#: ``standin`` (zero-cost runner) and ``real`` (the exported network).
MODELS = ("standin", "real")
TIME_KEYS = ("read", "preprocess", "infer", "postprocess", "write")
Log = Callable[[str], None]


@dataclass
class PipelineConfig:
    """What ``dunet-bench --pipeline`` measures.

    Attributes:
        volumes: Volumes per run, >= 1.
        shape: ``(X, Y, Z)`` of the synthetic volumes (ATLAS: 197×233×189).
        image_size: Network side ``S`` (``None``: the spec's default, 192 for ATLAS).
        encodings: Subset of :data:`ENCODINGS`.
        models: Subset of :data:`MODELS`.
        workers: Worker counts to run; ``0`` is today's pipeline (one
            prefetch thread). Counts above 0 need a ``workers=`` option of
            ``Segmenter.predict_files`` and are skipped without one.
        model_path: The ONNX for ``real`` (``None``: a random-init export of
            ``model_name``, which needs torch).
        model_name: Registry name exported for ``real``.
        base_filters: Width override of that export (``None``: the paper's).
        backend: Runtime backend of ``real`` (``auto``, ``onnxruntime``, ``openvino``).
        threads: Backend threads (``None``: the backend's choice).
        batch_size: Slabs per model call.
        save_prob: Also write the probability maps.
        tta: Test-time augmentation modes to run (``flip`` costs a second
            network call per batch: its price shows with the real model).
        seed: Seed of the first volume.
        baseline: A source tree of dunet-deploy (the folder holding its
            ``dunet_deploy`` package, e.g. ``git worktree add`` of an older
            commit): each run is repeated with that code right before the
            current one, on the same files, for an A/B.
    """

    volumes: int = 4
    shape: tuple[int, int, int] = ATLAS_SHAPE
    image_size: int | None = None
    encodings: tuple[str, ...] = ENCODINGS
    models: tuple[str, ...] = MODELS
    workers: tuple[int, ...] = (0,)
    model_path: str | None = None
    model_name: str = "dunet"
    base_filters: int | None = None
    backend: str = "auto"
    threads: int | None = None
    batch_size: int = 16
    save_prob: bool = False
    tta: tuple[str, ...] = ("none",)
    seed: int = 0
    baseline: str | None = None

    def validate(self) -> None:
        """Raise :class:`DunetError` for an option that cannot work."""
        if self.volumes < 1:
            raise DunetError(f"--volumes {self.volumes}: must be >= 1")
        for name, given, known in (("--encodings", self.encodings, ENCODINGS),
                                   ("--pipeline-models", self.models, MODELS),
                                   ("--tta", self.tta, TTA_MODES)):
            bad = [g for g in given if g not in known]
            if bad or not given:
                raise DunetError(f"{name} {','.join(given)}: choose from {', '.join(known)}")
        if any(w < 0 for w in self.workers) or not self.workers:
            raise DunetError(f"--workers {self.workers}: give counts >= 0")
        if self.batch_size < 1:
            raise DunetError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.model_path is not None and not Path(self.model_path).is_file():
            raise DunetError(f"{self.model_path}: model file not found")
        if self.baseline is not None and not (
                Path(self.baseline) / "dunet_deploy" / "__init__.py").is_file():
            raise DunetError(f"--baseline {self.baseline}: no dunet_deploy package in it")


# ------------------------------------------------------------------ inputs
def parse_shape(text: str, option: str = "--volume-shape") -> tuple[int, int, int]:
    """``"197,233,189"`` -> ``(197, 233, 189)``; :class:`DunetError` unless three sizes >= 8."""
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise DunetError(f"{option} {text!r}: expected three integers like 197,233,189") from None
    if len(sizes) != 3 or min(sizes) < 8:
        raise DunetError(f"{option} {text!r}: expected three sizes >= 8")
    return sizes[0], sizes[1], sizes[2]


def pipeline_spec(shape: Sequence[int], image_size: int | None = None) -> PreprocessSpec:
    """The spec of a model trained on the synthetic volumes (their grid, 1 mm)."""
    from dunet_deploy.data.geometry import measure_geometry
    from dunet_deploy.data.synth import synth_affine

    shp = tuple(int(n) for n in shape)
    geometry = measure_geometry([(shp, synth_affine(shp))])
    return PreprocessSpec.for_geometry(shp, image_size=image_size, **geometry)


def write_volumes(folder: Path, count: int, shape: Sequence[int], seed: int = 0
                  ) -> dict[str, list[Path]]:
    """Write ``count`` synthetic volumes, each as float32 and as int16 + ``scl_slope``.

    Returns:
        ``{"float32": [paths], "int16": [paths]}`` (``.nii.gz``, 1 mm synthetic affine).
    """
    import nibabel as nib

    from dunet_deploy.data.synth import synth_affine, synthesize_case

    shp = tuple(int(n) for n in shape)
    affine = synth_affine(shp)
    out: dict[str, list[Path]] = {enc: [] for enc in ENCODINGS}
    for enc in ENCODINGS:
        (folder / enc).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, _ = synthesize_case(shp, seed + i)
        slope = max(float(image.max()), 1e-6) / 32000.0
        stored = {"float32": (image.astype(np.float32), 1.0),
                  "int16": (np.round(image / slope).astype(np.int16), slope)}
        for enc, (data, scale) in stored.items():
            img = nib.Nifti1Image(data, affine)
            img.header.set_slope_inter(scale, 0.0)  # kept: data already has the disk dtype
            img.header.set_xyzt_units("mm", "sec")
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=4)
            path = folder / enc / f"case_{i:03d}.nii.gz"
            nib.save(img, str(path))
            out[enc].append(path)
    return out


# ---------------------------------------------------------------- stand-in
def standin_map(spec: PreprocessSpec) -> np.ndarray:
    """The stand-in's output for every slab: a lesion disc (0.9) on 0.02.

    Returns:
        float32 ``[1, 1, S, S]``, read-only.
    """
    s = spec.image_size
    yy, xx = np.mgrid[0:s, 0:s]
    disc = (yy - s * 0.45) ** 2 + (xx - s * 0.6) ** 2 <= (s * 0.08) ** 2
    out = np.where(disc, np.float32(0.9), np.float32(0.02)).astype(np.float32)[None, None]
    out.flags.writeable = False
    return out


def write_standin_onnx(path: Path, spec: PreprocessSpec) -> Path:
    """An ONNX with the exported models' IO and metadata that outputs :func:`standin_map`.

    ``prob = ReduceMean(slabs, channels) * 0 + map``: ONNX Runtime can run it,
    and :class:`StandInRunner` returns the same map without running it.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c, s = spec.in_channels, spec.image_size
    nodes = [
        helper.make_node("ReduceMean", [INPUT_NAME], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "map"], [OUTPUT_NAME]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array(standin_map(spec)), "map")]
    graph = helper.make_graph(
        nodes, "dunet_standin",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", c, s, s])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 1, s, s])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    info = ArtifactInfo(spec=spec, model_name="standin", model_args={}, params=0)
    helper.set_model_props(model, info.to_metadata())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


class StandInRunner(Runner):
    """A zero-cost model: every slab gets :func:`standin_map` (a read-only broadcast)."""

    backend = "standin"

    def __init__(self, model_path: str | Path, info: ArtifactInfo) -> None:
        super().__init__(model_path, info)
        self._map = standin_map(info.spec)

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        """``(None, C, S, S)``: any batch."""
        return (None, self.spec.in_channels, self.spec.image_size, self.spec.image_size)

    @property
    def precision(self) -> str:
        """``fp32``."""
        return "fp32"

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        # Read-only and never written: sharing it between calls aliases nothing mutable.
        return np.broadcast_to(self._map, (slabs.shape[0], *self._map.shape[1:]))


def export_random_model(path: Path, spec: PreprocessSpec, model_name: str = "dunet",
                        base_filters: int | None = None, seed: int = 0) -> Path:
    """Export a random-init registry model (needs torch): the real network's cost."""
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    torch.manual_seed(seed)
    kw = {} if base_filters is None else {"base_filters": base_filters}
    export_onnx(create_model(model_name, **kw).eval(), spec, path)
    return path


# ----------------------------------------------------------------- one run
def supports_workers() -> bool:
    """Whether ``Segmenter.predict_files`` takes ``workers=`` (worker processes)."""
    from dunet_deploy.runtime.segmenter import Segmenter

    return "workers" in inspect.signature(Segmenter.predict_files).parameters


def _cpu_s() -> float:
    """User + sys seconds of this process and of its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peak_rss_mb(workers: int) -> dict[str, float | None]:
    """VmHWM of this process (``getrusage`` would count the parent's RSS before exec)
    and, with workers, the largest finished child's peak."""
    from dunet_deploy.bench.core import _read_status_kb

    kb = _read_status_kb("VmHWM")
    own = kb / 1024.0 if kb is not None else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return {"main": round(own, 1), "largest_worker": round(kids, 1) if workers else None}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One measured run in this process: load the model, then ``predict_files``.

    Args:
        job: ``model`` (``standin`` / ``real``), ``model_path``, ``inputs``,
            ``out_dir``, ``workers``, ``backend``, ``threads``, ``batch_size``,
            ``save_prob``, ``tta``.

    Returns:
        The run's figures (load time excluded from rates and core-seconds).
    """
    from dunet_deploy.runtime.segmenter import Segmenter

    opts: dict[str, Any] = {"batch_size": job["batch_size"]}
    if job.get("tta", "none") != "none":  # (a --baseline tree may predate the option)
        opts["tta"] = job["tta"]
    if job["model"] == "standin":
        opts["runner_factory"] = StandInRunner
    else:
        opts.update(backend=job["backend"], threads=job["threads"])
    files: dict[str, Any] = {"save_prob": job["save_prob"]}
    if job["workers"]:
        files["workers"] = job["workers"]
    with Segmenter(job["model_path"], **opts) as seg:
        cpu0, t0 = _cpu_s(), time.perf_counter()
        summary = seg.predict_files(job["inputs"], job["out_dir"], **files)
        wall = time.perf_counter() - t0
    # After close: worker processes count once they are waited for.
    cpu = _cpu_s() - cpu0
    cases = summary["cases"]
    failed = [c["message"] for c in cases if c["status"] != "ok"]
    if failed:
        raise DunetError(f"pipeline run failed: {failed[0]}")
    n = len(cases)
    slabs = sum(int(c["slabs_run"]) for c in cases)
    stages = {k: round(sum(float(c["times"].get(k, 0.0)) for c in cases) / n, 4)
              for k in TIME_KEYS}
    import dunet_deploy

    return {
        "code": str(Path(dunet_deploy.__file__).resolve().parents[1]),
        "backend": summary["backend"], "precision": summary["precision"],
        "model_load_s": summary["model_load_s"], "volumes": n, "slabs": slabs,
        "wall_s": round(wall, 4), "volumes_per_s": round(n / wall, 4),
        "slabs_per_s": round(slabs / wall, 2), "core_s": round(cpu, 4),
        "core_s_per_volume": round(cpu / n, 4), "stages_s_per_volume": stages,
        "peak_rss_mb": _peak_rss_mb(int(job["workers"])),
    }


def _run_child(job: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """:func:`run_one` in a fresh interpreter (own peak RSS, own core-seconds).

    ``source``: run this file's :func:`run_one` against the ``dunet_deploy``
    package of another source tree (``-P``: this folder is not put on the path).
    """
    env = dict(os.environ)
    src = source or str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-P", str(Path(__file__).resolve())] if source else [
        sys.executable, "-m", "dunet_deploy.bench.pipeline_bench"]
    proc = subprocess.run(cmd, input=json.dumps(job), capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise DunetError(f"pipeline run {job['model']} failed: "
                         f"{lines[-1] if lines else f'exit {proc.returncode}'}")
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return doc


# ------------------------------------------------------------------- bench
def _model_paths(cfg: PipelineConfig, spec: PreprocessSpec, work: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    if "standin" in cfg.models:
        paths["standin"] = write_standin_onnx(work / "standin.onnx", spec)
    if "real" in cfg.models:
        if cfg.model_path is not None:
            paths["real"] = Path(cfg.model_path)
        else:
            paths["real"] = export_random_model(work / f"{cfg.model_name}.onnx", spec,
                                                cfg.model_name, cfg.base_filters, cfg.seed)
    return paths


def run_pipeline_bench(cfg: PipelineConfig, work: Path, log: Log = print) -> dict[str, Any]:
    """Every model × encoding × worker count of ``cfg``; one child process each.

    Args:
        cfg: What to run.
        work: Scratch folder (volumes, models, outputs).
        log: Progress lines.

    Returns:
        ``{"config", "machine", "workers_supported", "runs": [...], "skipped": [...]}``.
    """
    from dunet_deploy.machine import machine_info

    cfg.validate()
    load_start = list(os.getloadavg())
    spec = pipeline_spec(cfg.shape, cfg.image_size)
    if cfg.model_path is not None:
        from dunet_deploy.artifacts import read_artifact_info

        spec = read_artifact_info(cfg.model_path).spec
    volumes = write_volumes(work / "volumes", cfg.volumes, spec.volume_shape, cfg.seed)
    models = _model_paths(cfg, spec, work)
    workers_ok = supports_workers()
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    combos = [(model, path, enc, workers, tta) for model, path in models.items()
              for enc in cfg.encodings for workers in cfg.workers for tta in cfg.tta]
    for model, path, enc, workers, tta in combos:
        key = {"model": model, "encoding": enc, "workers": workers, "tta": tta}
        if workers and not workers_ok:
            skipped.append({**key, "reason": "predict_files has no workers= option"})
            continue
        job = {"model": model, "model_path": str(path), "workers": workers,
               "inputs": [str(p) for p in volumes[enc]],
               "out_dir": str(work / f"out_{model}_{enc}_w{workers}_{tta}"),
               "backend": cfg.backend, "threads": cfg.threads,
               "batch_size": cfg.batch_size, "save_prob": cfg.save_prob, "tta": tta}
        sources = ([("baseline", cfg.baseline)] if cfg.baseline else []) + [
            ("current", None)]
        for name, source in sources:
            row = {**key, "source": name, **_run_child(job, source)}
            runs.append(row)
            log(f"  {name} {model} {enc} workers={workers} tta={tta}: "
                f"{row['volumes_per_s']:.3f} "
                f"volumes/s, {row['core_s_per_volume']:.3f} core-s/volume, stages "
                + ", ".join(f"{k} {v:.3f}"
                            for k, v in row["stages_s_per_volume"].items()))
    return {"config": {**asdict(cfg), "shape": list(spec.volume_shape),
                       "image_size": spec.image_size},
            "machine": machine_info(), "workers_supported": workers_ok,
            "loadavg": {"start": load_start, "end": list(os.getloadavg())},
            "runs": runs, "skipped": skipped}


def render_markdown(doc: dict[str, Any]) -> str:
    """A table of :func:`run_pipeline_bench`'s runs."""
    cpu = doc["machine"].get("cpu_model", "?")
    cfg = doc["config"]
    lines = [
        "# dunet-bench --pipeline",
        "",
        f"CPU: {cpu}, {doc['machine'].get('cores', '?')} cores; {cfg['volumes']} volumes of "
        f"{'x'.join(str(n) for n in cfg['shape'])} at S={cfg['image_size']}, "
        f"batch {cfg['batch_size']}, save_prob={cfg['save_prob']}; load average "
        f"{doc['loadavg']['start'][0]:.2f} at the start, "
        f"{doc['loadavg']['end'][0]:.2f} at the end.",
        "",
        "Times are seconds per volume; core-s = user + sys CPU of the run's processes.",
        "",
        "| code | model | backend | stored as | workers | TTA | volumes/s | slabs/s | "
        "core-s/volume | " + " | ".join(f"{k} s" for k in TIME_KEYS)
        + " | peak RSS MiB (main / worker) |",
        "|---|---|---|---|---:|---|---:|---:|---:|" + "---:|" * len(TIME_KEYS) + "---:|",
    ]
    for r in doc["runs"]:
        st = r["stages_s_per_volume"]
        rss = r["peak_rss_mb"]
        lines.append(
            f"| {r['source']} | {r['model']} | {r['backend']} {r['precision']} | "
            f"{r['encoding']} | "
            f"{r['workers']} | {r.get('tta', 'none')} | {r['volumes_per_s']:.3f} | "
            f"{r['slabs_per_s']:.1f} | "
            f"{r['core_s_per_volume']:.3f} | "
            + " | ".join(f"{st[k]:.3f}" for k in TIME_KEYS)
            + f" | {rss['main']:.0f} / {rss['largest_worker'] or '-'} |")
    if doc["skipped"]:
        lines.append("")
    for s in doc["skipped"]:
        lines.append(f"Skipped {s['model']} {s['encoding']} workers={s['workers']}: "
                     f"{s['reason']}.  ")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, doc: dict[str, Any], stem: str = "pipeline") -> list[Path]:
    """Write ``OUT/<stem>.json`` and ``OUT/<stem>.md``."""
    from dunet_deploy.artifacts import atomic_write_bytes, write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    write_json(js, doc)
    atomic_write_bytes(md, render_markdown(doc).encode())
    return [js, md]


def run_to_folder(cfg: PipelineConfig, out_dir: Path, work_dir: Path | None = None,
                  log: Log = print) -> list[Path]:
    """:func:`run_pipeline_bench` in ``work_dir`` (default: a temporary folder), then write results.

    Returns:
        ``[OUT/pipeline.json, OUT/pipeline.md]``.

    Raises:
        DunetError: for a bad option or ``out_dir`` that is a file, before any work.
    """
    import tempfile

    cfg.validate()
    if out_dir.exists() and not out_dir.is_dir():
        raise DunetError(f"{out_dir}: exists and is not a folder")
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        doc = run_pipeline_bench(cfg, work_dir, log)
    else:
        with tempfile.TemporaryDirectory(prefix="dunet-pipeline-") as tmp:
            doc = run_pipeline_bench(cfg, Path(tmp), log)
    return write_results(out_dir, doc)


if __name__ == "__main__":  # the child of _run_child: a job on stdin, figures on stdout
    print(json.dumps(run_one(json.loads(sys.stdin.read()))))
