"""The main job end to end on synthetic data: ``dunet-demo``.

synthesize an ATLAS-like dataset -> train D-UNet briefly -> evaluate it ->
export a verified ONNX -> run ``dunet-infer`` (the torch-free runtime) on a
held-out volume -> write its mask, a PNG overlay and a short report.

The heads are real anatomy by default (``anatomy="mni152"``: the MNI152 2009a
template shipped in the nilearn wheel, warped, with a bias field and implanted
lesions; see :mod:`dunet_deploy.data.anatomy`) on a 3 mm grid over the MNI
box; ``anatomy="ellipsoid"`` gives the older ellipsoid heads, which need no
nilearn.

Everything lands in one folder::

    OUT/data/          synthetic training set (ATLAS R1.1 layout)
    OUT/heldout/       one more case the model never saw (image + mask)
    OUT/run/           dunet-train run: best.pt, last.pt, metrics.jsonl
    OUT/eval/          dunet-eval report on the validation cases
    OUT/export/        model.onnx + model.json (verified against PyTorch)
    OUT/infer/         <case>_mask.nii.gz + summary.json from dunet-infer
    OUT/overlay.png    slices over the lesion, prediction and truth outlined
    OUT/report.md      metrics, timings and where every artefact is
    OUT/report.json    the same, machine-readable
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import read_sidecar, write_json
from dunet_deploy.data.anatomy import ANATOMIES
from dunet_deploy.errors import DunetError
from dunet_deploy.machine import machine_info
from dunet_deploy.metrics import mean_pm_std

#: Volume shape per anatomy when none is given. mni152: the MNI box on a 3 mm
#: grid (197/66, 233/78, 189/63 mm per voxel), whose 66×66 crop barely needs
#: resizing for the 64×64 input; 52 of its 63 axial slabs hold head, against 38
#: of 48 for the ellipsoids, so training costs about 1.4× theirs (the 2 mm box,
#: 99×117×95, has 78 and would cost 2×, for an input resized to 64 anyway).
DEMO_SHAPES: dict[str, tuple[int, int, int]] = {
    "ellipsoid": (64, 80, 48),
    "mni152": (66, 78, 63),
}
#: Smallest lesion (mm³) the held-out case must show (200 voxels at 1 mm).
_HELDOUT_MIN_LESION_MM3 = 200.0


@dataclass(frozen=True)
class DemoConfig:
    """Knobs of the demo; the defaults finish in minutes on 2 CPU cores.

    Attributes:
        out: output folder (must be new or empty, or a previous demo's).
        cases: synthetic training cases (80/20 train/validation split).
        anatomy: head model, ``"mni152"`` (warped MNI152 2009a template; needs
            nilearn, the ``anatomy`` extra) or ``"ellipsoid"``.
        shape: synthetic volume shape ``(X, Y, Z)``; ``None`` (the default)
            becomes ``DEMO_SHAPES[anatomy]``. For mni152 it is the grid over
            the MNI box (197×233×189 is 1 mm).
        image_size: network input side (64 keeps CPU training short).
        epochs: training epochs.
        batch_size: slabs per step.
        base_filters: D-UNet width (32 = the paper's model).
        oversample: sampling weight of lesion slabs.
        seed: seed of data, split and training.
        threads: torch/runtime threads (``None``: all cores).
    """

    out: Path
    cases: int = 10
    anatomy: str = "mni152"
    shape: tuple[int, int, int] | None = None
    image_size: int = 64
    epochs: int = 8
    batch_size: int = 8
    base_filters: int = 32
    oversample: float = 3.0
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        """Check ``anatomy`` and fill in its default ``shape``.

        Raises:
            DunetError: on an unknown anatomy.
        """
        if self.anatomy not in ANATOMIES:
            raise DunetError(f"anatomy {self.anatomy!r}: choose one of {', '.join(ANATOMIES)}")
        if self.shape is None:
            object.__setattr__(self, "shape", DEMO_SHAPES[self.anatomy])

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """The synthetic volume shape ``(X, Y, Z)``: ``shape``, or the anatomy's default."""
        return self.shape if self.shape is not None else DEMO_SHAPES[self.anatomy]


_MARKER = "demo.json"


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DunetError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / _MARKER).is_file():
        raise DunetError(f"{out}: folder is not empty and was not written by dunet-demo")
    if (out / _MARKER).is_file():  # a previous demo: start over
        import shutil

        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _lesion_seed(shape: tuple[int, int, int], start: int, anatomy: str,
                 min_mm3: float = _HELDOUT_MIN_LESION_MM3) -> int:
    """The first seed from ``start`` whose synthetic case has a visible lesion.

    Some synthetic cases have no lesion at all (as some slices of real data),
    or only a speck; the held-out demo case should show one.

    Args:
        shape: Volume shape ``(X, Y, Z)``, as given to ``write_dataset``.
        start: First seed to try.
        anatomy: ``"ellipsoid"`` or ``"mni152"``, as given to ``write_dataset``.
        min_mm3: Smallest lesion volume accepted, in mm³ (voxel volume from the
            case's affine, so the bar does not depend on the grid).

    Returns:
        That seed, or ``start`` when none of the 50 seeds from it qualifies.
    """
    from dunet_deploy.data.synth import synth_affine, synthesize_case

    def case(seed: int) -> tuple[np.ndarray, np.ndarray]:
        if anatomy == "mni152":
            from dunet_deploy.data.anatomy import synthesize_anatomy_case

            _, mask, affine = synthesize_anatomy_case(seed, shape)
            return mask, affine
        return synthesize_case(shape, seed=seed)[1], synth_affine(shape)

    for seed in range(start, start + 50):
        mask, affine = case(seed)
        if int(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) >= min_mm3:
            return seed
    return start


class _Timer:
    """Times the demo's stages and logs their start and end."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.log(f"[demo] {name} ...")
        yield
        self.times[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[demo] {name} done in {self.times[name]:.1f} s")


def _train_and_evaluate(cfg: DemoConfig, out: Path, log: Callable[[str], None],
                        timer: _Timer) -> dict[str, Any]:
    """Train on ``out/data``, evaluate ``best.pt`` on the validation split, write ``out/eval``."""
    from dunet_deploy.models import keras_param_count
    from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint
    from dunet_deploy.training.evaluate import evaluate_checkpoint, write_report
    from dunet_deploy.training.trainer import TrainConfig, train

    with timer.stage("train"):
        result = train(TrainConfig(
            data=str(out / "data"), out=str(out / "run"), model="dunet",
            base_filters=None if cfg.base_filters == 32 else cfg.base_filters,
            epochs=cfg.epochs, batch_size=cfg.batch_size, image_size=cfg.image_size,
            oversample=cfg.oversample, seed=cfg.seed, device="cpu", progress=False,
        ), log=lambda msg: log(f"  {msg}"))
    if result.best_checkpoint is None:
        raise DunetError("training produced no checkpoint")
    with timer.stage("evaluate"):
        val_metrics = evaluate_checkpoint(result.best_checkpoint, out / "data", split="val",
                                          device="cpu")
        doc = load_checkpoint(result.best_checkpoint)
        params = keras_param_count(model_from_checkpoint(doc, str(result.best_checkpoint)))
        eval_paths = write_report(val_metrics, out / "eval", method="dunet (demo)",
                                  params=params, meta={"split": "val"}, boxplot=True)
        eval_summary = json.loads(eval_paths["json"].read_text())
    return {
        "checkpoint": result.best_checkpoint, "params": params,
        "train": {"epochs": result.epoch, "best_epoch": result.best_epoch,
                  "val_dsc_first_epoch": (result.history[0]["val"]["dsc_mean"]
                                          if result.history else 0.0),
                  "val_dsc_best": result.best_metrics.get("dsc_mean")},
        "eval_val": {k: eval_summary.get(k) for k in
                     ("cases", "dsc_mean", "dsc_std", "dsc_global", "recall_mean",
                      "precision_mean")},
    }


def _export(cfg: DemoConfig, checkpoint: Path, out: Path, log: Callable[[str], None]
            ) -> dict[str, float]:
    """Export and verify ``model.onnx``; the verification's worst error and agreement."""
    from dunet_deploy.export.pipeline import ExportRequest, run_export

    run_export(ExportRequest(
        checkpoint=checkpoint, out_dir=out / "export", formats=("onnx",),
        batch_range=(1, 8, 32), opset=17, verify=True, triton_backend="onnx",
        timing_cache=None, workspace_mb=None, opt_level=None, verify_slabs=16, seed=cfg.seed,
    ), log=lambda msg: log(f"  {msg}"))
    rows = read_sidecar(out / "export" / "model.json").extra["verification"]["rows"]
    return {"max_abs_error": max(r["max_abs"] for r in rows),
            "mask_agreement": min(r["mask_agreement"] for r in rows)}


def _segment_heldout(cfg: DemoConfig, held: Any, out: Path) -> dict[str, Any]:
    """``segment_files`` on the held-out case, scored against its mask; writes the overlay."""
    from dunet_deploy.data.nifti import load_mask, load_nifti
    from dunet_deploy.metrics import case_metrics
    from dunet_deploy.runtime.segmenter import segment_files

    summary = segment_files(out / "export" / "model.onnx", [held.image], out / "infer",
                            backend="auto", threads=cfg.threads)
    if summary["failed"]:
        raise DunetError(f"dunet-infer failed: {summary['cases'][0].get('message')}")
    case = summary["cases"][0]
    pred = np.asarray(load_nifti(case["mask"]).data)
    truth = load_mask(held.masks)
    m = case_metrics(held.case_id, pred, truth)
    return {"case": held.case_id, "dsc": m.dsc, "recall": m.recall, "precision": m.precision,
            "lesion_voxels_truth": int((truth > 0).sum()),
            "lesion_voxels_pred": int(case["lesion_voxels"]), "backend": summary["backend"],
            "precision_run": summary["precision"], "times": case["times"],
            "_mask": case["mask"], "_pred": pred, "_truth": truth}


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole demo; returns the report (also written as report.json / report.md).

    Raises:
        DunetError: on a bad output folder or any failing stage.
    """
    import torch

    from dunet_deploy.data.layouts import discover_cases
    from dunet_deploy.data.nifti import load_nifti
    from dunet_deploy.data.synth import write_dataset
    from dunet_deploy.runtime.preview import write_preview

    out = Path(cfg.out)
    shape = cfg.volume_shape
    if cfg.anatomy == "mni152":  # no nilearn: fail before anything is written
        from dunet_deploy.data.anatomy import mni152_grid

        mni152_grid(shape)
    _prepare(out)
    write_json(out / _MARKER, {"config": {**asdict(cfg), "out": str(cfg.out)}})
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    timer = _Timer(log)
    with timer.stage("synthesize"):
        write_dataset(out / "data", cases=cfg.cases, layout="atlas-r1.1", shape=shape,
                      seed=cfg.seed, anatomy=cfg.anatomy)
        held = write_dataset(out / "heldout", cases=1, layout="pairs", shape=shape,
                             seed=_lesion_seed(shape, cfg.seed + 10_000, cfg.anatomy),
                             anatomy=cfg.anatomy)[0]
    trained = _train_and_evaluate(cfg, out, log, timer)
    with timer.stage("export"):
        check = _export(cfg, trained["checkpoint"], out, log)
    with timer.stage("infer"):
        heldout = _segment_heldout(cfg, held, out)
    with timer.stage("overlay"):
        write_preview(load_nifti(held.image).data, heldout.pop("_pred"), out / "overlay.png",
                      truth=heldout.pop("_truth"),
                      title=f"held-out case {held.case_id} via dunet-infer: "
                            f"{heldout['lesion_voxels_pred']} lesion voxels, "
                            f"DSC {heldout['dsc']:.3f}")
    mask_path = heldout.pop("_mask")
    _, train_cases = discover_cases(out / "data")
    report = {
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads()},
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "anatomy": cfg.anatomy,
        "cases": len(train_cases),
        "params": trained["params"],
        "train": trained["train"],
        "eval_val": trained["eval_val"],
        "export": check,
        "heldout": heldout,
        "times_s": timer.times,
        "artifacts": {
            "data": str(out / "data"), "heldout": str(held.image),
            "checkpoint": str(trained["checkpoint"]),
            "metrics_log": str(out / "run" / "metrics.jsonl"), "eval": str(out / "eval"),
            "onnx": str(out / "export" / "model.onnx"), "mask": str(mask_path),
            "infer_summary": str(out / "infer" / "summary.json"),
            "overlay": str(out / "overlay.png"),
        },
    }
    write_json(out / "report.json", report)
    (out / "report.md").write_text(_markdown(report))
    return report


_ANATOMY_TEXT = {
    "ellipsoid": "ellipsoid heads",
    "mni152": "the MNI152 2009a template (nilearn), warped, bias field, implanted lesions",
}


def _markdown(r: dict[str, Any]) -> str:
    ev, ho, tr = r["eval_val"], r["heldout"], r["train"]
    shape = "×".join(str(n) for n in r["config"]["shape"])
    lines = [
        "# dunet-demo report",
        "",
        f"Machine: {r['machine']['cpu_model']}, {r['machine']['cores']} cores "
        f"({r['machine']['torch_threads']} torch threads), {r['machine']['platform']}.",
        f"D-UNet, {r['params']:,} parameters, trained {tr['epochs']} epochs on "
        f"{r['cases']} synthetic cases ({shape} voxels, "
        f"{r['config']['image_size']}×{r['config']['image_size']} input).",
        f"Anatomy: {r['anatomy']} ({_ANATOMY_TEXT[r['anatomy']]}).",
        "",
        "| stage | seconds |",
        "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in r["times_s"].items()],
        "",
        f"Validation DSC: {tr['val_dsc_first_epoch']:.3f} after epoch 1, best "
        f"{tr['val_dsc_best']:.3f} (epoch {tr['best_epoch']}).",
        "",
        "| split | DSC | DSC (global) | recall | precision |",
        "|---|---|---|---|---|",
        f"| validation (native space) | {mean_pm_std(ev, 'dsc')} | "
        f"{ev['dsc_global']:.4f} | {ev['recall_mean']:.4f} | {ev['precision_mean']:.4f} |",
        f"| held-out case {ho['case']} via dunet-infer ({ho['backend']}, "
        f"{ho['precision_run']}) | {ho['dsc']:.4f} | – | {ho['recall']:.4f} | "
        f"{ho['precision']:.4f} |",
        "",
        f"ONNX verification against PyTorch: max abs error "
        f"{r['export'].get('max_abs_error', float('nan')):.2e}, mask agreement "
        f"{100 * r['export'].get('mask_agreement', float('nan')):.3f} %.",
        "",
        "## Artefacts",
        "",
        *[f"- {k}: `{v}`" for k, v in r["artifacts"].items()],
        "",
    ]
    return "\n".join(lines)
