"""Finding image/mask pairs in the dataset layouts people actually have.

Supported layouts (auto-detected by :func:`discover_cases`):

``pairs``
    ``imagesTr/<id>.nii[.gz]`` with ``labelsTr/<id>.nii[.gz]``; nnU-Net style
    ``imagesTr/<id>_0000.nii.gz`` images are accepted too.
``atlas-v2``
    ATLAS 2.0 BIDS: ``.../sub-*/ses-*/anat/*_T1w.nii.gz`` with
    ``*_label-L_desc-T1lesion_mask.nii.gz`` next to it (site folders such as
    ``Training/R001/`` above the subjects are allowed).
``atlas-r1.1``
    ATLAS R1.1: ``<site>/<subject>/t01/*t1w_deface_stx.nii.gz`` with one or
    more ``*LesionSmooth*`` masks in the same folder (merged by logical OR).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from dunet_deploy.choices import LAYOUTS
from dunet_deploy.data.nifti import NiftiVolume, load_mask, load_nifti
from dunet_deploy.errors import DunetError

__all__ = ["LAYOUTS", "Case", "check_case", "discover_cases", "split_cases"]


_NII = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_V2_IMAGE_SUFFIX = "_T1w.nii.gz"
_V2_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"


@dataclass(frozen=True)
class Case:
    """One training/evaluation case.

    Attributes:
        case_id: Unique, filesystem-safe-ish identifier (subject id).
        image: The T1 image.
        masks: One or more lesion masks, merged by logical OR.
    """

    case_id: str
    image: Path
    masks: tuple[Path, ...]


def _is_nii(path: Path) -> bool:
    return path.is_file() and bool(_NII.search(path.name))


def _strip_nii(name: str) -> str:
    return _NII.sub("", name)


def _discover_pairs(root: Path) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        return []
    if not labels_dir.is_dir():
        raise DunetError(f"{root}: has imagesTr/ but no labelsTr/ folder")
    labels = {_strip_nii(p.name): p for p in sorted(labels_dir.iterdir()) if _is_nii(p)}
    cases: dict[str, Case] = {}
    for img in sorted(images_dir.iterdir()):
        if not _is_nii(img) or img.name.startswith("."):
            continue
        stem = _strip_nii(img.name)
        nnunet = re.fullmatch(r"(.+)_(\d{4})", stem)
        if nnunet:
            if nnunet.group(2) != "0000":
                raise DunetError(
                    f"{img}: extra input channel {nnunet.group(2)}; only single-channel T1 "
                    "(_0000) images are supported"
                )
            stem = nnunet.group(1)
        if stem in cases:
            raise DunetError(f"{img}: duplicate case id {stem!r} (also {cases[stem].image})")
        label = labels.get(stem)
        if label is None:
            raise DunetError(f"case {stem}: no mask labelsTr/{stem}.nii.gz for image {img}")
        cases[stem] = Case(stem, img, (label,))
    return list(cases.values())


def _discover_atlas_v2(root: Path) -> list[Case]:
    cases: dict[str, Case] = {}
    for img in sorted(root.rglob(f"*{_V2_IMAGE_SUFFIX}")):
        anat = img.parent
        ses, sub = anat.parent, anat.parent.parent
        bids = anat.name == "anat" and ses.name.startswith("ses-") and sub.name.startswith("sub-")
        if not bids:
            continue
        case_id = f"{sub.name}_{ses.name}"
        mask = anat / (img.name[: -len(_V2_IMAGE_SUFFIX)] + _V2_MASK_SUFFIX)
        if not mask.is_file():
            raise DunetError(f"case {case_id}: missing lesion mask {mask}")
        if case_id in cases:
            raise DunetError(f"{img}: duplicate case id {case_id!r} (also {cases[case_id].image})")
        cases[case_id] = Case(case_id, img, (mask,))
    return list(cases.values())


def _discover_atlas_r11(root: Path) -> list[Case]:
    cases: dict[str, Case] = {}
    found = [p for p in root.glob("*/*/t01/*") if re.search(r"t1w_deface_stx\.nii(\.gz)?$", p.name)]
    for img in sorted(found):
        t01 = img.parent
        case_id = t01.parent.name
        masks = tuple(sorted(p for p in t01.iterdir() if "LesionSmooth" in p.name and _is_nii(p)))
        if not masks:
            raise DunetError(f"case {case_id}: no *LesionSmooth* mask in {t01}")
        if case_id in cases:
            raise DunetError(f"{img}: duplicate case id {case_id!r} (also {cases[case_id].image})")
        cases[case_id] = Case(case_id, img, masks)
    return list(cases.values())


_DISCOVERERS = {
    "pairs": _discover_pairs,
    "atlas-v2": _discover_atlas_v2,
    "atlas-r1.1": _discover_atlas_r11,
}


def discover_cases(
    root: str | os.PathLike[str], layout: str | None = None
) -> tuple[str, list[Case]]:
    """Find all cases under ``root``.

    Args:
        root: Dataset folder.
        layout: Force one of :data:`LAYOUTS`; ``None`` tries ``pairs``,
            ``atlas-v2`` and ``atlas-r1.1`` in that order and takes the first
            that finds cases.

    Returns:
        ``(layout_name, cases)`` with cases sorted by ``case_id``.

    Raises:
        DunetError: when the root is missing, nothing matches, a case lacks
            its mask, or case ids collide.
    """
    base = Path(root)
    if not base.exists():
        raise DunetError(f"{base}: dataset folder does not exist")
    if not base.is_dir():
        raise DunetError(f"{base}: not a folder")
    if layout is not None and layout not in _DISCOVERERS:
        raise DunetError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    names = [layout] if layout is not None else ["pairs", "atlas-v2", "atlas-r1.1"]
    for name in names:
        cases = _DISCOVERERS[name](base)
        if cases:
            return name, sorted(cases, key=lambda c: c.case_id)
    wanted = layout if layout is not None else " or ".join(LAYOUTS)
    raise DunetError(
        f"{base}: no cases found for layout {wanted} (expected imagesTr/+labelsTr/, "
        "sub-*/ses-*/anat/*_T1w.nii.gz, or <site>/<subject>/t01/*t1w_deface_stx.nii.gz)"
    )


def _header_geometry(case: Case, path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    if not path.is_file():
        raise DunetError(f"case {case.case_id}: {path}: no such file")
    try:
        img: Any = nib.load(str(path))
        shape = tuple(int(n) for n in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # corrupt or non-NIfTI header
        raise DunetError(f"case {case.case_id}: {path}: cannot read NIfTI header ({exc})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DunetError(f"case {case.case_id}: {path}: expected a 3D volume, got shape {shape}")
    return shape, affine


def check_case(case: Case, *, atol: float = 1e-3) -> None:
    """Check that a case's image and masks share shape and affine.

    Only headers are read, so this is cheap enough to run on a whole dataset
    before training.

    Args:
        case: The case.
        atol: Absolute tolerance on affine entries (mm).

    Raises:
        DunetError: naming the case and the mismatching file.
    """
    shape, affine = _header_geometry(case, case.image)
    for mask in case.masks:
        m_shape, m_affine = _header_geometry(case, mask)
        if m_shape != shape:
            raise DunetError(
                f"case {case.case_id}: mask {mask.name} shape {m_shape} differs from image "
                f"shape {shape}"
            )
        if not np.allclose(m_affine, affine, atol=atol):
            raise DunetError(
                f"case {case.case_id}: mask {mask.name} affine differs from the image's affine"
            )


def split_cases(
    cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """Split cases (never slices) into training and validation sets.

    Deterministic for a given ``seed`` and set of case ids, independent of the
    input order. With two or more cases each side gets at least one.

    Args:
        cases: The cases.
        val_fraction: Fraction for validation, in (0, 1).
        seed: Shuffling seed.

    Returns:
        ``(train, val)``, each sorted by ``case_id``.

    Raises:
        DunetError: when ``val_fraction`` is outside (0, 1) or case ids repeat.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DunetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    ids = [c.case_id for c in ordered]
    if len(set(ids)) != len(ids):
        raise DunetError("split_cases: duplicate case ids")
    n = len(ordered)
    if n < 2:
        return ordered, []
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    train = [c for i, c in enumerate(ordered) if i not in val_idx]
    val = [c for i, c in enumerate(ordered) if i in val_idx]
    return train, val


def load_case(case: Case) -> tuple[NiftiVolume, np.ndarray]:
    """Read a case's image and merged mask.

    Returns:
        ``(image, mask)``: the image volume and a uint8 mask of the same shape.

    Raises:
        DunetError: naming the case when a file is unreadable or the shapes differ.
    """
    image = load_nifti(case.image)
    mask = load_mask(list(case.masks))
    if mask.shape != image.data.shape:
        raise DunetError(
            f"case {case.case_id}: mask shape {mask.shape} differs from image shape "
            f"{image.data.shape}"
        )
    return image, mask

