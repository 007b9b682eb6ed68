"""DICOM series as run inputs and DICOM SEG as run outputs (the pipeline's reader and writer).

:class:`ScanReader` is the :class:`~dunet_deploy.runtime.pipeline.Reader` every
run over files uses: a NIfTI file, a folder holding a DICOM series, or a
``.zip`` of one are each one input. A folder holding several 3D series gives
one input per series, named ``<folder>_s<Series Number>_<description>``
(:func:`series_names`; deterministic), unless ``series_uid`` picks one.
Those inputs are *virtual paths* ``<folder>/<name>``: nothing exists there,
:meth:`ScanReader.read` looks the name up among the folder's series.

:class:`DicomSegWriter` wraps another writer (the NIfTI one) and also writes
``<name>_seg.dcm``: the mask as a DICOM Segmentation of its source series
(:func:`~dunet_deploy.runtime.dicom_seg.write_dicom_seg`), with the model's
name, version and digest. The source headers are read again when writing,
so a worker process ships no datasets with the volume.

pydicom / highdicom are imported only when a DICOM input is read or a SEG
written (the ``dicom`` extra).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dunet_deploy.data.dicom import (
    DicomSeries,
    list_series,
    load_dicom,
    load_series,
    series_headers,
)
from dunet_deploy.data.nifti import NiftiVolume, load_nifti, nifti_suffix
from dunet_deploy.errors import DunetError

if TYPE_CHECKING:
    from dunet_deploy.artifacts import ArtifactInfo
    from dunet_deploy.runtime.core import Prediction
    from dunet_deploy.runtime.pipeline import InputItem, OutputOptions, PreparedVolume, Writer

__all__ = [
    "SEG_SUFFIX",
    "DicomSegWriter",
    "ScanReader",
    "is_series_input",
    "refuse_non_dicom",
    "seg_writer",
    "series_names",
]

#: The DICOM SEG written beside ``<name>_mask.nii.gz``.
SEG_SUFFIX = "_seg.dcm"
_PREAMBLE = 128
_SLUG = re.compile(r"[^A-Za-z0-9]+")


def _is_own_output(name: str) -> bool:
    """A SEG this package wrote (or its temporary file): never an input."""
    return name.endswith(SEG_SUFFIX) or (name.startswith(".") and ".tmp" in name)


def is_series_input(path: Path) -> bool:
    """Whether ``path`` is a ``.zip`` or a folder with a DICOM file directly inside.

    Like :func:`~dunet_deploy.data.dicom.is_dicom_input`, but a folder whose
    only DICOM files are our own ``*_seg.dcm`` outputs is not an input.
    """
    if path.is_file():
        return path.name.lower().endswith(".zip")
    if not path.is_dir():
        return False
    for child in sorted(path.iterdir()):
        if not child.is_file() or nifti_suffix(child) or _is_own_output(child.name):
            continue
        try:
            with open(child, "rb") as f:
                head = f.read(_PREAMBLE + 4)
        except OSError:
            continue
        if head[_PREAMBLE:_PREAMBLE + 4] == b"DICM":
            return True
    return False


def _series_name(series: DicomSeries) -> str:
    slug = _SLUG.sub("_", series.description).strip("_")
    return f"{series.stem}_{slug}" if slug else series.stem


def series_names(found: Sequence[DicomSeries]) -> dict[str, DicomSeries]:
    """A distinct input name per 3D series: ``<folder>_s<number>[_<description>]``.

    The description is reduced to letters, digits and ``_``; two series that
    still share a name get their UID's last 8 digits appended. Depends only on
    the headers, so every listing of a folder names its series the same way.
    """
    volumes = [s for s in found if s.volume]
    names: dict[str, list[DicomSeries]] = {}
    for series in volumes:
        names.setdefault(_series_name(series), []).append(series)
    out: dict[str, DicomSeries] = {}
    for name, group in names.items():
        for series in group:
            tag = series.uid.replace(".", "")[-8:]
            out[name if len(group) == 1 else f"{name}_{tag}"] = series
    return out


@dataclass
class ScanReader:
    """Reads NIfTI files and DICOM series (folders, zips); picklable for worker processes.

    Attributes:
        series_uid: Read only this Series Instance UID from each DICOM input
            (``None``: every 3D series, each its own input).
    """

    series_uid: str | None = None
    #: What a folder is searched for, for messages.
    kinds = ".nii or .nii.gz files, DICOM series folders or .zip files"

    def is_case(self, path: Path) -> bool:
        """A file, or a DICOM folder of one 3D series (or any with ``series_uid``)."""
        if not path.is_dir():
            return True
        if not is_series_input(path):
            return False
        if self.series_uid is not None:
            return True
        try:
            return len(series_names(list_series(path))) <= 1
        except DunetError:
            return True  # read() reports why it cannot be read

    def cases_in(self, folder: Path, recursive: bool) -> list[Path]:
        """NIfTI files, zips and DICOM series in ``folder`` (below it with ``recursive``).

        A DICOM folder directly inside ``folder`` counts without ``recursive``
        (it is one entry of ``folder``, as a file is).
        """
        if is_series_input(folder):
            return self._series_of(folder)
        entries = folder.rglob("*") if recursive else folder.iterdir()
        found: list[Path] = []
        taken: list[Path] = []  # DICOM folders: what lies below them is theirs (list_series)
        for p in sorted(entries):
            if any(p.is_relative_to(t) for t in taken):
                continue
            if p.is_file():
                if nifti_suffix(p) or p.name.lower().endswith(".zip"):
                    found.append(p)
            elif p.is_dir() and is_series_input(p):
                taken.append(p)
                found.extend(self._series_of(p))
        return sorted(found)

    def _series_of(self, folder: Path) -> list[Path]:
        if self.is_case(folder):
            return [folder]
        return sorted(folder / name for name in series_names(list_series(folder)))

    def read(self, path: Path) -> NiftiVolume:
        """The volume of a NIfTI file, a DICOM input or one series of a DICOM folder.

        Raises:
            DunetError: ``"<path>: <reason>"`` for an input that cannot be read.
        """
        if path.exists():
            if is_series_input(path):
                return load_dicom(path, self.series_uid)
            return load_nifti(path)
        folder = path.parent
        if folder.is_dir() and is_series_input(folder):
            named = series_names(list_series(folder))
            if path.name in named:
                return load_series(named[path.name])
            have = ", ".join(sorted(named)) or "none"
            raise DunetError(f"{path}: no such file, nor a series of {folder} (its 3D series "
                             f"are named {have})")
        return load_nifti(path)

    def left_out(self, paths: Sequence[Path]) -> list[tuple[Path, str]]:
        """The series of these DICOM inputs that are not 3D volumes, beside ones that are.

        A localiser, a 2D image or a multi-frame object in a folder (or zip)
        whose 3D series are segmented is not read: each is listed as
        ``(<folder>/<folder>_s<number>_<description>, why)``. Nothing with
        ``series_uid`` (the one series asked for is read), nor for an input
        with no 3D series at all (:meth:`read` fails it, saying why).
        """
        if self.series_uid is not None:
            return []
        sources: list[Path] = []
        for path in paths:
            source = path if path.exists() else path.parent  # a series' virtual path
            if source not in sources and is_series_input(source):
                sources.append(source)
        out: list[tuple[Path, str]] = []
        for source in sources:
            try:
                found = list_series(source)
            except DunetError:
                continue  # read() reports it
            if not any(s.volume for s in found):
                continue
            for series in found:
                if series.volume:
                    continue
                why = str(series.problem or f"{series.label}: not a 3D volume")
                why = why.removeprefix(f"{source}: ")
                out.append((source / _series_name(series),
                            f"{why} (Series Instance UID {series.uid}); its 3D series are read"))
        return out


def refuse_non_dicom(items: Iterable[InputItem]) -> None:
    """Before any work: every input must be a DICOM series when a DICOM SEG is asked for.

    Raises:
        DunetError: ``dicom_seg: <path> is not a DICOM series ...`` (``option="dicom_seg"``).
    """
    for item in items:
        if item.error is not None:
            continue
        path = item.path
        dicom = is_series_input(path) or (not path.exists() and is_series_input(path.parent))
        if not dicom:
            raise DunetError(f"dicom_seg: {path} is not a DICOM series (a DICOM SEG needs a "
                             "source series to reference); give DICOM series only",
                             option="dicom_seg")


@dataclass(frozen=True)
class DicomSegWriter:
    """Writes another writer's files and ``<name>_seg.dcm``; picklable for worker processes.

    Attributes:
        base: The writer of the NIfTI mask (and probabilities).
        model_name: Algorithm Name of the SEG.
        model_version: Algorithm Version.
        model_digest: The model file's digest (which weights made the mask).
    """

    base: Writer
    model_name: str
    model_version: str
    model_digest: str

    def targets(self, item: InputItem, out: OutputOptions) -> dict[str, Path]:
        """The base writer's files and ``{"dicom_seg": OUT/<name>_seg.dcm}``."""
        from dunet_deploy.runtime.pipeline import output_stem

        files = dict(self.base.targets(item, out))
        files["dicom_seg"] = out.out_dir / f"{output_stem(item.path)}{SEG_SUFFIX}"
        return files

    def write(self, pred: Prediction, prep: PreparedVolume, out: OutputOptions
              ) -> dict[str, Path]:
        """The SEG first, then the base writer's files; on any failure none of them remain.

        Raises:
            DunetError: a case that is not a DICOM series, headers that changed
                since they were read, a file that cannot be written.
        """
        from dunet_deploy.runtime.dicom_seg import write_dicom_seg

        files = self.targets(prep.item, out)
        datasets = _source_datasets(prep)
        seg = write_dicom_seg(pred.mask, datasets, files["dicom_seg"],
                              model_name=self.model_name, model_version=self.model_version,
                              model_digest=self.model_digest)
        try:
            self.base.write(pred, prep, out)
        except BaseException:
            seg.unlink(missing_ok=True)
            raise
        return files

    def discard_partial(self, item: InputItem, out: OutputOptions) -> None:
        """The base writer's temporary files and the SEG's ``.<name>_seg.dcm.*.tmp``."""
        self.base.discard_partial(item, out)
        target = self.targets(item, out)["dicom_seg"]
        for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def seg_writer(base: Writer, info: ArtifactInfo, model_path: Path) -> DicomSegWriter:
    """A :class:`DicomSegWriter` naming the model of ``model_path``.

    Algorithm Name: the registry name; Version: the package version that
    exported it and the precision (``0.3.0 fp32``); digest: the SHA-256 of
    the model file's bytes (64 hex digits, what a DICOM LO holds).
    """
    from dunet_deploy.runtime.resume import model_digest

    exported = str(info.versions.get("dunet_deploy") or "unknown")
    return DicomSegWriter(base=base, model_name=info.model_name,
                          model_version=f"{exported} {info.precision}"[:64],
                          model_digest=model_digest(model_path).removeprefix("sha256:"))


def _source_datasets(prep: PreparedVolume) -> tuple[Any, ...]:
    """The headers of the series ``prep`` was read from, checked against its grid."""
    import numpy as np

    source = prep.result.source
    if source is None or source.get("kind") != "dicom":
        raise DunetError(f"{prep.item.path}: not a DICOM series: a DICOM SEG needs one")
    found = [s for s in list_series(Path(source["path"])) if s.uid == source["series_uid"]]
    if not found:
        raise DunetError(f"{prep.item.path}: series {source['series_uid']} is gone from "
                         f"{source['path']}")
    datasets, affine = series_headers(found[0])
    ref = prep.ref
    assert ref is not None
    if found[0].shape != tuple(ref.shape) or not np.allclose(affine, ref.affine, atol=1e-4):
        raise DunetError(f"{prep.item.path}: the series changed since it was read")
    return datasets
