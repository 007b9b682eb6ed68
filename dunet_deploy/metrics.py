"""Segmentation metrics of the paper (Eq. 6–8) and of the ATLAS v2.0 challenge.

Shared by training, ``dunet-eval`` and the runtime (numpy and scipy only).
Predictions are probabilities or masks; they are binarised with ``p >=
threshold`` (the paper: "less than 0.5 -> 0, otherwise 1"). Ground truth is any
array where nonzero means lesion.

The challenge's lesion-wise scores count lesions as connected components with
face connectivity (``scipy.ndimage.label``'s default structure): a true lesion
is detected when any of its voxels is predicted; a predicted component that
touches no true lesion is a false positive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

THRESHOLD = 0.5
#: Per-case scores that :func:`summarize` averages (``<key>_mean``, ``<key>_std``).
MEAN_FIELDS = ("dsc", "recall", "precision", "lesion_f1", "lesion_count_diff",
               "volume_diff_voxels", "volume_diff_ml")


@dataclass(frozen=True)
class Counts:
    """Voxel counts of one case (or of a whole set, for the global DSC)."""

    tp: int
    fp: int
    fn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def confusion(pred: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD) -> Counts:
    """TP, FP and FN voxels of ``pred`` (probabilities or a mask) against ``truth``.

    Args:
        pred: any shape; binarised with ``pred >= threshold``.
        truth: same shape; ``truth > 0`` is lesion.
    """
    pred = np.asarray(pred)
    truth = np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} shapes differ")
    p = pred >= threshold
    t = truth > 0
    tp = int(np.count_nonzero(p & t))
    return Counts(tp=tp, fp=int(np.count_nonzero(p)) - tp, fn=int(np.count_nonzero(t)) - tp)


def dsc(c: Counts) -> float:
    """``2TP / (2TP + FP + FN)``; 0 when both prediction and truth are empty (as the authors)."""
    den = 2 * c.tp + c.fp + c.fn
    return 2 * c.tp / den if den else 0.0


def recall(c: Counts) -> float:
    """``TP / (TP + FN)``; 0 for an empty truth."""
    den = c.tp + c.fn
    return c.tp / den if den else 0.0


def precision(c: Counts) -> float:
    """``TP / (TP + FP)``; an empty prediction scores 0, as in the authors' evaluation."""
    den = c.tp + c.fp
    return c.tp / den if den else 0.0


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask, face connectivity (6-neighbourhood in 3D).

    Args:
        mask: bool/int array of any dimension (``> 0`` is lesion); singleton
            axes (e.g. ``[Z, 1, S, S]`` slab grids) do not change the result.

    Returns:
        ``(labels int32 same shape, count)``; background is 0.
    """
    binary = np.asarray(mask) > 0
    structure = ndimage.generate_binary_structure(binary.ndim, 1)
    labels, count = ndimage.label(binary, structure=structure)
    return labels, int(count)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion-wise detection counts of one case (ATLAS v2.0)."""

    tp: int  # true lesions with any predicted voxel
    fn: int  # true lesions with none
    fp: int  # predicted components touching no true lesion
    n_pred: int  # predicted components
    n_true: int  # true components


def lesion_counts(pred_mask: np.ndarray, truth: np.ndarray) -> LesionCounts:
    """Detected, missed and spurious lesions (3D face-connected components).

    Args:
        pred_mask: binary prediction (``> 0``).
        truth: same shape; ``> 0`` is lesion.
    """
    p, t = np.asarray(pred_mask) > 0, np.asarray(truth) > 0
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and truth {t.shape} shapes differ")
    true_labels, n_true = label_lesions(t)
    pred_labels, n_pred = label_lesions(p)
    detected = np.unique(true_labels[p & t]).size  # labels > 0 only: p & t excludes 0
    touching = np.unique(pred_labels[p & t]).size
    return LesionCounts(tp=detected, fn=n_true - detected, fp=n_pred - touching,
                        n_pred=n_pred, n_true=n_true)


def lesion_f1(c: LesionCounts) -> float:
    """``TP / (TP + (FP + FN) / 2)`` over lesions; 1.0 when both masks are empty."""
    den = c.tp + (c.fp + c.fn) / 2
    return c.tp / den if den else 1.0


def lesion_count_diff(c: LesionCounts) -> int:
    """``|#predicted components - #true components|`` (the challenge's simple lesion count)."""
    return abs(c.n_pred - c.n_true)


@dataclass(frozen=True)
class CaseMetrics:
    """Per-case scores: paper Table 2 columns and the ATLAS v2.0 challenge's.

    ``volume_diff_voxels`` and ``volume_diff_ml`` are absolute differences of
    the predicted and true lesion volumes.
    """

    case_id: str
    dsc: float
    recall: float
    precision: float
    tp: int
    fp: int
    fn: int
    lesion_f1: float
    lesion_count_diff: int
    volume_diff_voxels: int
    volume_diff_ml: float


def case_metrics(
    case_id: str,
    pred: np.ndarray,
    truth: np.ndarray,
    threshold: float = THRESHOLD,
    *,
    zooms: Sequence[float] | None = None,
) -> CaseMetrics:
    """Scores of one case (whole volume, or all of its slabs stacked).

    Args:
        case_id: Stored in the result.
        pred: Probabilities or mask; ``>= threshold`` is lesion.
        truth: Same shape; ``> 0`` is lesion.
        threshold: Binarisation threshold of ``pred``.
        zooms: Voxel size in mm of the first three axes (for
            ``volume_diff_ml``); ``None`` means 1 mm isotropic (ATLAS).
    """
    c = confusion(pred, truth, threshold)
    lc = lesion_counts(np.asarray(pred) >= threshold, truth)
    voxel_ml = float(np.prod(zooms[:3])) / 1000.0 if zooms is not None else 1e-3
    diff = abs((c.tp + c.fp) - (c.tp + c.fn))
    return CaseMetrics(case_id, dsc(c), recall(c), precision(c), c.tp, c.fp, c.fn,
                       lesion_f1=lesion_f1(lc), lesion_count_diff=lesion_count_diff(lc),
                       volume_diff_voxels=diff, volume_diff_ml=diff * voxel_ml)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof=1; 0 for fewer than two values)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(cases: Iterable[CaseMetrics]) -> dict[str, Any]:
    """Table-2 style summary: mean ± sample std of the per-case scores and the global DSC.

    The global DSC pools the voxels of all cases before computing the score;
    every field of :data:`MEAN_FIELDS` gets ``<key>_mean`` and ``<key>_std``.
    A sample spread over fewer than two cases is undefined: ``<key>_std`` is
    ``None`` then (``null`` in JSON, ``±n/a`` in :func:`mean_pm_std`), never 0.
    """
    cases = list(cases)
    total = Counts(0, 0, 0)
    for c in cases:
        total = total + Counts(c.tp, c.fp, c.fn)
    out: dict[str, Any] = {"cases": len(cases), "dsc_global": dsc(total)}
    for key in MEAN_FIELDS:
        m, s = mean_std(getattr(c, key) for c in cases)
        out[f"{key}_mean"] = m
        out[f"{key}_std"] = s if len(cases) > 1 else None
    return out


def mean_pm_std(summary: Mapping[str, object], key: str, digits: int = 4) -> str:
    """``"0.6430±0.2945"`` for ``<key>_mean``/``<key>_std`` of a :func:`summarize` result.

    With fewer than two cases (``summary["cases"]``), or a ``None``/NaN spread,
    the standard deviation is undefined and printed as ``n/a``: ``"0.6430±n/a"``.
    """
    mean = float(summary[f"{key}_mean"])  # type: ignore[arg-type]
    raw = summary[f"{key}_std"]
    std = math.nan if raw is None else float(raw)  # type: ignore[arg-type]
    cases = summary.get("cases")
    undefined = math.isnan(std) or (isinstance(cases, (int, np.integer)) and cases < 2)
    return f"{mean:.{digits}f}±" + ("n/a" if undefined else f"{std:.{digits}f}")


def format_summary(summary: Mapping[str, float | int | None], params: int | None = None) -> str:
    """One Table-2 row plus the ATLAS v2.0 scores.

    ``DSC  DSC(global)  Recall  Precision  LesionF1  CountDiff  VolDiff(ml)  [Parameters]``;
    a spread over fewer than two cases is ``n/a``.
    """

    def pm(key: str, digits: int = 4) -> str:
        return mean_pm_std(summary, key, digits)

    row = (f"{pm('dsc')}  {summary['dsc_global']:.4f}  {pm('recall')}  {pm('precision')}  "
           f"{pm('lesion_f1')}  {pm('lesion_count_diff', 2)}  {pm('volume_diff_ml')}")
    return row + (f"  {params:,}" if params is not None else "")


def to_dict(m: CaseMetrics) -> dict[str, float | int | str]:
    """Plain dict (for CSV/JSON)."""
    return asdict(m)
