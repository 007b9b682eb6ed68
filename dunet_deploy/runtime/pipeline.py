"""Volume-level inference: NIfTI in, lesion mask (and probabilities) out.

Per volume::

    load_nifti -> spec.check_volume_shape -> nonempty_slab_indices
      -> volume_to_slices -> slabs in batches -> runner.infer
      -> stitch [Z, 1, S, S] -> probs_to_volume -> binarize -> save_nifti_like

All pre- and post-processing is :mod:`dunet_deploy.data.preprocess`, the code
training used. Slabs whose slices are all background inside the crop box are
not sent to the model; their probability is 0.

A background thread reads and preprocesses the next volume (a bounded queue
holds at most ``prefetch`` ready volumes) while the calling thread runs the
model on the current one; decompression, percentiles and matmul resizing
release the GIL, so this hides most of the non-model time. The thread starts
before the model is loaded, so the first volume is read while the backend
compiles.

Nothing here imports torch.
"""

from __future__ import annotations

import glob
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy import __version__
from dunet_deploy.artifacts import ArtifactInfo, read_artifact_info, write_json
from dunet_deploy.data.nifti import NiftiVolume, load_nifti, nifti_suffix, save_nifti_like
from dunet_deploy.data.preprocess import (
    binarize,
    nonempty_slab_indices,
    probs_to_volume,
    slices_to_slabs,
    volume_to_slices,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.machine import machine_info
from dunet_deploy.runtime.base import Runner, one_line, open_runner
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "CaseResult",
    "InputItem",
    "Prefetcher",
    "PreparedVolume",
    "expand_inputs",
    "output_stem",
    "predict_probs",
    "prepare_volume",
    "run_cases",
    "segment_files",
]

MASK_SUFFIX = "_mask.nii.gz"
PROB_SUFFIX = "_prob.nii.gz"
SUMMARY_NAME = "summary.json"
TIME_KEYS = ("read", "preprocess", "infer", "postprocess", "write")
# Errors that fail one case but not the run (bugs keep their traceback).
CASE_ERRORS: tuple[type[BaseException], ...] = (DunetError, OSError, ValueError, MemoryError)


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


def output_stem(path: str | os.PathLike[str]) -> str:
    """File name without ``.nii`` / ``.nii.gz`` (``sub-1_T1w.nii.gz`` -> ``sub-1_T1w``)."""
    name = Path(path).name
    suffix = nifti_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[InputItem]:
    """Turn command-line inputs into the list of volumes to process, in order.

    * a directory gives every ``*.nii`` / ``*.nii.gz`` file directly inside it
      (sorted; not recursive, so masks in sub-folders are not picked up);
    * a pattern with ``*``, ``?`` or ``[`` that is not an existing file is a
      glob (``**`` recurses), sorted;
    * anything else is taken as a file (a missing one fails when it is read).

    The same file reached twice is processed once; two different files with
    the same output name fail the second one instead of overwriting.

    Returns:
        One :class:`InputItem` per volume or per input that matched nothing.
    """
    items: list[InputItem] = []
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and nifti_suffix(p))
            if not found:
                items.append(InputItem(path, f"{path}: no .nii or .nii.gz files in directory"))
            items.extend(InputItem(p) for p in found)
        elif _has_magic(text) and not path.exists():
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            found = [p for p in matches if p.is_file()]
            if not found:
                items.append(InputItem(path, f"{text}: no file matches"))
            items.extend(InputItem(p) for p in found)
        else:
            items.append(InputItem(path))

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
        slices: float32 ``[Z, S, S]`` network-space slices.
        indices: int64 ``[K]`` slabs to run (ascending).
    """

    item: InputItem
    result: CaseResult
    ref: NiftiVolume | None = None
    slices: np.ndarray | None = None
    indices: np.ndarray | None = None


def prepare_volume(item: InputItem, spec: PreprocessSpec) -> PreparedVolume:
    """Read and preprocess one input; errors go into the result, never raised.

    Args:
        item: The input.
        spec: The model's preprocessing spec.

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
        t1 = time.perf_counter()
        result.times["read"] = t1 - t0
        spec.check_volume_shape(vol.shape)
        indices = nonempty_slab_indices(vol.data, spec)
        slices = volume_to_slices(vol.data, spec) if indices.size else None
        result.times["preprocess"] = time.perf_counter() - t1
    except CASE_ERRORS as exc:
        result.fail(item.path, exc)
        return prep
    result.shape = [int(n) for n in vol.shape]
    result.zooms = [float(z) for z in vol.zooms]
    z = vol.shape[spec.axial_axis]
    result.slabs_run, result.slabs_skipped = int(indices.size), int(z - indices.size)
    # Keep only the geometry: the voxels are not needed after preprocessing.
    geometry = np.broadcast_to(np.zeros((), np.float32), vol.shape)
    prep.ref = NiftiVolume(data=geometry, affine=vol.affine, header=vol.header, path=vol.path)
    prep.slices, prep.indices = slices, indices
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
    """

    _DONE = object()

    def __init__(self, items: Sequence[InputItem], spec: PreprocessSpec, depth: int = 1) -> None:
        self._items = list(items)
        self._spec = spec
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
                if self._stop.is_set() or not self._put(prepare_volume(item, self._spec)):
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
def predict_probs(
    runner: Runner,
    slices: np.ndarray | None,
    indices: np.ndarray,
    spec: PreprocessSpec,
    batch_size: int,
    times: dict[str, float] | None = None,
) -> np.ndarray:
    """Run the model over the selected slabs of one volume and stitch the result.

    Args:
        runner: An open runner.
        slices: float32 ``[Z, S, S]`` from ``volume_to_slices`` (may be ``None``
            when ``indices`` is empty).
        indices: int64 ``[K]`` slab indices to run, ascending.
        spec: The preprocessing spec.
        batch_size: Slabs per ``runner.infer`` call (capped at ``runner.max_batch``).
        times: When given, ``"preprocess"`` (slab stacking) and ``"infer"``
            seconds are added to it.

    Returns:
        float32 ``[Z, 1, S, S]``; slabs not in ``indices`` are 0.
    """
    s = spec.image_size
    z = 0 if slices is None else slices.shape[0]
    probs = np.zeros((z, 1, s, s), dtype=np.float32)
    if slices is None or indices.size == 0:
        return probs
    step = batch_size if runner.max_batch is None else min(batch_size, runner.max_batch)
    t_stack = t_infer = 0.0
    for i in range(0, indices.size, step):
        idx = indices[i : i + step]
        t0 = time.perf_counter()
        slabs = slices_to_slabs(slices, spec, idx)
        t1 = time.perf_counter()
        probs[idx] = runner.infer(slabs)
        t_stack += t1 - t0
        t_infer += time.perf_counter() - t1
    if times is not None:
        times["preprocess"] = times.get("preprocess", 0.0) + t_stack
        times["infer"] = times.get("infer", 0.0) + t_infer
    return probs


def _finish_case(
    runner: Runner,
    prep: PreparedVolume,
    out_dir: Path,
    batch_size: int,
    save_prob: bool,
) -> CaseResult:
    """Infer, post-process and write one prepared volume."""
    result = prep.result
    if not result.ok:
        return result
    assert prep.ref is not None and prep.indices is not None and result.zooms is not None
    spec = runner.spec
    stem = output_stem(prep.item.path)
    mask_path, prob_path = out_dir / f"{stem}{MASK_SUFFIX}", out_dir / f"{stem}{PROB_SUFFIX}"
    written: list[Path] = []
    traffic = getattr(runner, "traffic", None)  # (sent, received) of a Triton client
    try:
        probs = predict_probs(runner, prep.slices, prep.indices, spec, batch_size, result.times)
        if traffic is not None:
            sent, received = runner.traffic  # type: ignore[attr-defined]
            result.bytes_sent, result.bytes_received = sent - traffic[0], received - traffic[1]
        prep.slices = None  # free the slices before allocating the output volume
        t0 = time.perf_counter()
        prob_vol = probs_to_volume(probs, spec, prep.ref.shape)
        mask = binarize(prob_vol, spec)
        voxels = int(np.count_nonzero(mask))
        t1 = time.perf_counter()
        save_nifti_like(mask_path, mask, prep.ref, dtype=np.uint8)
        written.append(mask_path)
        if save_prob:
            save_nifti_like(prob_path, prob_vol, prep.ref, dtype=np.float32)
            written.append(prob_path)
        t2 = time.perf_counter()
    except CASE_ERRORS as exc:
        # No partial case: a mask without its requested probability map goes too.
        for path in written:
            path.unlink(missing_ok=True)
        return result.fail(prep.item.path, exc)
    result.times["postprocess"] = t1 - t0
    result.times["write"] = t2 - t1
    result.mask = str(mask_path)
    result.prob = str(prob_path) if save_prob else None
    result.lesion_voxels = voxels
    result.lesion_volume_mm3 = float(voxels * float(np.prod(result.zooms)))
    return result


def run_cases(
    runner: Runner,
    volumes: Iterable[PreparedVolume],
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    save_prob: bool = False,
    on_result: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Run prepared volumes through ``runner`` and write their outputs.

    Args:
        runner: An open runner.
        volumes: Prepared volumes (e.g. a :class:`Prefetcher`).
        out_dir: Existing output folder.
        batch_size: Slabs per model call.
        save_prob: Also write ``<name>_prob.nii.gz`` (float32).
        on_result: Called with each finished result (progress, error lines).

    Returns:
        One :class:`CaseResult` per volume, in order.
    """
    out = Path(out_dir)
    results = []
    for prep in volumes:
        result = _finish_case(runner, prep, out, batch_size, save_prob)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def make_output_dir(out: Path) -> None:
    """Create the output folder (``DunetError`` naming it when that is impossible)."""
    if out.exists() and not out.is_dir():
        raise DunetError(f"{out}: output path exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DunetError(f"{out}: cannot create output directory ({exc.strerror})") from None


def segment_files(
    model_path: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    backend: str = "auto",
    batch_size: int = 16,
    save_prob: bool = False,
    threads: int | None = None,
    precision: str = "auto",
    device: str = "auto",
    prefetch: int = 1,
    on_start: Callable[[Runner, int], None] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    runner_opts: dict[str, Any] | None = None,
    runner_factory: Callable[[Path, ArtifactInfo], Runner] | None = None,
) -> dict[str, Any]:
    """Segment NIfTI files with a model and write ``summary.json`` (what ``dunet-infer`` does).

    Reading and preprocessing start on a background thread before the model
    is loaded; see the module docstring.

    Args:
        model_path: ``.onnx`` / ``.plan`` model.
        inputs: Files, directories or glob patterns (see :func:`expand_inputs`).
        out_dir: Output folder (created if missing).
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        batch_size: Slabs per model call, >= 1.
        save_prob: Also write float32 probability volumes.
        threads: Backend threads (``None``: backend default).
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (ONNX Runtime providers).
        prefetch: Prepared volumes queued ahead of the model, >= 1.
        on_start: Called once the model is loaded, with the runner and the input count.
        on_result: Called with each finished :class:`CaseResult`.
        runner_opts: Extra keyword arguments for :func:`open_runner`.
        runner_factory: Builds the runner from the model path and its info
            instead of :func:`open_runner` (e.g. a Triton client runner); the
            backend options above are then not used.

    Returns:
        The summary document (also written to ``out_dir/summary.json``).

    Raises:
        DunetError: when the model cannot be used or ``out_dir`` cannot be
            created; per-input problems are reported in the summary instead.
    """
    if batch_size < 1:
        raise DunetError(f"batch size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    model = Path(model_path)
    out = Path(out_dir)
    info = read_artifact_info(model)  # before creating anything: a bad model writes nothing
    make_output_dir(out)
    items = expand_inputs(inputs)
    with Prefetcher(items, info.spec, depth=prefetch) as prefetcher:
        t_load = time.perf_counter()
        if runner_factory is not None:
            runner = runner_factory(model, info)
        else:
            runner = open_runner(model, backend, info=info, threads=threads,
                                 precision=precision, device=device, **(runner_opts or {}))
        with runner:
            load_s = time.perf_counter() - t_load
            if on_start is not None:
                on_start(runner, len(items))
            results = run_cases(runner, prefetcher, out, batch_size=batch_size,
                                save_prob=save_prob, on_result=on_result)
            described = runner.describe()
            step = batch_size if runner.max_batch is None else min(batch_size, runner.max_batch)
    summary = {
        "dunet_deploy": __version__,
        "model": {k: described[k] for k in ("path", "model_name", "model_precision",
                                            "spec_digest")},
        "backend": described["backend"],
        "device": described["device"],
        "precision": described["precision"],
        "batch_size": step,
        "threads": threads,
        "backend_details": {k: v for k, v in described.items()
                            if k not in ("path", "model_name", "model_precision", "spec_digest",
                                         "backend", "device", "precision")},
        "machine": machine_info(),
        "model_load_s": round(load_s, 6),
        "wall_s": round(time.perf_counter() - t_start, 6),
        "total": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "cases": [r.to_dict() for r in results],
    }
    write_json(out / SUMMARY_NAME, summary)
    return summary
