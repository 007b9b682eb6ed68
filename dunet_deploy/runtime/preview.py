"""``dunet-infer --preview``: one PNG per case to look at a segmentation at a glance.

A row of axial slices spread over the lesion (predicted, and true when a
reference mask is known), the T1 in grey, the prediction's outline in one
colour and the reference's in another; the title names the case, the lesion
volume and, with a reference, the DSC.

The reference is found by layout (:func:`truth_for`): the ``*LesionSmooth*``
masks beside an ATLAS R1.1 scan, the ``_label-L_desc-T1lesion_mask`` beside
an ATLAS v2.0 ``_T1w``, ``labelsTr/<id>`` for ``imagesTr/<id>[_0000]``.

matplotlib is optional in the runtime: :func:`require_matplotlib` says so in
one line. Nothing here imports torch.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import atomic_write_bytes
from dunet_deploy.errors import DunetError

__all__ = ["PREVIEW_SUFFIX", "preview_slices", "require_matplotlib", "truth_for",
           "write_preview", "write_previews"]

PREVIEW_SUFFIX = "_preview.png"
PRED_COLOUR = "#ff3b30"   # prediction outline (red)
TRUTH_COLOUR = "#34c3ff"  # reference outline (cyan)
_V2_IMAGE = "_T1w.nii.gz"
_V2_MASK = "_label-L_desc-T1lesion_mask.nii.gz"
_NII = re.compile(r"\.nii(\.gz)?$")


def require_matplotlib(option: str = "--preview") -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or a one-line error naming the install.

    Raises:
        DunetError: ``"--preview needs matplotlib, which is not installed: ..."``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DunetError(f"{option} needs matplotlib, which is not installed: pip install "
                         "matplotlib (or 'dunet-deploy[train]')") from None
    return plt


def truth_for(scan: str | os.PathLike[str]) -> list[Path]:
    """The reference mask(s) of ``scan`` in our known layouts; ``[]`` when there is none."""
    p = Path(scan)
    if re.search(r"t1w_deface_stx\.nii(\.gz)?$", p.name):
        return sorted(m for m in p.parent.iterdir() if "LesionSmooth" in m.name
                      and _NII.search(m.name))
    if p.name.endswith(_V2_IMAGE):
        mask = p.with_name(p.name[: -len(_V2_IMAGE)] + _V2_MASK)
        return [mask] if mask.is_file() else []
    if p.parent.name == "imagesTr":
        stem = re.sub(r"_0000$", "", _NII.sub("", p.name))
        labels = p.parent.parent / "labelsTr"
        return [m for m in (labels / f"{stem}.nii.gz", labels / f"{stem}.nii") if m.is_file()][:1]
    return []


def preview_slices(pred: np.ndarray, truth: np.ndarray | None = None, n: int = 4) -> list[int]:
    """``n`` axial slices spread evenly over the lesion's extent (the middle ones if none).

    Args:
        pred: uint8 ``[X, Y, Z]`` predicted mask.
        truth: optional ``[X, Y, Z]`` reference mask (its extent counts too).
        n: slices wanted (fewer when the lesion spans fewer).
    """
    lesion = pred > 0 if truth is None else (pred > 0) | (truth > 0)
    zs = np.flatnonzero(lesion.any(axis=(0, 1)))
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, pred.shape[2] - 1)
    if not zs.size:  # no lesion anywhere: the central part of the volume
        mid, half = pred.shape[2] // 2, max(1, pred.shape[2] // 6)
        lo, hi = max(0, mid - half), min(pred.shape[2] - 1, mid + half)
    picks = np.linspace(lo, hi, num=min(n, hi - lo + 1)).round().astype(int)
    return sorted({int(z) for z in picks})


def write_preview(
    image: np.ndarray, pred: np.ndarray, path: str | os.PathLike[str], *, title: str,
    truth: np.ndarray | None = None, n_slices: int = 4,
) -> Path:
    """Write the PNG: slices of ``image`` with the outlines of ``pred`` (and ``truth``).

    Args:
        image: float ``[X, Y, Z]`` T1 volume.
        pred: ``[X, Y, Z]`` predicted mask (non-zero = lesion).
        path: PNG to write (atomically).
        title: Figure title (case, lesion volume, DSC).
        truth: Optional ``[X, Y, Z]`` reference mask.
        n_slices: Slices to show.
    """
    plt = require_matplotlib()
    from matplotlib.lines import Line2D

    zs = preview_slices(pred, truth, n_slices)
    lo, hi = np.percentile(image, [1, 99.5]) if image.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(zs), figsize=(2.7 * len(zs), 3.4), squeeze=False)
    try:
        for ax, z in zip(axes[0], zs):
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            for mask, colour in ((truth, TRUTH_COLOUR), (pred, PRED_COLOUR)):
                if mask is not None and (mask[:, :, z] > 0).any():
                    ax.contour((mask[:, :, z] > 0).T.astype(np.float32), levels=[0.5],
                               colors=[colour], linewidths=1.2, origin="lower")
            ax.set_title(f"z = {z}", fontsize=8)
            ax.set_axis_off()
        handles = [Line2D([], [], color=PRED_COLOUR, label="prediction")]
        if truth is not None:
            handles.append(Line2D([], [], color=TRUTH_COLOUR, label="reference"))
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 0.95))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def case_scan(case: Mapping[str, Any]) -> Any:
    """The scan a ``summary.json`` case was made from: a NIfTI file or its DICOM series.

    Returns:
        A :class:`~dunet_deploy.data.nifti.NiftiVolume` (data and affine).
    """
    from dunet_deploy.runtime.dicom_io import ScanReader

    source = case.get("source") or {}
    return ScanReader(source.get("series_uid")).read(Path(case["input"]))


def _case_preview(case: Mapping[str, Any], out_dir: Path) -> Path:
    """The preview of one ``summary.json`` case (its input, mask and reference if found)."""
    from dunet_deploy.data.nifti import load_mask, load_nifti
    from dunet_deploy.metrics import case_metrics
    from dunet_deploy.runtime.pipeline import output_stem

    scan = Path(case["input"])
    image = case_scan(case).data
    pred = (load_nifti(case["mask"]).data > 0).astype(np.uint8)
    title = f"{output_stem(scan)}: lesion {float(case['lesion_volume_mm3']):.0f} mm³"
    masks = truth_for(scan)
    truth = None
    if masks:
        truth = load_mask(masks).reshape(image.shape)
        score = case_metrics(output_stem(scan), pred.astype(np.float32), truth).dsc
        title += f", DSC {score:.3f} vs {masks[0].name}" + (" …" if len(masks) > 1 else "")
    return write_preview(image, pred, out_dir / f"{output_stem(scan)}{PREVIEW_SUFFIX}",
                         title=title, truth=truth)


def write_previews(cases: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]
                   ) -> list[Path]:
    """One ``<name>_preview.png`` in ``out_dir`` per segmented case of a ``summary.json``."""
    return [_case_preview(c, Path(out_dir)) for c in cases if c.get("status") == "ok"]
