"""Resumable runs: which cases an output folder already holds, made by this model and options.

A killed or pre-empted run leaves complete files only (every output is written
to a temporary name and renamed) and, unless it was SIGKILLed, a summary that
lists its finished cases. A case counts as done when

* a summary in the folder (``summary.json`` or a shard's ``summary-I-of-N.json``)
  lists it as ``ok`` under the same :class:`RunFingerprint` (model file digest
  and the digest of the options that change the outputs), and
* its mask — and its probability map when one is asked for, of the asked type —
  is in the folder as a whole, readable NIfTI (a gzip stream is read to its end,
  which checks its CRC and length).

Nothing here imports torch or a backend.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.pipeline import MASK_SUFFIX, SUMMARY_NAME

__all__ = [
    "RunFingerprint",
    "completed_cases",
    "model_digest",
    "nifti_complete",
    "options_digest",
]

_CHUNK = 1 << 20
#: On-disk dtype of each ``prob_dtype`` (see ``Prediction.save``).
_PROB_DTYPES: dict[str, np.dtype] = {"float32": np.dtype(np.float32), "uint16": np.dtype(np.uint16)}


def model_digest(path: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a model file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def options_digest(settings: Mapping[str, Any]) -> str:
    """``sha256:<hex>`` of the options that change the outputs, as canonical JSON.

    Give the settings that change a mask (backend, precision, device, TTA,
    ``min_lesion_mm3``, resampling), not those that only change speed
    (threads, batch size, workers) or which files are written (``save_prob``:
    :func:`completed_cases` checks those files itself).
    """
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), default=str)
    return f"sha256:{hashlib.sha256(text.encode()).hexdigest()}"


@dataclass(frozen=True)
class RunFingerprint:
    """What made a folder's outputs: the ``"fingerprint"`` entry of a summary.

    Attributes:
        model: :func:`model_digest` of the model file.
        options: :func:`options_digest` of the settings that change the outputs.
    """

    model: str
    options: str

    @classmethod
    def of(cls, model_path: str | os.PathLike[str], settings: Mapping[str, Any]
           ) -> RunFingerprint:
        """The fingerprint of a run of ``model_path`` with ``settings``."""
        return cls(model_digest(model_path), options_digest(settings))

    def to_dict(self) -> dict[str, str]:
        """JSON-able form (stored in every summary)."""
        return {"model": self.model, "options": self.options}

    @classmethod
    def from_summary(cls, doc: Mapping[str, Any]) -> RunFingerprint | None:
        """The fingerprint a summary records, or ``None`` (an older or foreign summary)."""
        fp = doc.get("fingerprint")
        if not isinstance(fp, Mapping):
            return None
        model, options = fp.get("model"), fp.get("options")
        if not isinstance(model, str) or not isinstance(options, str):
            return None
        return cls(model, options)


def nifti_complete(path: str | os.PathLike[str], dtype: np.dtype | None = None) -> bool:
    """Whether ``path`` is a whole NIfTI-1 file (``.nii`` or ``.nii.gz``) of ``dtype`` if given.

    A ``.nii.gz`` is decompressed to its end in 1 MiB chunks (bounded memory),
    so a truncated or corrupted stream fails its CRC or length check; the
    uncompressed length must be the header's data offset plus its voxels.
    """
    p = Path(path)
    opener: Any = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(352)
            header = nib.Nifti1Header.from_fileobj(io.BytesIO(head), check=True)
            shape = header.get_data_shape()
            data_dtype = header.get_data_dtype()
            expected = int(header.get_data_offset()) + math.prod(shape) * data_dtype.itemsize
            size = len(head)
            while chunk := f.read(_CHUNK):
                size += len(chunk)
    except (OSError, EOFError, ValueError, TypeError, zlib.error, HeaderDataError,
            WrapStructError):
        return False
    return size == expected and (dtype is None or data_dtype == dtype)


def _summaries(out: Path) -> list[dict[str, Any]]:
    docs = []
    for path in [out / SUMMARY_NAME, *sorted(out.glob("summary-*-of-*.json"))]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # missing, or being replaced: its cases are simply redone
        if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
            docs.append(doc)
    return docs


def completed_cases(
    out_dir: str | os.PathLike[str],
    fingerprint: RunFingerprint,
    *,
    save_prob: bool = False,
    prob_dtype: str = "float32",
) -> dict[str, dict[str, Any]]:
    """The cases of ``out_dir`` that a run with ``fingerprint`` need not redo.

    Args:
        out_dir: The output folder of earlier (possibly cut-off, possibly
            sharded) runs.
        fingerprint: This run's model and options.
        save_prob: This run writes probability maps: a case also needs a
            whole one, stored as ``prob_dtype``.
        prob_dtype: ``float32`` or ``uint16``.

    Returns:
        Output stem (``sub-1_T1w`` for ``sub-1_T1w.nii.gz``) -> the summary
        row that recorded it; empty when ``out_dir`` does not exist.

    Raises:
        DunetError: for an unknown ``prob_dtype``.
    """
    if prob_dtype not in _PROB_DTYPES:
        raise DunetError(f"prob_dtype {prob_dtype!r}: choose one of {', '.join(_PROB_DTYPES)}")
    out = Path(out_dir)
    if not out.is_dir():
        return {}
    want_prob = _PROB_DTYPES[prob_dtype] if save_prob else None
    done: dict[str, dict[str, Any]] = {}
    for doc in _summaries(out):
        if RunFingerprint.from_summary(doc) != fingerprint:
            continue
        for case in doc["cases"]:
            if not isinstance(case, dict) or case.get("status") != "ok" or not case.get("mask"):
                continue
            # The folder may be mounted elsewhere now: the file names, not the paths, count.
            mask = out / Path(case["mask"]).name
            if not mask.name.endswith(MASK_SUFFIX):
                continue
            stem = mask.name[: -len(MASK_SUFFIX)]
            if stem in done or not nifti_complete(mask, np.dtype(np.uint8)):
                continue
            if want_prob is not None and not (
                    case.get("prob") and nifti_complete(out / Path(case["prob"]).name, want_prob)):
                continue
            done[stem] = case
    return done
