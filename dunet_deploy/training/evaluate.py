"""Native-space evaluation of a segmentation model (paper Table 2 and Fig. 4).

Every case goes through the one inference core
(:func:`dunet_deploy.runtime.core.predict_volume`) with the network as a
pluggable ``predict(float32 [N, C, S, S]) -> float32 [N, 1, S, S]`` callable,
then :func:`~dunet_deploy.metrics.case_metrics` (threshold ``spec.threshold``)
against the native mask — so a PyTorch checkpoint (:func:`evaluate_checkpoint`),
training validation, an ONNX model or a TensorRT engine are scored
identically. Reports (:func:`write_report`): a per-case CSV, a Table-2 summary
as markdown and JSON, and a box plot of the per-case DSC like the paper's Fig. 4.

This module does not import torch at module level (only
:func:`evaluate_checkpoint` does, when called), so the torch-free runtime can
reuse it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import atomic_write_bytes, deferred_interrupts
from dunet_deploy.choices import SPLITS
from dunet_deploy.data.layouts import Case, discover_cases, load_case
from dunet_deploy.errors import DunetError
from dunet_deploy.metrics import (
    CaseMetrics,
    case_metrics,
    format_summary,
    mean_pm_std,
    summarize,
)
from dunet_deploy.postprocess import with_tta
from dunet_deploy.runtime.core import (
    Predictor,
    geometry_of,
    predict_volume,
    segment,
    to_network,
)
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "CSV_FIELDS",
    "SPLITS",
    "Evaluation",
    "Predictor",
    "evaluate_case",
    "evaluate_cases",
    "evaluate_checkpoint",
    "evaluate_checkpoint_file",
    "evaluate_engine",
    "predict_volume",
    "select_cases",
    "table2_markdown",
    "write_boxplot",
    "write_report",
]

Progress = Callable[[int, int, str], None]
CSV_FIELDS = ("case_id", "dsc", "recall", "precision", "tp", "fp", "fn", "lesion_f1",
              "lesion_count_diff", "volume_diff_voxels", "volume_diff_ml")


# ------------------------------------------------------------- prediction
def evaluate_case(
    case: Case,
    spec: PreprocessSpec,
    predict: Predictor,
    *,
    batch_size: int = 16,
    min_lesion_mm3: float = 0.0,
    resample: str = "auto",
    register: Any = None,
) -> CaseMetrics:
    """Native-space scores of one case (image and mask files), segmented as ``dunet-infer`` does.

    Args:
        case: The image and mask files.
        spec: The model's preprocessing spec.
        predict: The network (wrapped for test-time augmentation when wanted).
        batch_size: Slabs per ``predict`` call.
        min_lesion_mm3: Lesions smaller than this are removed before scoring.
        resample: ``"auto"`` or ``"never"`` for scans off the training grid.
        register: A :class:`~dunet_deploy.runtime.register_stage.RegisterStage`
            (``None``: no registration stage).

    Raises:
        DunetError: naming the case when its files cannot be read or do not
            fit the spec.
    """
    image, mask = load_case(case)
    try:
        if register is not None and register.active:
            from dunet_deploy.runtime.register_stage import register_to_network

            net = register_to_network(image.data, image.affine, spec, register,
                                      resample=resample)[0]
        else:
            net = to_network(image.data, spec, affine=image.affine, resample=resample)
        pred = segment(net, geometry_of(image), spec, predict, batch_size=batch_size,
                       min_lesion_mm3=min_lesion_mm3)
    except DunetError as exc:
        raise DunetError(f"case {case.case_id}: {exc}") from None
    return case_metrics(case.case_id, pred.mask, mask, threshold=spec.threshold,
                        zooms=image.zooms)


def evaluate_cases(
    cases: Sequence[Case],
    spec: PreprocessSpec,
    predict: Predictor,
    *,
    progress: Progress | None = None,
    **case_opts: Any,
) -> list[CaseMetrics]:
    """:func:`evaluate_case` for each case, in order.

    Args:
        cases: Cases to score.
        spec: The preprocessing spec of the model.
        predict: The network.
        progress: Optional ``callback(done, total, case_id)`` after each case.
        **case_opts: ``batch_size``, ``min_lesion_mm3``, ``resample``, ``register``
            of :func:`evaluate_case`.
    """
    out = []
    for k, case in enumerate(cases):
        out.append(evaluate_case(case, spec, predict, **case_opts))
        if progress is not None:
            progress(k + 1, len(cases), case.case_id)
    return out


def select_cases(
    data_dir: str | os.PathLike[str],
    *,
    layout: str | None = None,
    case_ids: Sequence[str] | None = None,
) -> list[Case]:
    """Discover a dataset's cases, optionally only ``case_ids`` (in that order).

    Raises:
        DunetError: when the folder has no cases or a requested id is missing.
    """
    _, cases = discover_cases(data_dir, layout)
    if case_ids is None:
        return cases
    by_id = {c.case_id: c for c in cases}
    missing = [cid for cid in case_ids if cid not in by_id]
    if missing:
        raise DunetError(
            f"{data_dir}: case {missing[0]!r} of the requested split is not in the dataset "
            f"({len(missing)} missing)"
        )
    return [by_id[cid] for cid in case_ids]


# ----------------------------------------------------------------- reports
def table2_markdown(
    summary: Mapping[str, Any], *, method: str, params: int | None = None
) -> str:
    """The paper's Table 2 as a markdown table with one row.

    Columns: DSC (mean ± std over cases), DSC (global, pooled voxels), Recall,
    Precision (mean ± std), Total parameters (Keras counting), then the ATLAS
    v2.0 challenge's lesion-wise F1, simple lesion count difference and
    absolute volume difference in ml (mean ± std).
    """

    def pm(key: str, digits: int = 4) -> str:
        return mean_pm_std(summary, key, digits)

    p = f"{params:,}" if params is not None else "–"
    return (
        "| Method | DSC | DSC (global) | Recall | Precision | Total parameters | Lesion F1 | "
        "Lesion count diff | Volume diff (ml) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {method} | {pm('dsc')} | {float(summary['dsc_global']):.4f} | {pm('recall')} | "
        f"{pm('precision')} | {p} | {pm('lesion_f1')} | {pm('lesion_count_diff', 2)} | "
        f"{pm('volume_diff_ml')} |\n"
    )


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
        DunetError: when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DunetError("matplotlib is not installed (pip install matplotlib, or --no-boxplot)"
                         ) from None
    return plt


def write_boxplot(
    metrics: Sequence[CaseMetrics], path: str | os.PathLike[str], *, title: str = "",
    label: str = "model",
) -> Path:
    """Box plot of the per-case DSC (paper Fig. 4), with the cases as dots.

    Uses matplotlib's Agg backend (no display needed).

    Raises:
        DunetError: when matplotlib is not installed.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D

    values = [m.dsc for m in metrics]
    n = len(values)
    fig, ax = plt.subplots(figsize=(4.2, 4.4), dpi=120)
    try:
        ax.boxplot([values], widths=0.5, showmeans=True,
                   medianprops={"color": "tab:orange", "linewidth": 1.5},
                   meanprops={"marker": "^", "markerfacecolor": "tab:green",
                              "markeredgecolor": "tab:green"})
        ax.set_xticks([1], [label])
        jitter = np.random.default_rng(0).uniform(-0.08, 0.08, n)
        ax.scatter(1 + jitter, values, s=10, alpha=0.6, color="tab:blue", zorder=3)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("DSC per case")
        # The title wraps instead of running off the figure (long method names).
        ax.set_title(textwrap.fill(title or f"{n} case{'' if n == 1 else 's'}", 40), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(handles=[
            Line2D([], [], color="tab:orange", linewidth=1.5, label="median"),
            Line2D([], [], marker="^", linestyle="", color="tab:green", label="mean"),
            Line2D([], [], marker="o", linestyle="", color="tab:blue", alpha=0.6, markersize=4,
                   label="one case"),
        ], loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, fontsize=8, frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_report(
    metrics: Sequence[CaseMetrics],
    out_dir: str | os.PathLike[str],
    *,
    method: str = "model",
    params: int | None = None,
    meta: Mapping[str, Any] | None = None,
    boxplot: bool = True,
) -> dict[str, Path]:
    """Write ``cases.csv``, ``summary.json``, ``summary.md`` and ``dsc_boxplot.png``.

    Every file is written atomically; ``out_dir`` is created if needed.

    Args:
        metrics: Per-case scores.
        out_dir: Report folder.
        method: Row label of the table (e.g. the model name).
        params: Parameter count for the table.
        meta: Extra JSON-able facts for ``summary.json`` (checkpoint, split...).
        boxplot: Also draw the box plot.

    Returns:
        ``{"csv", "json", "markdown", "boxplot"}`` -> path (``boxplot`` only
        when drawn).
    """
    if not metrics:
        raise DunetError("no cases to report")
    if boxplot:
        _pyplot()  # fail before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(metrics)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for m in metrics:
        row = asdict(m)
        writer.writerow({k: repr(row[k]) if isinstance(row[k], float) else row[k]
                         for k in CSV_FIELDS})
    paths = {"csv": out / "cases.csv", "json": out / "summary.json",
             "markdown": out / "summary.md"}
    doc = {"method": method, **summary, "params": params,
           "table2": format_summary(summary, params), **dict(meta or {})}
    lines = [table2_markdown(summary, method=method, params=params)]
    facts = {"cases": summary["cases"], **dict(meta or {})}
    lines.append("\n" + "".join(f"- {k}: {v}\n" for k, v in facts.items()))
    n = int(summary["cases"])
    with deferred_interrupts():  # Ctrl-C now: the whole report first, then stop
        atomic_write_bytes(paths["csv"], buf.getvalue().encode())
        atomic_write_bytes(paths["json"], (json.dumps(doc, indent=2) + "\n").encode())
        atomic_write_bytes(paths["markdown"], "".join(lines).encode())
        if boxplot:
            paths["boxplot"] = write_boxplot(
                metrics, out / "dsc_boxplot.png", label=method,
                title=f"{method}: DSC {float(summary['dsc_mean']):.3f} "
                      f"({n} case{'' if n == 1 else 's'})",
            )
    return paths


# -------------------------------------------------------- torch checkpoints
def _split_ids(doc: Mapping[str, Any], split: str, source: str) -> list[str] | None:
    if split not in SPLITS:
        raise DunetError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "all":
        return None
    recorded = (doc.get("config") or {}).get("split") or {}
    ids = recorded.get(split)
    if not isinstance(ids, list) or not ids:
        raise DunetError(f"{source}: checkpoint records no {split!r} split (use --split all)")
    return [str(i) for i in ids]


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str] | Mapping[str, Any],
    data_dir: str | os.PathLike[str],
    *,
    split: str = "all",
    device: str = "auto",
    batch_size: int = 16,
    layout: str | None = None,
    amp: bool = False,
    progress: Progress | None = None,
    tta: str = "none",
    min_lesion_mm3: float = 0.0,
    resample: str = "auto",
) -> list[CaseMetrics]:
    """Native-space scores of a PyTorch checkpoint on a dataset.

    Args:
        checkpoint: A ``.pt`` path, or a dict from ``load_checkpoint``.
        data_dir: Dataset folder.
        split: ``"all"`` cases, or the checkpoint's recorded ``"val"`` or
            ``"train"`` cases.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        batch_size: Slabs per forward pass.
        layout: Force a dataset layout.
        amp: Mixed-precision inference.
        progress: Optional ``callback(done, total, case_id)``.
        tta: ``"none"`` or ``"flip"`` test-time augmentation.
        min_lesion_mm3: Remove smaller connected lesions before scoring.
        resample: ``"auto"`` or ``"never"`` for scans off the training grid.

    Returns:
        Per-case metrics, in dataset (or split) order.

    Raises:
        DunetError: for a bad checkpoint, data folder, split or device.
    """
    from dunet_deploy.training.checkpoint import (
        checkpoint_spec,
        load_checkpoint,
        model_from_checkpoint,
    )
    from dunet_deploy.training.predictor import torch_predictor
    from dunet_deploy.training.trainer import resolve_device

    if isinstance(checkpoint, Mapping):
        doc, source = dict(checkpoint), "checkpoint"
    else:
        doc, source = load_checkpoint(checkpoint), str(checkpoint)
    ids = _split_ids(doc, split, source)
    dev = resolve_device(device)
    cases = select_cases(data_dir, layout=layout, case_ids=ids)
    spec: PreprocessSpec = doc.get("spec_obj") or checkpoint_spec(doc, source)
    model = model_from_checkpoint(doc, source).to(dev).eval()

    predict = with_tta(torch_predictor(model, dev, amp=amp), tta, spec)
    return evaluate_cases(cases, spec, predict, progress=progress, batch_size=batch_size,
                          min_lesion_mm3=min_lesion_mm3, resample=resample)


# ----------------------------------------------------------- whole runs
@dataclass
class Evaluation:
    """A scored model: per-case metrics and what the report says about the model.

    Attributes:
        metrics: Per-case scores, in dataset (or split) order.
        method: Row label of the Table-2 report.
        params: Parameter count (Keras counting), when known.
        meta: JSON-able facts for the report (model file, backend, split...).
        spec: The model's preprocessing spec.
    """

    metrics: list[CaseMetrics]
    method: str
    params: int | None
    meta: dict[str, Any]
    spec: PreprocessSpec


def evaluate_engine(
    engine: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    layout: str | None = None,
    progress: Progress | None = None,
    **segmenter_opts: Any,
) -> Evaluation:
    """Score an exported model (ONNX or TensorRT engine) through the runtime, torch-free.

    Each case is segmented by a :class:`~dunet_deploy.Segmenter` exactly as
    ``dunet-infer`` would (the model's TTA and post-processing defaults unless
    overridden).

    Args:
        engine: ``.onnx`` or ``.plan`` model.
        data_dir: Dataset folder.
        layout: Force a dataset layout.
        progress: Optional ``callback(done, total, case_id)``.
        **segmenter_opts: :class:`~dunet_deploy.Segmenter` options (``backend``,
            ``precision``, ``threads``, ``device``, ``batch_size``, ``tta``,
            ``min_lesion_mm3``, ``resample``, ``register``, ``bias_correct``).

    Raises:
        DunetError: for a bad model, backend choice or data folder.
    """
    from dunet_deploy.runtime.segmenter import Segmenter

    with Segmenter(engine, **segmenter_opts) as seg:
        runner = seg.runner
        metrics = evaluate_cases(select_cases(data_dir, layout=layout), seg.spec,
                                 seg.predictor(), progress=progress, batch_size=seg.batch_size,
                                 min_lesion_mm3=seg.inference.min_lesion_mm3,
                                 resample=seg.resample, register=seg.register_stage())
        meta: dict[str, Any] = {"engine": str(engine), "backend": runner.backend,
                                "precision": runner.precision,
                                "inference": seg.inference_settings()}
        return Evaluation(metrics, f"{runner.info.model_name} ({runner.backend}, "
                          f"{runner.precision})", runner.info.params, meta, seg.spec)


def evaluate_checkpoint_file(
    checkpoint: str | os.PathLike[str], data_dir: str | os.PathLike[str], **opts: Any
) -> Evaluation:
    """:func:`evaluate_checkpoint` (same ``opts``) with the report facts (needs torch).

    Raises:
        DunetError: for a bad checkpoint, split, device or data folder.
    """
    from dunet_deploy.models import keras_param_count
    from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint

    doc = load_checkpoint(checkpoint)
    params = keras_param_count(model_from_checkpoint(doc, str(checkpoint)))
    metrics = evaluate_checkpoint(doc, data_dir, **opts)
    epoch = int(doc.get("epoch", 0))
    meta = {"checkpoint": str(checkpoint), "epoch": epoch,
            "inference": {"tta": opts.get("tta", "none"),
                          "min_lesion_mm3": float(opts.get("min_lesion_mm3", 0.0)),
                          "resample": opts.get("resample", "auto")}}
    return Evaluation(metrics, f"{doc['model_name']} (epoch {epoch})", params, meta,
                      doc["spec_obj"])
