"""Resumable runs: which cases an output folder already holds, made by this model and options.

A killed or pre-empted run leaves complete files only (every output is written
to a temporary name and renamed) and, unless it was SIGKILLed, a summary that
lists its finished cases. A case counts as done when

* a summary in the folder (``summary.json`` or a shard's ``summary-I-of-N.json``)
  lists it as ``ok`` under the same :class:`RunFingerprint` (model file digest
  and :meth:`InferenceOptions.fingerprint` of the options that change the
  outputs), its files no newer than that summary (a later run with other
  options may have replaced them) — or, for a run SIGKILLed before its summary,
  its :class:`Journal` lists it, its files unchanged since; and
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def description_digest(info: Any) -> str:
    """``described:sha256:<hex>`` of a model's description, for a model known only by its
    server (no local file to hash): its spec, name, weights count, precision, defaults."""
    blob = json.dumps(info.to_metadata(), sort_keys=True).encode()
    return f"described:sha256:{hashlib.sha256(blob).hexdigest()}"


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


#: A run's journal: ``.<summary name>.done.jsonl`` in the output folder, one line per case.
JOURNAL_SUFFIX = ".done.jsonl"


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class _Claim:
    """A record that a case was finished: a summary row, or a journal line.

    ``written_ns``: when the summary was written (its files must be older:
    a later run may have replaced them); ``stamps``: the files' size and
    mtime as the journal saw them (they must be unchanged).
    """

    fingerprint: RunFingerprint | None
    case: Mapping[str, Any]
    written_ns: int | None = None
    stamps: Mapping[str, Any] | None = None

    def fresh(self, path: Path) -> bool:
        stamp = _stamp(path)
        if stamp is None:
            return False
        if self.stamps is not None:
            return list(self.stamps.get(path.name) or ()) == list(stamp)
        return self.written_ns is not None and stamp[1] <= self.written_ns


def _claims(out: Path) -> Iterator[_Claim]:
    """Every summary's rows, then every journal's lines (unreadable ones are skipped)."""
    for path in [out / SUMMARY_NAME, *sorted(out.glob("summary-*-of-*.json"))]:
        try:
            written = path.stat().st_mtime_ns
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # missing, or being replaced: its cases are simply redone
        if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
            fp = RunFingerprint.from_summary(doc)
            yield from (_Claim(fp, case, written_ns=written) for case in doc["cases"]
                        if isinstance(case, dict))
    for path in sorted(out.glob(f".summary*{JOURNAL_SUFFIX}")):
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a SIGKILL cut short
            if isinstance(entry, dict) and isinstance(entry.get("case"), dict) \
                    and isinstance(entry.get("files"), dict):
                yield _Claim(RunFingerprint.from_summary(entry), entry["case"],
                             stamps=entry["files"])


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
    for claim in _claims(out):
        case = claim.case
        if claim.fingerprint != fingerprint or case.get("status") != "ok" \
                or not case.get("mask"):
            continue
        # The folder may be mounted elsewhere now: the file names, not the paths, count.
        mask = out / Path(case["mask"]).name
        if not mask.name.endswith(MASK_SUFFIX):
            continue
        stem = mask.name[: -len(MASK_SUFFIX)]
        files = [(mask, np.dtype(np.uint8))]
        if want_prob is not None:
            if not case.get("prob"):
                continue
            files.append((out / Path(case["prob"]).name, want_prob))
        if stem not in done and all(claim.fresh(f) and nifti_complete(f, dt) for f, dt in files):
            done[stem] = dict(case)
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

    def journal(self, out_dir: str | os.PathLike[str]) -> Journal:
        """The journal this run keeps in ``out_dir`` until its summary is written."""
        return Journal(Path(out_dir) / f".{self.summary_name}{JOURNAL_SUFFIX}", self.fingerprint)

    def summary_entries(self) -> dict[str, Any]:
        """What the run's summary adds: ``fingerprint``, ``skipped_existing`` and ``shard``."""
        entries: dict[str, Any] = {
            "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
            "skipped_existing": len(self.kept)}
        if self.shard is not None:
            entries["shard"] = self.shard.to_dict()
        return entries


class Journal:
    """One line per finished case while a run goes: what a SIGKILLed run leaves to resume from.

    A SIGTERM or Ctrl-C lets a run write its summary; the out-of-memory killer
    or an expired grace period (SIGKILL) does not. Each finished case is
    appended (its row, the run's fingerprint, its files' size and mtime) once
    its files are in place; :func:`completed_cases` reads the lines; the run
    removes the journal once its summary, which lists every case, is written.

    Args:
        path: ``OUT/.<summary name>.done.jsonl``.
        fingerprint: The run's (``None``: nothing is recorded).
    """

    def __init__(self, path: Path, fingerprint: RunFingerprint | None) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def record(self, result: CaseResult) -> None:
        """Append a finished case (a failed one is not recorded: it is redone)."""
        if self.fingerprint is None or not result.ok or not result.mask:
            return
        names = [Path(f) for f in (result.mask, result.prob) if f]
        files = {p.name: _stamp(self.path.parent / p.name) for p in names}
        line = json.dumps({"fingerprint": self.fingerprint.to_dict(),
                           "case": result.to_dict(), "files": files})
        with open(self.path, "a") as f:  # one write per line: a kill cuts one line at most
            f.write(line + "\n")

    def close(self) -> None:
        """Remove the journal (the summary now lists every case)."""
        self.path.unlink(missing_ok=True)


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
