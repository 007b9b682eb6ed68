"""Segmentation metrics of the paper (Eq. 6–8), numpy only.

Shared by training, ``dunet-eval`` and the runtime. Predictions are
probabilities or masks; they are binarised with ``p >= threshold`` (the paper:
"less than 0.5 -> 0, otherwise 1"). Ground truth is any array where nonzero means
lesion.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np

THRESHOLD = 0.5


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


@dataclass(frozen=True)
class CaseMetrics:
    """Per-case scores (paper Table 2 columns)."""

    case_id: str
    dsc: float
    recall: float
    precision: float
    tp: int
    fp: int
    fn: int


def case_metrics(
    case_id: str, pred: np.ndarray, truth: np.ndarray, threshold: float = THRESHOLD
) -> CaseMetrics:
    """Scores of one case (whole volume, or all of its slabs stacked)."""
    c = confusion(pred, truth, threshold)
    return CaseMetrics(case_id, dsc(c), recall(c), precision(c), c.tp, c.fp, c.fn)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof=1; 0 for fewer than two values)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return 0.0, 0.0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summarize(cases: Iterable[CaseMetrics]) -> dict[str, float | int]:
    """Table-2 style summary: mean ± sample std of the per-case scores and the global DSC.

    The global DSC pools the voxels of all cases before computing the score.
    """
    cases = list(cases)
    total = Counts(0, 0, 0)
    for c in cases:
        total = total + Counts(c.tp, c.fp, c.fn)
    out: dict[str, float | int] = {"cases": len(cases), "dsc_global": dsc(total)}
    for key in ("dsc", "recall", "precision"):
        m, s = mean_std(getattr(c, key) for c in cases)
        out[f"{key}_mean"] = m
        out[f"{key}_std"] = s
    return out


def format_summary(summary: Mapping[str, float | int], params: int | None = None) -> str:
    """One Table-2 row: ``DSC  DSC(global)  Recall  Precision  [Parameters]``."""

    def pm(key: str) -> str:
        return f"{summary[f'{key}_mean']:.4f}±{summary[f'{key}_std']:.4f}"

    row = f"{pm('dsc')}  {summary['dsc_global']:.4f}  {pm('recall')}  {pm('precision')}"
    return row + (f"  {params:,}" if params is not None else "")


def to_dict(m: CaseMetrics) -> dict[str, float | int | str]:
    """Plain dict (for CSV/JSON)."""
    return asdict(m)
