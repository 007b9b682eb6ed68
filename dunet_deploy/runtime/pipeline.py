"""Files in, masks out: the machinery behind ``dunet-infer`` and ``Segmenter.predict_files``.

Per input::

    load_nifti -> core.to_network -> core.segment(predict) -> Prediction.save

The per-volume work is :mod:`dunet_deploy.runtime.core` (the one inference
core); this module expands command-line inputs, reads and preprocesses the next
volume on a background thread while the model runs on the current one (a
bounded queue holds at most ``prefetch`` ready volumes; decompression,
percentiles and matmul resizing release the GIL), records one
:class:`CaseResult` per input and writes ``summary.json``.

Nothing here imports torch.
"""

from __future__ import annotations

import glob
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy import __version__
from dunet_deploy.data.nifti import NiftiVolume, load_nifti, nifti_suffix
from dunet_deploy.errors import DunetError
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime.base import Runner, one_line
from dunet_deploy.runtime.core import (
    NetworkInput,
    Predictor,
    finish_prediction,
    geometry_of,
    predict_grid,
    to_network,
)
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "CaseResult",
    "InputItem",
    "Meter",
    "OutputOptions",
    "Prefetcher",
    "PreparedVolume",
    "expand_inputs",
    "infer_case",
    "label_file_reason",
    "output_stem",
    "prepare_output_dir",
    "prepare_volume",
    "run_cases",
    "segment_files",
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
    """File name without ``.nii`` / ``.nii.gz`` (``sub-1_T1w.nii.gz`` -> ``sub-1_T1w``)."""
    name = Path(path).name
    suffix = nifti_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _scans(found: Iterable[Path], skipped: list[tuple[Path, str]] | None) -> list[Path]:
    """``found`` without the lesion masks of known layouts (noted in ``skipped``)."""
    scans = []
    for p in found:
        reason = label_file_reason(p)
        if reason is None:
            scans.append(p)
        elif skipped is not None:
            skipped.append((p, reason))
    return scans


def _expand_one(text: str, recursive: bool,
                skipped: list[tuple[Path, str]] | None) -> list[InputItem]:
    path = Path(text)
    if path.is_dir():
        listing = path.rglob("*") if recursive else path.iterdir()
        found = _scans(sorted(p for p in listing if p.is_file() and nifti_suffix(p)), skipped)
        where = "directory or its sub-folders" if recursive else "directory"
        if not found:
            hint = "" if recursive else " (--recursive looks in sub-folders)"
            return [InputItem(path, f"{path}: no scans (.nii or .nii.gz files) in {where}{hint}",
                              matched_nothing=True)]
        return [InputItem(p) for p in found]
    if _has_magic(text) and not path.exists():
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        found = _scans([p for p in matches if p.is_file()], skipped)
        if not found:
            return [InputItem(path, f"{text}: no file matches", matched_nothing=True)]
        return [InputItem(p) for p in found]
    return [InputItem(path)]


def expand_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    skipped: list[tuple[Path, str]] | None = None,
) -> list[InputItem]:
    """Turn command-line inputs into the list of volumes to process, in order.

    * a directory gives every ``*.nii`` / ``*.nii.gz`` file directly inside it
      (sorted), or anywhere below it with ``recursive``;
    * a pattern with ``*``, ``?`` or ``[`` that is not an existing file is a
      glob (``**`` recurses), sorted;
    * anything else is taken as a file (a missing one fails when it is read).

    Lesion masks of the known layouts found in a directory or by a pattern
    (:func:`label_file_reason`) are not scans: they are left out and listed
    in ``skipped``; a file named explicitly is always taken. The same file
    reached twice is processed once; two different files with the same output
    name fail the second one instead of overwriting.

    Args:
        inputs: Files, directories and patterns, as given.
        recursive: Directories are searched in their sub-folders too.
        skipped: Receives ``(path, why)`` for each mask left out.

    Returns:
        One :class:`InputItem` per volume or per input that matched nothing
        (``matched_nothing``).
    """
    items: list[InputItem] = []
    for raw in inputs:
        items.extend(_expand_one(os.fspath(raw), recursive, skipped))

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
        bytes_sent: Tensor bytes sent to a Triton server (``None``: local model).
        bytes_received: Tensor bytes received from it.
        server: The server's summary (``--server-side``).
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


def prepare_volume(
    item: InputItem, spec: PreprocessSpec, resample: str = "auto"
) -> PreparedVolume:
    """Read one input and bring it onto the model's grid; errors go into the result.

    Args:
        item: The input.
        spec: The model's preprocessing spec.
        resample: ``"auto"`` or ``"never"`` (see :func:`~dunet_deploy.runtime.core.to_network`).

    Returns:
        A :class:`PreparedVolume` (``result.status == "error"`` on failure).
    """
    result = CaseResult(input=str(item.path))
    prep = PreparedVolume(item, result)
    if item.error is not None:
        result.fail(item.path, item.error)
        return prep
    try:
        t0 = time.perf_counter()
        vol = load_nifti(item.path)
        result.times["read"] = time.perf_counter() - t0
        net = to_network(vol.data, spec, affine=vol.affine, resample=resample,
                         times=result.times)
    except CASE_ERRORS as exc:
        result.fail(item.path, exc)
        return prep
    result.shape = [int(n) for n in vol.shape]
    result.zooms = [float(z) for z in vol.zooms]
    z = net.shape[spec.axial_axis]
    result.slabs_run, result.slabs_skipped = int(net.indices.size), int(z - net.indices.size)
    if net.space is not None:
        result.geometry = net.space.describe()
        result.warnings = list(net.space.warnings)
    prep.ref, prep.net = geometry_of(vol), net
    return prep


class Prefetcher:
    """Reads and preprocesses inputs on a background thread, in order.

    Iterate over it to get :class:`PreparedVolume` objects; at most
    ``depth`` finished volumes wait in the queue, so memory stays bounded.
    Use as a context manager (or call :meth:`close`) so the thread stops
    when the consumer stops early.

    Args:
        items: Inputs in processing order.
        spec: The model's preprocessing spec.
        depth: Queue size (ready volumes held ahead of the consumer), >= 1.
        resample: ``"auto"`` or ``"never"``, for :func:`prepare_volume`.
    """

    _DONE = object()

    def __init__(self, items: Sequence[InputItem], spec: PreprocessSpec, depth: int = 1,
                 resample: str = "auto") -> None:
        self._items = list(items)
        self._spec = spec
        self._resample = resample
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="dunet-prefetch", daemon=True)
        self._thread.start()

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put(
                        prepare_volume(item, self._spec, self._resample)):
                    return
        except BaseException as exc:  # a bug: hand it to the consumer to re-raise
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[PreparedVolume]:
        while True:
            obj = self._queue.get()
            if obj is self._DONE:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj

    def close(self) -> None:
        """Stop the thread (after the volume it is working on) and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------- running
@dataclass(frozen=True)
class OutputOptions:
    """Where and what a run over files writes.

    Attributes:
        out_dir: Existing output folder.
        save_prob: Also write ``<name>_prob.nii.gz`` (float32).
        min_lesion_mm3: Remove connected lesions smaller than this from the masks.
        prob_dtype: On-disk type of the probability maps
            (:data:`~dunet_deploy.choices.PROB_DTYPES`).
    """

    out_dir: Path
    save_prob: bool = False
    min_lesion_mm3: float = 0.0
    prob_dtype: str = "float32"


def write_case(
    grid: np.ndarray, prep: PreparedVolume, spec: PreprocessSpec, opts: OutputOptions
) -> CaseResult:
    """Post-process one volume's network grid and write its files; errors go into the result.

    Needs no model: ``dunet-infer --workers`` runs it in worker processes.
    """
    result = prep.result
    assert prep.ref is not None and prep.net is not None
    stem = output_stem(prep.item.path)
    mask_path = opts.out_dir / f"{stem}{MASK_SUFFIX}"
    prob_path = opts.out_dir / f"{stem}{PROB_SUFFIX}"
    try:
        pred = finish_prediction(grid, prep.net, prep.ref, spec,
                                 min_lesion_mm3=opts.min_lesion_mm3, times=result.times,
                                 keep_prob=opts.save_prob)
        pred.save(mask_path, prob_path if opts.save_prob else None, prob_dtype=opts.prob_dtype)
    except CASE_ERRORS as exc:
        return result.fail(prep.item.path, exc)
    result.mask = str(mask_path)
    result.prob = str(prob_path) if opts.save_prob else None
    result.lesion_voxels = pred.lesion_voxels
    result.lesion_volume_mm3 = pred.lesion_volume_mm3
    result.lesions_removed = pred.lesions_removed
    return result


#: ``() -> (bytes sent, bytes received)`` so far by a model behind a network (a Triton
#: client), or ``None`` for a local model.
Meter = Callable[[], "tuple[int, int] | None"]


def infer_case(
    predict: Predictor, spec: PreprocessSpec, prep: PreparedVolume, batch_size: int,
    meter: Meter | None = None,
) -> np.ndarray | None:
    """Run the network on one prepared volume; ``None`` (and a failed result) on an error.

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


def run_cases(
    predict: Predictor,
    spec: PreprocessSpec,
    volumes: Iterable[PreparedVolume],
    opts: OutputOptions,
    *,
    batch_size: int = 16,
    on_result: Callable[[CaseResult], None] | None = None,
    results: list[CaseResult] | None = None,
    meter: Meter | None = None,
) -> list[CaseResult]:
    """Segment prepared volumes one after the other, in this process, and write their outputs.

    Args:
        predict: The network (a runner, possibly wrapped for test-time augmentation).
        spec: The model's preprocessing spec.
        volumes: Prepared volumes (e.g. a :class:`Prefetcher`).
        opts: Output folder and what to write.
        batch_size: Slabs per model call.
        on_result: Called with each finished result (progress, error lines).
        results: Finished results are appended here, so an interrupted caller
            still has them.
        meter: Traffic counter of a remote model (see :func:`infer_case`).

    Returns:
        ``results``: one :class:`CaseResult` per volume, in order.
    """
    results = [] if results is None else results
    for prep in volumes:
        grid = infer_case(predict, spec, prep, batch_size, meter)
        result = prep.result if grid is None else write_case(grid, prep, spec, opts)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


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


def summary_document(
    runner: Runner | None,
    results: Sequence[CaseResult],
    *,
    batch_size: int,
    threads: int | None,
    load_s: float,
    wall_s: float,
    inference: dict[str, Any] | None = None,
    workers: int = 0,
    interrupted: str | None = None,
    total: int | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` document of a run over files.

    Args:
        runner: The runner that was used (still describable after close);
            ``None`` when the run was interrupted before the model loaded.
        results: One result per finished input, in order.
        batch_size: Slabs per model call that was asked for.
        threads: Backend threads that were asked for.
        load_s: Seconds to load the model.
        wall_s: Seconds for the whole run.
        inference: The inference settings that were applied (TTA,
            post-processing, resampling, and where each came from).
        workers: Worker processes used (0: none).
        interrupted: The signal that stopped the run early, if one did.
        total: Inputs asked for (default: ``len(results)``).
    """
    model_keys = ("path", "model_name", "model_precision", "spec_digest")
    top_keys = ("backend", "device", "precision")
    described = runner.describe() if runner is not None else {}
    cap = described.get("max_batch")
    return {
        "dunet_deploy": __version__,
        "model": {k: described.get(k) for k in model_keys},
        **{k: described.get(k) for k in top_keys},
        "batch_size": batch_size if cap is None else min(batch_size, cap),
        "threads": threads,
        "workers": workers,
        "inference": dict(inference or {}),
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
    }


#: Keyword arguments of :func:`segment_files` that go to ``Segmenter.predict_files``.
FILES_OPTS = ("save_prob", "prefetch", "workers", "on_start", "on_result", "prob_dtype")


def segment_files(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    **opts: Any,
) -> dict[str, Any]:
    """Segment NIfTI files with a model and write ``summary.json`` (what ``dunet-infer`` does).

    A :class:`~dunet_deploy.Segmenter` opened for this call only. ``opts``
    named in :data:`FILES_OPTS` go to
    :meth:`~dunet_deploy.Segmenter.predict_files` (``save_prob``,
    ``prefetch``, ``on_start``, ``on_result``); the others to the
    :class:`~dunet_deploy.Segmenter` (``backend``, ``batch_size``,
    ``threads``, ``precision``, ``device``, ``runner_opts``, ``runner_factory``).

    Returns:
        The summary document (also written to ``out_dir/summary.json``).
    """
    from dunet_deploy.runtime.segmenter import Segmenter

    files = {k: opts.pop(k) for k in FILES_OPTS if k in opts}
    with Segmenter(model_path, lazy=True, **opts) as seg:
        return seg.predict_files(inputs, out_dir, **files)
