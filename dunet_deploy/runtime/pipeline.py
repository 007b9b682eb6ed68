"""The stages of a run over files, shared by every executor.

Per input::

    Reader.read -> prepare_source (core.to_network) -> infer_case (core.predict_grid)
        -> finish_case (core.finish_prediction) -> Writer.write      (write_case = the last two)

Each stage records its problems in the input's :class:`CaseResult` instead of
raising, so one bad input fails only its own case (bugs keep their
traceback). The executors run these stages: in this process
(:mod:`~dunet_deploy.runtime.inprocess`) or with reading and writing in worker
processes (:mod:`~dunet_deploy.runtime.workers`); ``Segmenter.predict`` and
the Triton ``dunet_volume`` model run the same three stages on one volume.
This module also expands command-line inputs (asking the :class:`Reader`
what an input is) and builds ``summary.json``.

Imports point one way: ``core`` <- this module <- executors <- ``Segmenter``
<- CLI. Nothing here imports torch.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dunet_deploy import __version__
from dunet_deploy.data.dicom import source_record
from dunet_deploy.data.nifti import NiftiVolume, load_nifti, nifti_suffix, output_kind
from dunet_deploy.errors import DunetError
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime.base import Runner, one_line
from dunet_deploy.runtime.core import (
    NetworkInput,
    Prediction,
    Predictor,
    finish_prediction,
    geometry_of,
    predict_grid,
    to_network,
)
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.register_stage import RegisterStage, register_to_network
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "NIFTI_READER",
    "NIFTI_WRITER",
    "CaseResult",
    "InputItem",
    "Meter",
    "NiftiReader",
    "NiftiWriter",
    "OutputOptions",
    "PreparedVolume",
    "Reader",
    "Writer",
    "earlier_cases",
    "expand_inputs",
    "finish_case",
    "infer_case",
    "label_file_reason",
    "missing_folders",
    "output_file_reason",
    "output_stem",
    "prepare_output_dir",
    "prepare_source",
    "prepare_volume",
    "remove_empty_folders",
    "summary_document",
    "write_case",
]

MASK_SUFFIX = "_mask.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"
SUMMARY_NAME = "summary.json"
TIME_KEYS = ("read", "preprocess", "infer", "postprocess", "write")
# Errors that fail one case but not the run (bugs keep their traceback).
CASE_ERRORS: tuple[type[BaseException], ...] = (DunetError, OSError, MemoryError)


# -------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputItem:
    """One volume to segment, or an input argument that yields none.

    Attributes:
        path: The file (or the argument as given when ``error`` is set).
        error: Why this input cannot be processed before even reading it.
    """

    path: Path
    error: str | None = None
    matched_nothing: bool = False


#: ATLAS v2.0 masks: ``..._label-L_desc-T1lesion_mask.nii.gz`` (any label/desc entities).
_V2_MASK = re.compile(r"_label-[A-Za-z0-9]+(_[A-Za-z]+-[A-Za-z0-9]+)*_mask\.nii(\.gz)?$")


def label_file_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is a lesion mask of a known layout rather than a scan, or ``None``.

    ATLAS R1.1 ``*LesionSmooth*``, ATLAS v2.0 ``*_label-L…_mask.nii.gz`` and
    files under a ``labelsTr/`` folder (nnU-Net style pairs).
    """
    p = Path(path)
    if "LesionSmooth" in p.name:
        return "an ATLAS R1.1 lesion mask (LesionSmooth)"
    if _V2_MASK.search(p.name):
        return "an ATLAS v2.0 lesion mask (label-..._mask)"
    if "labelsTr" in p.parent.parts:
        return "a label file (under labelsTr/)"
    return None


def output_stem(path: str | os.PathLike[str]) -> str:
    """File name without ``.nii`` / ``.nii.gz`` / ``.zip`` (``sub-1_T1w.nii.gz`` -> ``sub-1_T1w``).
    """
    name = Path(path).name
    if name.lower().endswith(".zip"):  # a zipped DICOM series
        return name[:-4]
    suffix = nifti_suffix(name)
    return name[: -len(suffix)] if suffix else name


class Reader(Protocol):
    """Says what an input is and reads it (the NIfTI reader; later a DICOM series reader).

    A reader must be picklable (worker processes read with it).
    """

    #: What a folder is searched for, for messages (``".nii or .nii.gz files"``).
    kinds: str

    def is_case(self, path: Path) -> bool:
        """Whether an existing ``path`` is itself one input (a file; a DICOM series folder)."""

    def cases_in(self, folder: Path, recursive: bool) -> list[Path]:
        """The inputs in ``folder`` (and below it with ``recursive``), sorted."""

    def read(self, path: Path) -> NiftiVolume:
        """The volume of one input.

        Raises:
            DunetError: ``"<path>: <reason>"`` for an input that cannot be read.
        """

    def left_out(self, paths: Sequence[Path]) -> list[tuple[Path, str]]:
        """What the inputs ``paths`` hold that no input reads, each with why (``skipped``).

        E.g. a localiser beside the 3D series of a DICOM folder. Nothing for a
        file that is one input, nor for what :meth:`read` fails with a message.
        """


class NiftiReader:
    """The default :class:`Reader`: every ``.nii`` / ``.nii.gz`` file is one case."""

    kinds = ".nii or .nii.gz files"

    def is_case(self, path: Path) -> bool:
        """A file (named explicitly, any name) is one input; a folder is not."""
        return not path.is_dir()

    def cases_in(self, folder: Path, recursive: bool) -> list[Path]:
        """NIfTI files directly in ``folder`` (or anywhere below it), sorted."""
        listing = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in listing if p.is_file() and nifti_suffix(p))

    def read(self, path: Path) -> NiftiVolume:
        """:func:`~dunet_deploy.data.nifti.load_nifti`."""
        return load_nifti(path)

    def left_out(self, paths: Sequence[Path]) -> list[tuple[Path, str]]:
        """Nothing: a NIfTI file is read whole."""
        return []


NIFTI_READER = NiftiReader()


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


#: Names this package gives its outputs (``<stem>_mask.nii.gz``, ``<stem>_prob.nii``, ...).
_OUTPUT_NAME = re.compile(r"_(mask|prob)\.nii(\.gz)?$")


def output_file_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is an output of this package (a mask or probability map), or ``None``.

    Recognised by the marker in its header description (``dunet-deploy mask``,
    written in every mask and probability map, whatever the file is named) or
    by its name (``*_mask.nii.gz``, ``*_prob.nii.gz``, also ``.nii``).
    """
    kind = output_kind(path)
    if kind is not None:
        return f"a {'mask' if kind == 'mask' else 'probability map'} written by dunet-deploy " \
               f"(header description 'dunet-deploy {kind}')"
    match = _OUTPUT_NAME.search(Path(path).name)
    if match is not None:
        return f"named like an output of dunet-infer (*{match.group(0)})"
    return None


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class _Search:
    """What a folder or pattern found, less what is not a scan (each noted in ``skipped``).

    Left out: files under the output folder when it lies inside the searched
    one (a run never reads what it, or an earlier run into the same folder,
    wrote); hidden files and folders (``.x.nii.gz``, ``._x.nii.gz``, our
    temporary files); lesion masks of the known layouts
    (:func:`label_file_reason`); this package's outputs (:func:`output_file_reason`).
    """

    def __init__(self, out_dir: Path | None, skipped: list[tuple[Path, str]] | None) -> None:
        self.out_given = out_dir
        self.out = None if out_dir is None else out_dir.resolve()
        self.skipped = skipped
        self._noted_out = False
        self._noted: set[Path] = set()

    def _skip(self, path: Path, reason: str) -> None:
        if self.skipped is not None:
            self.skipped.append((path, reason))

    def left_out(self, items: Sequence[InputItem], reader: Reader) -> None:
        """Note what the inputs ``items`` hold that none reads (:meth:`Reader.left_out`), once."""
        if self.skipped is None:
            return
        for path, reason in reader.left_out([i.path for i in items if i.error is None]):
            if path not in self._noted:
                self._noted.add(path)
                self._skip(path, reason)

    def scans(self, found: Iterable[Path], root: Path) -> list[Path]:
        """``found`` (under ``root``, the folder searched) without what is not a scan."""
        root_abs = root.resolve()
        out = self.out
        # out == root: the folder asked for is searched; its outputs are known by name/header.
        if out is not None and (out == root_abs or not _within(out, root_abs)):
            out = None
        scans = []
        for p in found:
            abs_p = root_abs / p.relative_to(root) if _within(p, root) else p.resolve()
            if out is not None and _within(abs_p, out):
                if not self._noted_out:
                    self._noted_out = True
                    self._skip(Path(self.out_given or out),
                               "the output folder of this run (not searched)")
                continue
            rel = abs_p.relative_to(root_abs) if _within(abs_p, root_abs) else Path(p.name)
            if any(part.startswith(".") for part in rel.parts):
                reason: str | None = "a hidden file (its name or a folder's starts with '.')"
            else:
                reason = label_file_reason(p) or output_file_reason(p)
            if reason is None:
                scans.append(p)
            else:
                self._skip(p, reason)
        return scans


def _glob_root(text: str) -> Path:
    """The folder a pattern searches: its leading parts without ``*``, ``?`` or ``[``."""
    parts: list[str] = []
    for part in Path(text).parts:
        if _has_magic(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _expand_one(text: str, recursive: bool, search: _Search, reader: Reader) -> list[InputItem]:
    path = Path(text)
    if path.is_dir() and not reader.is_case(path):
        found = search.scans(reader.cases_in(path, recursive), path)
        where = "directory or its sub-folders" if recursive else "directory"
        if not found:
            hint = "" if recursive else " (--recursive looks in sub-folders)"
            return [InputItem(path, f"{path}: no scans ({reader.kinds}) in {where}{hint}",
                              matched_nothing=True)]
        return [InputItem(p) for p in found]
    if _has_magic(text) and not path.exists():
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        found = search.scans([p for p in matches if reader.is_case(p)], _glob_root(text))
        if not found:
            return [InputItem(path, f"{text}: no file matches", matched_nothing=True)]
        return [InputItem(p) for p in found]
    # A file named explicitly is taken whatever its name, unless its header says we wrote it.
    kind = output_kind(path)
    if kind is not None:
        return [InputItem(path, f"{path}: a {kind} written by dunet-deploy (header description "
                                f"'dunet-deploy {kind}'), not a scan")]
    return [InputItem(path)]


def expand_inputs(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    skipped: list[tuple[Path, str]] | None = None,
    reader: Reader = NIFTI_READER,
    out_dir: str | os.PathLike[str] | None = None,
) -> list[InputItem]:
    """Turn command-line inputs into the list of volumes to process, in order.

    * a directory that the ``reader`` does not take as one input gives the
      inputs it finds there (NIfTI: every ``*.nii`` / ``*.nii.gz`` file directly
      inside it, sorted, or anywhere below it with ``recursive``);
    * a pattern with ``*``, ``?`` or ``[`` that is not an existing file is a
      glob (``**`` recurses), sorted;
    * anything else is taken as a file (a missing one fails when it is read).

    What a directory or a pattern finds is not all scans: the run's output
    folder ``out_dir`` when it lies inside the folder searched, hidden files,
    lesion masks of the known layouts (:func:`label_file_reason`) and this
    package's own outputs (:func:`output_file_reason`: by header marker or by
    name) are left out and listed in ``skipped``, and so is what an input
    holds that the reader does not read (:meth:`Reader.left_out`: a localiser
    beside a DICOM folder's 3D series), so running again into the
    same folder segments the same scans. A file named explicitly is taken
    whatever its name, but one whose header says this package wrote it fails
    (``error``). The same file reached twice is processed once; two different
    files with the same output name fail the second one instead of overwriting.

    Args:
        inputs: Files, directories and patterns, as given; a single ``str`` or
            path-like is one input (not a sequence of characters).
        recursive: Directories are searched in their sub-folders too.
        skipped: Receives ``(path, why)`` for each file (or the output
            folder, or a series of a DICOM input) left out.
        reader: Says what an input is (:data:`NIFTI_READER`).
        out_dir: The run's output folder (need not exist yet).

    Returns:
        One :class:`InputItem` per volume or per input that matched nothing
        (``matched_nothing``).

    Raises:
        DunetError: for an input that is not a ``str`` or path-like (bytes included).
    """
    if isinstance(inputs, (bytes, bytearray)):
        raise DunetError(f"inputs {bytes(inputs)!r}: a bytes path; give a str or pathlib.Path",
                         option="inputs")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    search = _Search(None if out_dir is None else Path(out_dir), skipped)
    items: list[InputItem] = []
    for raw in inputs:
        if not isinstance(raw, (str, os.PathLike)) or isinstance(os.fspath(raw), bytes):
            raise DunetError(f"inputs: {raw!r} is not a path (give str or pathlib.Path)",
                             option="inputs")
        found = _expand_one(os.fspath(raw), recursive, search, reader)
        search.left_out(found, reader)
        items.extend(found)

    seen: set[Path] = set()
    stems: dict[str, Path] = {}
    out: list[InputItem] = []
    for item in items:
        if item.error is not None:
            out.append(item)
            continue
        key = item.path.resolve()
        if key in seen:
            continue
        seen.add(key)
        stem = output_stem(item.path)
        if stem in stems:
            out.append(InputItem(item.path, f"{item.path}: output name {stem!r} is already used "
                                            f"by {stems[stem]}; rename one of them"))
            continue
        stems[stem] = item.path
        out.append(item)
    return out


# ------------------------------------------------------------------- results
@dataclass
class CaseResult:
    """What happened to one input (one entry of ``summary.json``).

    Attributes:
        input: The input path.
        status: ``"ok"`` or ``"error"``.
        message: The one-line reason when ``status == "error"``.
        mask: Written mask file.
        prob: Written probability file (``--save-prob``).
        shape: Volume shape.
        zooms: Voxel sizes in mm.
        lesion_voxels: Voxels in the mask.
        lesion_volume_mm3: ``lesion_voxels`` × product of ``zooms``.
        slabs_run: Slabs sent to the model.
        slabs_skipped: All-background slabs not sent (probability 0).
        times: Seconds spent per stage: read, preprocess, infer, postprocess, write.
        geometry: How the scan was brought onto the model's grid (reoriented,
            resampled, obliquity; see ``ModelSpace.describe``).
        lesions_removed: Lesions removed for being under ``min_lesion_mm3``.
        warnings: One-line warnings about the input (e.g. oblique).
        bytes_sent: Bytes put on the wire to a Triton server (``None``: local model).
        bytes_received: Tensor bytes received from it.
        server: The server's summary (``--server-side``).
        source: A DICOM input's series (``data.dicom.source_record``: UID, slices, ...).
        dicom_seg: Written DICOM SEG file (``dicom_seg``).
        registration: What the registration stage did (``--register``; see
            :func:`~dunet_deploy.runtime.register_stage.register_to_network`),
            also when it failed (``done: False`` with the similarities and floor).
    """

    input: str
    status: str = "ok"
    message: str | None = None
    mask: str | None = None
    prob: str | None = None
    shape: list[int] | None = None
    zooms: list[float] | None = None
    lesion_voxels: int | None = None
    lesion_volume_mm3: float | None = None
    slabs_run: int = 0
    slabs_skipped: int = 0
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIME_KEYS, 0.0))
    geometry: dict[str, Any] | None = None
    lesions_removed: int = 0
    warnings: list[str] = field(default_factory=list)
    bytes_sent: int | None = None
    bytes_received: int | None = None
    server: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    dicom_seg: str | None = None
    registration: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        """Whether the case succeeded."""
        return self.status == "ok"

    def fail(self, path: str | os.PathLike[str], exc: BaseException | str) -> CaseResult:
        """Mark as failed with a one-line message that starts with ``path``."""
        text = one_line(exc)
        if isinstance(exc, OSError) and not isinstance(exc, DunetError) and exc.strerror:
            text = f"{exc.filename or path}: {exc.strerror}"
        elif isinstance(exc, MemoryError):
            text = "out of memory"
        prefix = f"{os.fspath(path)}:"
        self.status = "error"
        self.message = text if text.startswith(prefix) else f"{prefix} {text}"
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (times rounded to microseconds)."""
        doc = asdict(self)
        doc["times"] = {k: round(v, 6) for k, v in self.times.items()}
        return doc


# ---------------------------------------------------------------- preparing
@dataclass
class PreparedVolume:
    """A volume read and preprocessed, ready for the model.

    Attributes:
        item: The input.
        result: Its result so far (``read`` and ``preprocess`` times; an
            error when preparing failed).
        ref: Geometry of the input (header, affine; ``data`` is a zero-cost
            broadcast of the right shape, the voxels are not kept).
        net: The volume in the network's space (slices and slab positions).
    """

    item: InputItem
    result: CaseResult
    ref: NiftiVolume | None = None
    net: NetworkInput | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The geometry's data is a zero-cost broadcast: ship its shape, not its voxels.
        state = dict(self.__dict__)
        if self.ref is not None:
            state["ref"] = (self.ref.shape, self.ref.affine, self.ref.header, self.ref.path)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        ref = state.get("ref")
        if isinstance(ref, tuple):
            shape, affine, header, path = ref
            data = np.broadcast_to(np.zeros((), np.float32), shape)
            state["ref"] = NiftiVolume(data=data, affine=affine, header=header, path=path)
        self.__dict__.update(state)

    @property
    def slices(self) -> np.ndarray | None:
        """float32 ``[Z, S, S]`` network-space slices (``None`` when nothing runs)."""
        return None if self.net is None else self.net.slices

    @property
    def indices(self) -> np.ndarray | None:
        """int64 ``[K]`` slabs to run (ascending)."""
        return None if self.net is None else self.net.indices


def prepare_source(
    item: InputItem, source: NiftiVolume, spec: PreprocessSpec, *, resample: str = "auto",
    as_is: bool = False, result: CaseResult | None = None, register: RegisterStage | None = None,
) -> PreparedVolume:
    """Stage 1 on a volume already read: bring it onto the model's grid; errors go into the result.

    Args:
        item: The input the volume came from (names it in messages and outputs).
        source: The volume (voxels, affine, header).
        spec: The model's preprocessing spec.
        resample: ``"auto"`` or ``"never"`` (see :func:`~dunet_deploy.runtime.core.to_network`).
        as_is: Take the voxels as already on the model's grid (an array given
            without an affine): no reorientation, no resampling.
        result: The case's result so far (e.g. with its ``read`` time).
        register: The registration stage (``None``: none; not with ``as_is``).

    Returns:
        A :class:`PreparedVolume` (``result.status == "error"`` on failure).
    """
    result = CaseResult(input=str(item.path)) if result is None else result
    prep = PreparedVolume(item, result)
    result.source = source_record(source)
    extra: tuple[str, ...] = ()
    try:
        if register is not None and register.active and not as_is:
            net, result.registration, extra = register_to_network(
                source.data, source.affine, spec, register, resample=resample,
                times=result.times)
        else:
            net = to_network(source.data, spec, affine=None if as_is else source.affine,
                             resample=resample, times=result.times)
    except CASE_ERRORS as exc:
        from dunet_deploy.data.registration import RegistrationError

        if isinstance(exc, RegistrationError):  # its numbers: similarities, floor, seconds
            result.registration = exc.record
        result.fail(item.path, exc)
        return prep
    result.shape = [int(n) for n in source.shape]
    result.zooms = [float(z) for z in source.zooms]
    z = net.shape[spec.axial_axis]
    result.slabs_run, result.slabs_skipped = int(net.indices.size), int(z - net.indices.size)
    if net.space is not None:
        result.geometry = net.space.describe()
        result.warnings = list(net.space.warnings)
    result.warnings += [w for w in extra if w not in result.warnings]
    prep.ref, prep.net = geometry_of(source), net
    return prep


def prepare_volume(
    item: InputItem, spec: PreprocessSpec, resample: str = "auto",
    reader: Reader = NIFTI_READER, register: RegisterStage | None = None,
) -> PreparedVolume:
    """Stage 1: read one input and bring it onto the model's grid; errors go into the result.

    Args:
        item: The input.
        spec: The model's preprocessing spec.
        resample: ``"auto"`` or ``"never"`` (see :func:`~dunet_deploy.runtime.core.to_network`).
        reader: Reads the input (:data:`NIFTI_READER`).
        register: The registration stage (``None``: none).

    Returns:
        A :class:`PreparedVolume` (``result.status == "error"`` on failure).
    """
    result = CaseResult(input=str(item.path))
    if item.error is not None:
        result.fail(item.path, item.error)
        return PreparedVolume(item, result)
    try:
        t0 = time.perf_counter()
        source = reader.read(item.path)
        result.times["read"] = time.perf_counter() - t0
    except CASE_ERRORS as exc:
        result.fail(item.path, exc)
        return PreparedVolume(item, result)
    return prepare_source(item, source, spec, resample=resample, result=result,
                          register=register)


# ----------------------------------------------------------------- writing
class Writer(Protocol):
    """Writes one case's outputs (the NIfTI writer; later a DICOM SEG writer).

    A writer must be picklable (worker processes write with it).
    """

    def targets(self, item: InputItem, out: OutputOptions) -> dict[str, Path]:
        """The files :meth:`write` would write, by ``CaseResult`` field (``mask``, ``prob``)."""

    def write(self, pred: Prediction, prep: PreparedVolume, out: OutputOptions) -> dict[str, Path]:
        """Write the case atomically (all of its files or none); returns :meth:`targets`.

        Raises:
            DunetError: naming the file that could not be written.
        """

    def discard_partial(self, item: InputItem, out: OutputOptions) -> None:
        """Remove what a writer killed mid-write left behind (temporary files)."""


class NiftiWriter:
    """The default :class:`Writer`: ``<stem>_mask.nii.gz`` (and ``<stem>_prob.nii.gz``)."""

    def targets(self, item: InputItem, out: OutputOptions) -> dict[str, Path]:
        """``{"mask": ..., "prob": ...}`` (``prob`` only with ``save_prob``)."""
        stem = output_stem(item.path)
        files = {"mask": out.out_dir / f"{stem}{MASK_SUFFIX}"}
        if out.options.save_prob:
            files["prob"] = out.out_dir / f"{stem}{PROB_SUFFIX}"
        return files

    def write(self, pred: Prediction, prep: PreparedVolume, out: OutputOptions) -> dict[str, Path]:
        """:meth:`Prediction.save` (mask and probabilities together or neither)."""
        files = self.targets(prep.item, out)
        pred.save(files["mask"], files.get("prob"), prob_dtype=out.options.prob_dtype)
        return files

    def discard_partial(self, item: InputItem, out: OutputOptions) -> None:
        """Remove ``.<name>.<random>.tmp.nii.gz`` files of this case's outputs."""
        for target in self.targets(item, out).values():
            for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp*"):
                tmp.unlink(missing_ok=True)


NIFTI_WRITER = NiftiWriter()


@dataclass(frozen=True)
class OutputOptions:
    """Where a run over files writes, what, and with which writer.

    Attributes:
        out_dir: Existing output folder.
        options: The run's options, with the model's defaults applied
            (:meth:`InferenceOptions.with_model_defaults`): ``min_lesion_mm3``,
            ``save_prob`` and ``prob_dtype`` are used here.
        writer: Writes each case (:data:`NIFTI_WRITER`).
    """

    out_dir: Path
    options: InferenceOptions
    writer: Writer = NIFTI_WRITER


def finish_case(
    grid: np.ndarray, prep: PreparedVolume, spec: PreprocessSpec, *,
    min_lesion_mm3: float, keep_prob: bool = True,
) -> Prediction | None:
    """Stage 3: the network's grid to a thresholded :class:`Prediction`; ``None`` on an error.

    :func:`~dunet_deploy.runtime.core.finish_prediction` (whose arguments these
    are) with its errors recorded in ``prep.result``. Needs no model.
    """
    assert prep.ref is not None and prep.net is not None
    try:
        pred = finish_prediction(grid, prep.net, prep.ref, spec, min_lesion_mm3=min_lesion_mm3,
                                 times=prep.result.times, keep_prob=keep_prob)
    except CASE_ERRORS as exc:
        prep.result.fail(prep.item.path, exc)
        return None
    result = prep.result
    result.lesion_voxels = pred.lesion_voxels
    result.lesion_volume_mm3 = pred.lesion_volume_mm3
    result.lesions_removed = pred.lesions_removed
    return pred


def write_case(
    grid: np.ndarray, prep: PreparedVolume, spec: PreprocessSpec, out: OutputOptions
) -> CaseResult:
    """Stage 3 and the writer: post-process one grid and write its files; errors go into the result.

    Needs no model: ``dunet-infer --workers`` runs it in worker processes.
    """
    options = out.options
    assert options.min_lesion_mm3 is not None, "resolve the model's defaults first"
    pred = finish_case(grid, prep, spec, min_lesion_mm3=options.min_lesion_mm3,
                       keep_prob=options.save_prob)
    if pred is None:
        return prep.result
    try:
        files = out.writer.write(pred, prep, out)
    except CASE_ERRORS as exc:
        return prep.result.fail(prep.item.path, exc)
    for key, path in files.items():
        setattr(prep.result, key, str(path))
    return prep.result


#: ``() -> (bytes sent, bytes received)`` so far by a model behind a network (a Triton
#: client), or ``None`` for a local model.
Meter = Callable[[], "tuple[int, int] | None"]


def infer_case(
    predict: Predictor, spec: PreprocessSpec, prep: PreparedVolume, batch_size: int,
    meter: Meter | None = None,
) -> np.ndarray | None:
    """Stage 2: run the network on one prepared volume; ``None`` (and a failed result) on an error.

    With a ``meter``, the bytes this case sent and received are recorded in its result.
    """
    if not prep.result.ok:
        return None
    assert prep.net is not None
    before = meter() if meter is not None else None
    try:
        grid = predict_grid(prep.net, spec, predict, batch_size=batch_size,
                            times=prep.result.times)
    except CASE_ERRORS as exc:
        prep.result.fail(prep.item.path, exc)
        return None
    after = meter() if meter is not None else None
    if before is not None and after is not None:
        prep.result.bytes_sent = after[0] - before[0]
        prep.result.bytes_received = after[1] - before[1]
    prep.net.release()  # free the slices before the output volume is allocated
    return grid


def prepare_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Create the output folder (and parents) when missing.

    Raises:
        DunetError: when it exists as a file or cannot be created.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DunetError(f"{out}: output path exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DunetError(f"{out}: cannot create output directory ({exc.strerror})") from None
    return out


def missing_folders(out_dir: str | os.PathLike[str]) -> list[Path]:
    """The folders :func:`prepare_output_dir` would create for ``out_dir``, deepest first."""
    missing: list[Path] = []
    probe = Path(out_dir).absolute()
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    return missing


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Remove ``folders`` (deepest first, :func:`missing_folders`) while they are empty.

    What a failed run calls so that it leaves no empty output folder it
    created; a folder that holds anything is kept, and so are its parents.
    """
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def earlier_cases(out_dir: str | os.PathLike[str],
                  results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """The cases of earlier runs into ``out_dir`` whose outputs are still there.

    Read from the ``summary.json`` already in ``out_dir`` (its ``cases`` and
    its own ``earlier_cases``): each successful row whose mask file is still in
    the folder and whose output name this run did not write again (an ``ok``
    result in ``results``). A row from a run that is not already tagged gets
    ``"run"``: that run's ``options_fingerprint`` and model path. As nnU-Net
    does, a run overwrites only the cases it segments; this keeps the folder's
    ``summary.json`` a record of every mask in it.

    Args:
        out_dir: The output folder (before this run's summary replaces the old one).
        results: This run's results.

    Returns:
        The rows, in the order the old summary listed them (none when there
        is no readable old summary).
    """
    out = Path(out_dir)
    try:
        doc = json.loads((out / SUMMARY_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(doc, dict):
        return []
    redone = {output_stem(r.input) for r in results if r.ok}
    model = doc.get("model")
    run = {"options_fingerprint": doc.get("options_fingerprint"),
           "model": model.get("path") if isinstance(model, dict) else None}
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    for row in [*(doc.get("cases") or []), *(doc.get("earlier_cases") or [])]:
        if not isinstance(row, dict) or row.get("status") != "ok" or not row.get("mask") \
                or not isinstance(row.get("input"), str):
            continue
        stem = output_stem(row["input"])
        if stem in redone or stem in seen or not (out / Path(str(row["mask"])).name).is_file():
            continue
        seen.add(stem)
        kept.append({**row, "run": row.get("run", run)})
    return kept


def summary_document(
    runner: Runner | None,
    results: Sequence[CaseResult],
    *,
    options: InferenceOptions,
    load_s: float,
    wall_s: float,
    inference: dict[str, Any] | None = None,
    interrupted: str | None = None,
    total: int | None = None,
    skipped: Sequence[tuple[Path, str]] = (),
    earlier: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The ``summary.json`` document of a run over files.

    Args:
        runner: The runner that was used (still describable after close);
            ``None`` when the run was interrupted before the model loaded.
        results: One result per finished input, in order.
        options: The run's options (recorded whole, with their fingerprint).
        load_s: Seconds to load the model.
        wall_s: Seconds for the whole run.
        inference: The inference settings that were applied (TTA,
            post-processing, resampling, and where each came from).
        interrupted: The signal that stopped the run early, if one did.
        total: Inputs asked for (default: ``len(results)``).
        skipped: ``(path, why)`` of what the input search left out
            (:func:`expand_inputs`), listed as ``skipped``.
        earlier: Rows of earlier runs whose outputs are still in the output
            folder (:func:`earlier_cases`), listed as ``earlier_cases``.
    """
    model_keys = ("path", "model_name", "model_precision", "spec_digest")
    top_keys = ("backend", "device", "precision")
    described = runner.describe() if runner is not None else {}
    cap = described.get("max_batch")
    return {
        "dunet_deploy": __version__,
        "model": {k: described.get(k) for k in model_keys},
        **{k: described.get(k) for k in top_keys},
        "batch_size": options.batch_size if cap is None else min(options.batch_size, cap),
        "threads": options.threads,
        "workers": options.workers,
        "inference": dict(inference or {}),
        "options": options.to_dict(),
        "options_fingerprint": options.fingerprint(),
        "backend_details": {k: v for k, v in described.items()
                            if k not in model_keys and k not in top_keys},
        "machine": machine_info(),
        "model_load_s": round(load_s, 6),
        "wall_s": round(wall_s, 6),
        "interrupted": interrupted,
        "total": len(results) if total is None else total,
        "done": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "cases": [r.to_dict() for r in results],
        "skipped": [{"path": str(p), "reason": why} for p, why in skipped],
        "earlier_cases": list(earlier),
    }
