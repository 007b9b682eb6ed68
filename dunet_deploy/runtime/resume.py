"""Resumable runs: which cases an output folder already holds, made by this model and options.

A killed or pre-empted run leaves complete files only (every output is written
to a temporary name and renamed) and, unless it was SIGKILLed, a summary that
lists its finished cases. A case counts as done when

* a summary in the folder (``summary.json`` or a shard's ``summary-I-of-N.json``)
  lists it as ``ok`` under the same :class:`RunFingerprint` (model file digest
  and :meth:`InferenceOptions.fingerprint` of the options that change the
  outputs), and
* its mask — and its probability map when one is asked for, of the asked type —
  is in the folder as a whole, readable NIfTI (a gzip stream is read to its end,
  which checks its CRC and length).

:func:`plan_run` is what every executor (in-process, worker processes, Ray)
calls before it starts: this run's inputs (a shard's part of them, with a
shard), those it can skip (``skip_existing``) and the entries its summary
records so that a later run can resume from it.

Nothing here imports torch or a backend.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import (
    MASK_SUFFIX,
    NIFTI_READER,
    PROB_SUFFIX,
    SUMMARY_NAME,
    CaseResult,
    InputItem,
    Reader,
    output_stem,
)
from dunet_deploy.runtime.shards import Shard, ShardPlan, plan_shard

__all__ = [
    "RunFingerprint",
    "RunPlan",
    "completed_cases",
    "model_digest",
    "nifti_complete",
    "plan_run",
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


@dataclass(frozen=True)
class RunFingerprint:
    """What made a folder's outputs: the ``"fingerprint"`` entry of a summary.

    Attributes:
        model: :func:`model_digest` of the model file.
        options: :meth:`InferenceOptions.fingerprint` of the run's options,
            with the model's defaults applied (speed settings do not enter it).
    """

    model: str
    options: str

    @classmethod
    def of(cls, model_path: str | os.PathLike[str], options: InferenceOptions
           ) -> RunFingerprint:
        """The fingerprint of a run of ``model_path`` with ``options``."""
        return cls(model_digest(model_path), options.fingerprint())

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


# ---------------------------------------------------------------- run plan
@dataclass(frozen=True)
class RunPlan:
    """Which of a run's inputs it segments, and which it keeps from earlier runs.

    Attributes:
        items: The run's inputs (with a shard, the shard's), in input order.
        todo: Those to segment now, in input order.
        kept: ``str(item.path)`` -> the earlier result of each input skipped
            (``skip_existing``), its file paths in this run's output folder.
        fingerprint: What makes this run's outputs.
        shard: The shard's part of the inputs, or ``None`` (the whole run).
    """

    items: tuple[InputItem, ...]
    todo: tuple[InputItem, ...]
    kept: Mapping[str, CaseResult] = field(default_factory=dict)
    fingerprint: RunFingerprint | None = None
    shard: ShardPlan | None = None

    @property
    def summary_name(self) -> str:
        """``summary.json``, or a shard's ``summary-I-of-N.json``."""
        return SUMMARY_NAME if self.shard is None else self.shard.shard.summary_name

    def results(self, finished: Iterable[CaseResult]) -> list[CaseResult]:
        """The kept results and ``finished`` ones (any order, any subset), in input order."""
        by_input = {**self.kept, **{r.input: r for r in finished}}
        return [by_input[key] for key in (str(i.path) for i in self.items) if key in by_input]

    def summary_entries(self) -> dict[str, Any]:
        """What the run's summary adds: ``fingerprint``, ``skipped_existing`` and ``shard``."""
        entries: dict[str, Any] = {
            "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
            "skipped_existing": len(self.kept)}
        if self.shard is not None:
            entries["shard"] = self.shard.to_dict()
        return entries


def _kept_result(row: Mapping[str, Any], item: InputItem, out: Path) -> CaseResult:
    """An earlier summary row as this run's result for ``item`` (files named in ``out``)."""
    known = {f.name for f in dataclasses.fields(CaseResult)}
    result = CaseResult(**{k: v for k, v in row.items() if k in known})
    stem = output_stem(item.path)
    result.input = str(item.path)
    result.mask = str(out / f"{stem}{MASK_SUFFIX}")
    if row.get("prob"):
        result.prob = str(out / f"{stem}{PROB_SUFFIX}")
    return result


def plan_run(
    inputs: Sequence[str | os.PathLike[str]],
    items: Sequence[InputItem],
    out_dir: str | os.PathLike[str],
    options: InferenceOptions,
    fingerprint: RunFingerprint | None,
    *,
    shard: Shard | None = None,
    reader: Reader = NIFTI_READER,
) -> RunPlan:
    """This run's part of the inputs and the cases it need not redo.

    Args:
        inputs: The inputs as given (a shard is chosen by each case's path
            relative to its input).
        items: ``expand_inputs(inputs, ...)``.
        out_dir: The output folder (need not exist yet).
        options: The run's options with the model's defaults applied:
            ``skip_existing`` keeps the cases :func:`completed_cases` finds;
            ``save_prob`` / ``prob_dtype`` say which files a case needs.
        fingerprint: This run's model and options (``None``: not recorded,
            and nothing is skipped).
        shard: Segment only this shard's cases.
        reader: Says what an input is (as ``items`` were expanded).

    Returns:
        A :class:`RunPlan`.
    """
    shard_plan = None
    if shard is not None:
        shard_plan = plan_shard(inputs, shard, recursive=options.recursive, items=items,
                                reader=reader)
        items = shard_plan.items
    kept: dict[str, CaseResult] = {}
    if options.skip_existing and fingerprint is not None:
        out = Path(out_dir)
        done = completed_cases(out, fingerprint, save_prob=options.save_prob,
                               prob_dtype=options.prob_dtype)
        for item in items:
            row = done.get(output_stem(item.path))
            if item.error is None and row is not None:
                kept[str(item.path)] = _kept_result(row, item, out)
    todo = tuple(item for item in items if str(item.path) not in kept)
    return RunPlan(tuple(items), todo, kept, fingerprint, shard_plan)
