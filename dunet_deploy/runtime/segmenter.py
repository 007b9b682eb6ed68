"""``Segmenter``: an exported model loaded once, segmenting any number of volumes in-process.

Shaped like nnU-Net's ``nnUNetPredictor``::

    from dunet_deploy import Segmenter

    with Segmenter("export/model.onnx", backend="auto", precision="auto") as seg:
        pred = seg.predict("scan.nii.gz")                # a path, a nibabel image,
        pred = seg.predict(array, affine=affine)         # or an array with its affine
        pred.mask, pred.prob, pred.affine                # uint8 / float32 on the input's grid
        pred.save("out/scan_mask.nii.gz", prob="out/scan_prob.nii.gz")
        summary = seg.predict_files(["scans/"], "masks/")  # what dunet-infer does

Every prediction goes through :mod:`dunet_deploy.runtime.core`, the same code
``dunet-infer``, ``dunet-eval`` and training validation use. Constructing a
``Segmenter`` reads only the model's metadata (its :class:`PreprocessSpec`);
the backend is imported and the model loaded on :meth:`Segmenter.open` (or
entering the ``with`` block). Nothing here imports torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dunet_deploy.artifacts import ArtifactInfo, read_artifact_info, write_json
from dunet_deploy.data.nifti import NiftiVolume, load_nifti
from dunet_deploy.errors import DunetError
from dunet_deploy.postprocess import with_tta
from dunet_deploy.runtime.base import Closeable, Runner, open_runner
from dunet_deploy.runtime.core import Prediction, Predictor
from dunet_deploy.runtime.dicom_io import ScanReader, is_series_input, refuse_non_dicom, seg_writer
from dunet_deploy.runtime.inprocess import Prefetcher, run_cases
from dunet_deploy.runtime.options import InferenceOptions, Sources
from dunet_deploy.runtime.pipeline import (
    NIFTI_WRITER,
    CaseResult,
    InputItem,
    OutputOptions,
    Reader,
    Writer,
    earlier_cases,
    expand_inputs,
    finish_case,
    infer_case,
    missing_folders,
    prepare_output_dir,
    prepare_source,
    remove_empty_folders,
    summary_document,
)
from dunet_deploy.runtime.register_stage import RegisterStage
from dunet_deploy.runtime.resume import (
    RunFingerprint,
    RunPlan,
    description_digest,
    model_digest,
    plan_run,
)
from dunet_deploy.runtime.shards import Shard
from dunet_deploy.runtime.workers import run_in_workers
from dunet_deploy.spec import InferenceDefaults, PreprocessSpec

__all__ = ["Prediction", "Segmenter", "as_volume", "segment_files"]

ImageLike = str | os.PathLike[str] | NiftiVolume | np.ndarray | Any

#: Options that decide how the model is loaded: fixed for a Segmenter's life.
RUNNER_FIELDS = ("backend", "precision", "device", "threads", "cuda_graph")


@dataclass(frozen=True)
class FilesRun:
    """A run over files, planned (:meth:`Segmenter.plan_files`).

    Attributes:
        plan: Which inputs it segments and which it keeps (``skip_existing``, shard).
        options: The run's options, the model's defaults applied.
        skipped: ``(path, why)`` of what the input search left out.
        reader: Reads each input (NIfTI, DICOM series).
        writer: Writes each case's outputs.
        register: The registration stage.
    """

    plan: RunPlan
    options: InferenceOptions
    skipped: tuple[tuple[Path, str], ...]
    reader: Reader
    writer: Writer
    register: RegisterStage

    def write_summary(self, runner: Runner | None, results: Sequence[CaseResult],
                      out_dir: Path, *, interrupted: KeyboardInterrupt | None = None,
                      extra: dict[str, Any] | None = None, **timing: Any) -> dict[str, Any]:
        """Write the run's summary (``summary.json`` or the shard's) and return it.

        Args:
            runner: The runner that ran (or stands for) the model; ``None``
                when the run stopped before it loaded.
            results: The cases this run finished.
            out_dir: The output folder.
            interrupted: The interrupt that stopped the run, if one did.
            extra: More top-level entries (e.g. ``"ray"``).
            **timing: ``load_s``, ``wall_s``, ``inference`` of
                :func:`~dunet_deploy.runtime.pipeline.summary_document`.
        """
        done = self.plan.results(results)
        summary = summary_document(
            runner, done, options=self.options, total=len(self.plan.items),
            interrupted=None if interrupted is None else str(interrupted) or "SIGINT",
            skipped=self.skipped,
            # a shard's summary covers its own part; the merge lists what is missing
            earlier=earlier_cases(out_dir, done) if self.plan.shard is None else (),
            **timing)
        summary.update(extra or {})
        summary.update(self.plan.summary_entries())
        write_json(out_dir / self.plan.summary_name, summary)
        return summary


class Segmenter(Closeable):
    """An exported D-UNet (ONNX or TensorRT engine) ready to segment volumes.

    Args:
        model: ``.onnx`` or ``.plan`` / ``.engine`` (with its ``.json`` sidecar).
        options: How to run and what to write (:class:`InferenceOptions`);
            ``tta`` / ``min_lesion_mm3`` left ``None`` take the model's own
            defaults (stored at export).
        runner_opts: Extra keyword arguments for the backend's runner.
        runner_factory: Builds the runner from the model path and its metadata
            instead of a local backend (e.g. a Triton client); ``backend``,
            ``precision``, ``device`` and ``threads`` are then not used.
        lazy: Load the model on first use instead of on entering ``with``.
        info: The model's description when ``model`` is not a local file to read
            it from (a remote model: ``runner_factory`` then runs it).
        **changes: :class:`InferenceOptions` fields, applied over ``options``
            (``Segmenter(model, backend="openvino", tta="flip")``).

    Raises:
        DunetError: when the model file is missing or is not one of ours, or
            for an invalid option (at once, before any model is loaded).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        options: InferenceOptions | None = None,
        *,
        runner_opts: dict[str, Any] | None = None,
        runner_factory: Callable[[Path, ArtifactInfo], Runner] | None = None,
        lazy: bool = False,
        info: ArtifactInfo | None = None,
        **changes: Any,
    ) -> None:
        asked = _options(options, changes)
        if isinstance(model, bytes) or not isinstance(model, (str, os.PathLike)):
            raise DunetError(f"model {model!r}: give a str or pathlib.Path", option="model")
        self.model_path = Path(model)
        if info is not None and runner_factory is None:
            raise DunetError("info= is for a remote model: give runner_factory too", option="info")
        self.info: ArtifactInfo = info if info is not None else read_artifact_info(
            self.model_path)
        self._asked = asked  # before the model's defaults: a call's changes apply to it
        self.options, self._sources = asked.with_model_defaults(self.info.inference)
        self._runner_opts = dict(runner_opts or {})
        self._factory = runner_factory
        self._lazy = lazy
        self._runner: Runner | None = None
        self._closed = False
        self._digest: str | None = None
        self.load_s = 0.0

    # ---------------------------------------------------------- lifecycle
    @property
    def spec(self) -> PreprocessSpec:
        """The model's preprocessing spec (read from its metadata)."""
        return self.info.spec

    @property
    def inference(self) -> InferenceDefaults:
        """The TTA and post-processing applied (the model's defaults unless overridden)."""
        return _inference(self.options)

    @property
    def batch_size(self) -> int:
        """Slabs per model call that were asked for."""
        return self.options.batch_size

    @property
    def resample(self) -> str:
        """``auto`` or ``never``."""
        return self.options.resample

    @property
    def threads(self) -> int | None:
        """Backend CPU threads that were asked for."""
        return self.options.threads

    @property
    def runner(self) -> Runner:
        """The loaded backend runner (loads the model on first access)."""
        return self.open()._runner  # type: ignore[return-value]

    def open(self) -> Segmenter:
        """Load the model (once); later calls return at once.

        Raises:
            DunetError: after :meth:`close` (a closed Segmenter stays closed).
        """
        if self._closed:
            raise DunetError(f"Segmenter is closed ({self.model_path}): create a new one, or "
                             "use it inside its `with` block")
        if self._runner is None:
            t0 = time.perf_counter()
            if self._factory is not None:
                self._runner = self._factory(self.model_path, self.info)
            else:
                opts = self.options
                extra = {"cuda_graph": True} if opts.cuda_graph else {}
                self._runner = open_runner(self.model_path, opts.backend, info=self.info,
                                           precision=opts.precision, device=opts.device,
                                           threads=opts.threads, **extra, **self._runner_opts)
            self.load_s = time.perf_counter() - t0
        return self

    def close(self) -> None:
        """Release the backend; the Segmenter cannot be used afterwards."""
        self._closed = True
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> Segmenter:
        return self if self._lazy else self.open()

    def describe(self) -> dict[str, Any]:
        """Backend, precision, device and model facts (loads the model)."""
        return self.runner.describe()

    def inference_settings(self) -> dict[str, Any]:
        """TTA, post-processing and resampling applied, and where each came from."""
        return _settings(self.options, self._sources)

    def fingerprint(self, options: InferenceOptions | None = None) -> RunFingerprint:
        """What a run with ``options`` (default: the Segmenter's) writes: model digest + options.

        The model file is hashed once per Segmenter.
        """
        if self._digest is None:
            local = Path(self.model_path).is_file()  # else a model known by its server only
            self._digest = (model_digest(self.model_path) if local
                            else description_digest(self.info))
        return RunFingerprint(self._digest, (options or self.options).fingerprint())

    def _traffic(self) -> tuple[int, int] | None:
        """Bytes sent and received so far by a remote runner (a Triton client), else ``None``."""
        traffic = getattr(self._runner, "traffic", None)
        return None if traffic is None else (int(traffic[0]), int(traffic[1]))

    def predictor(self, tta: str | None = None) -> Predictor:
        """The runner, wrapped for test-time augmentation (``tta``: default the options')."""
        return with_tta(self.runner.infer, _inference(self.options).tta if tta is None else tta,
                        self.spec)

    # ---------------------------------------------------------- prediction
    def predict(self, image: ImageLike, *, affine: npt.ArrayLike | None = None) -> Prediction:
        """Segment one volume.

        The same stages as :meth:`predict_files` (``pipeline.prepare_source``,
        ``infer_case``, ``finish_case``), on a volume in memory.

        Args:
            image: A NIfTI path, a DICOM series (folder or zip; ``series``
                picks one of several), a nibabel image, a :class:`NiftiVolume`, or a
                3D array (voxel values; then ``affine`` gives its geometry).
            affine: ``[4, 4]`` voxel-to-world matrix of an array input; without
                it the array is taken as already on the model's grid (no
                reorientation or resampling; the prediction's affine is the
                identity). Not allowed with other inputs.

        Returns:
            A :class:`Prediction` on the input's own grid.

        Raises:
            DunetError: for a file that cannot be read, a volume the model's
                spec cannot take, or a closed Segmenter.
        """
        predict = self.predictor()  # a closed Segmenter says so before any work
        t0 = time.perf_counter()
        if isinstance(image, (str, os.PathLike)) and affine is None and not isinstance(
                os.fspath(image), bytes) and is_series_input(Path(image)):
            vol = ScanReader(self.options.series).read(Path(image))  # a DICOM series
        else:
            vol = as_volume(image, affine)
        item = InputItem(vol.path if vol.path is not None else Path("array"))
        result = CaseResult(input=str(item.path))
        result.times["read"] = time.perf_counter() - t0
        as_is = affine is None and isinstance(image, np.ndarray)
        prep = prepare_source(item, vol, self.spec, resample=self.resample, as_is=as_is,
                              result=result, register=self.register_stage())
        grid = infer_case(predict, self.spec, prep, self.batch_size)
        assert self.options.min_lesion_mm3 is not None
        pred = None if grid is None else finish_case(
            grid, prep, self.spec, min_lesion_mm3=self.options.min_lesion_mm3)
        if pred is None:
            raise DunetError(str(prep.result.message))
        pred.warnings = tuple(prep.result.warnings)
        return pred

    def register_stage(self, options: InferenceOptions | None = None) -> RegisterStage:
        """The registration stage of a run with ``options`` (default: the Segmenter's).

        Raises:
            DunetError: ``register="always"`` on a model without a template.
        """
        return RegisterStage.for_model(self.model_path, self.info, options or self.options,
                                       self.spec)

    def run_options(self, options: InferenceOptions | None = None,
                    **changes: Any) -> tuple[InferenceOptions, Sources]:
        """The options of one call: ``options`` (default: the Segmenter's) with ``changes``.

        Returns:
            ``(options with the model's defaults applied, where tta and
            min_lesion_mm3 came from)``.

        Raises:
            DunetError: for an invalid value, or a change to how the model is
                loaded (``backend``, ``precision``, ``device``, ``threads``,
                ``cuda_graph``: fixed when the Segmenter is created).
        """
        run, sources = _options(options or self._asked, changes).with_model_defaults(
            self.info.inference)
        for name in RUNNER_FIELDS:
            if getattr(run, name) != getattr(self.options, name):
                raise DunetError(f"{name} {getattr(run, name)!r}: fixed when the Segmenter is "
                                 f"created ({getattr(self.options, name)!r}); create another "
                                 "one", option=name)
        return run, sources

    def plan_files(
        self,
        inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        run: InferenceOptions,
        *,
        shard: Shard | None = None,
        reader: Reader | None = None,
        writer: Writer = NIFTI_WRITER,
    ) -> FilesRun:
        """What a run over files does, decided before anything is created or loaded.

        Shared by :meth:`predict_files` and ``runtime.ray_exec``: the inputs'
        expansion (what is left out and why), the DICOM reader and SEG writer,
        the registration stage, the shard and what ``skip_existing`` keeps.

        Args:
            inputs: As for :meth:`predict_files`.
            out_dir: The output folder (need not exist yet).
            run: The run's options with the model's defaults applied.
            shard: This run's shard, if any.
            reader: Default: a :class:`~dunet_deploy.runtime.dicom_io.ScanReader`.
            writer: Wrapped in a DICOM SEG writer with ``dicom_seg``.

        Raises:
            DunetError: a folder or pattern that gives no scan, ``dicom_seg``
                with an input that is not a DICOM series, ``register="always"``
                on a model without a template.
        """
        register = self.register_stage(run)
        reader = ScanReader(run.series) if reader is None else reader
        skipped: list[tuple[Path, str]] = []
        everything = expand_inputs(inputs, recursive=run.recursive, reader=reader,
                                   out_dir=out_dir, skipped=skipped)
        for item in everything:
            if item.matched_nothing:
                raise DunetError(str(item.error))
        if run.dicom_seg:
            refuse_non_dicom(everything)
            writer = seg_writer(writer, self.info, self.model_path)
        plan = plan_run(_as_list(inputs), everything, out_dir, run, self.fingerprint(run),
                        shard=shard, reader=reader)
        return FilesRun(plan, run, tuple(skipped), reader, writer, register)

    def predict_files(
        self,
        inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        options: InferenceOptions | None = None,
        *,
        on_start: Callable[[Runner, int], None] | None = None,
        on_result: Callable[[CaseResult], None] | None = None,
        reader: Reader | None = None,
        writer: Writer = NIFTI_WRITER,
        shard: Shard | None = None,
        **changes: Any,
    ) -> dict[str, Any]:
        """Segment NIfTI files and DICOM series into ``out_dir`` and write ``summary.json``.

        Writes ``<name>_mask.nii.gz`` (and ``<name>_prob.nii.gz`` with
        ``save_prob``, ``<name>_seg.dcm`` with ``dicom_seg``) per input.
        Reading and preprocessing run ahead of the
        model (on a background thread, or in ``workers`` processes that also
        post-process and write); when the model is not loaded yet it is loaded
        while the first volume is read. A bad input fails only its own case
        (reported in the summary and to ``on_result``); so does a worker
        process that dies (``worker process died (signal 9)``), and a new one
        takes over. On Ctrl-C or SIGTERM the cases already complete are kept,
        ``summary.json`` lists them (with ``"interrupted"``) and the interrupt
        is re-raised; no partial file is left. With ``skip_existing``, inputs
        already complete in ``out_dir`` (made by the same model and options, see
        :func:`~dunet_deploy.runtime.resume.plan_run`) are not done again; the
        summary lists them with the rest (and their count as ``skipped_existing``).
        Until the summary is written, each finished case is also appended to a
        journal in ``out_dir`` (:class:`~dunet_deploy.runtime.resume.Journal`),
        so that a SIGKILLed run can be resumed too.

        Folders and patterns give their scans only: the output folder (when it
        lies inside an input folder), hidden files, lesion masks of the known
        layouts and this package's own masks and probability maps are left out
        (``summary["skipped"]``), so running again into the same folder
        segments the same scans. A folder or pattern that gives no scan raises
        before anything is created. Only the cases this run segments are
        overwritten: ``summary["earlier_cases"]`` lists those of earlier runs
        whose files are still in ``out_dir`` (see
        :func:`~dunet_deploy.runtime.pipeline.earlier_cases`). A run that fails
        before writing anything removes the ``out_dir`` it created.

        Args:
            inputs: Files, directories or glob patterns; one ``str`` or path
                is one input (see :func:`~dunet_deploy.runtime.pipeline.expand_inputs`).
            out_dir: Output folder (created if missing).
            options: This call's options (default: the Segmenter's); see
                :meth:`run_options`.
            on_start: Called once the model is loaded, with the runner and the
                number of inputs.
            on_result: Called with each finished :class:`CaseResult`, in order.
            reader: Says what an input is and reads it (default:
                :class:`~dunet_deploy.runtime.dicom_io.ScanReader`: NIfTI files
                and DICOM series, ``series`` picking one UID).
            writer: Writes each case's outputs (wrapped in a
                :class:`~dunet_deploy.runtime.dicom_io.DicomSegWriter` with
                ``dicom_seg``).
            shard: Segment only this shard's part of the inputs and write
                ``summary-I-of-N.json`` instead of ``summary.json``
                (:mod:`~dunet_deploy.runtime.shards`).
            **changes: :class:`InferenceOptions` fields for this call
                (``save_prob``, ``workers``, ``prefetch``, ``prob_dtype``,
                ``recursive``, ``tta``, ``min_lesion_mm3``, ``resample``, ...).

        Returns:
            The summary document (also written to ``out_dir/summary.json``, or
            the shard's summary).

        Raises:
            DunetError: for invalid options, an input folder or pattern that
                gives no scan, a model that cannot be loaded, an ``out_dir``
                that cannot be created, or ``dicom_seg`` with an input that is
                not a DICOM series (before any work); per-input problems (a
                missing or truncated file) are in the summary instead.
        """
        run, sources = self.run_options(options, **changes)
        if self._closed:
            self.open()  # says so before any work
        t_start = time.perf_counter()
        files = self.plan_files(inputs, out_dir, run, shard=shard, reader=reader, writer=writer)
        reader, register, items = files.reader, files.register, files.plan.todo
        created = missing_folders(out_dir)  # removed again if the run fails before writing
        out = OutputOptions(prepare_output_dir(out_dir), run, files.writer)
        results: list[CaseResult] = []
        journal = files.plan.journal(out.out_dir)

        def finished(result: CaseResult) -> None:
            journal.record(result)
            if on_result is not None:
                on_result(result)

        def predictor() -> Predictor:
            if on_start is not None:
                on_start(self.runner, len(items))
            return self.predictor(run.tta)

        interrupted: KeyboardInterrupt | None = None
        try:
            if run.workers:
                run_in_workers(predictor, self.spec, items, out, on_result=finished,
                               results=results, meter=self._traffic, reader=reader,
                               register=register)
            else:
                with Prefetcher(items, self.spec, depth=run.prefetch, resample=run.resample,
                                reader=reader, register=register) as prefetcher:
                    run_cases(predictor(), self.spec, prefetcher, out, on_result=finished,
                              results=results, meter=self._traffic)
        except KeyboardInterrupt as exc:
            interrupted = exc
        except BaseException:
            remove_empty_folders(created)  # e.g. a model that cannot be loaded
            raise
        summary = files.write_summary(
            self._runner, results, out.out_dir, load_s=self.load_s,
            wall_s=time.perf_counter() - t_start, inference=_settings(run, sources),
            interrupted=interrupted)
        journal.close()
        if interrupted is not None:
            raise interrupted
        return summary


def segment_files(
    model: str | os.PathLike[str],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: InferenceOptions | None = None,
    *,
    runner_opts: dict[str, Any] | None = None,
    runner_factory: Callable[[Path, ArtifactInfo], Runner] | None = None,
    on_start: Callable[[Runner, int], None] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Segment files with a model and write ``summary.json`` (what ``dunet-infer`` does).

    A :class:`Segmenter` opened for this call only (the model loads while the
    first volume is read); the arguments are those of :class:`Segmenter` and
    :meth:`Segmenter.predict_files`.

    Returns:
        The summary document (also written to ``out_dir/summary.json``).
    """
    with Segmenter(model, _options(options, changes), runner_opts=runner_opts,
                   runner_factory=runner_factory, lazy=True) as seg:
        return seg.predict_files(inputs, out_dir, on_start=on_start, on_result=on_result)


def _as_list(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
             ) -> list[str | os.PathLike[str]]:
    """One input (a ``str`` or path) as a list of one; a sequence as a list."""
    return [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def _options(options: InferenceOptions | None, changes: dict[str, Any]) -> InferenceOptions:
    """``options`` (default: all defaults) with keyword ``changes``, validated.

    Raises:
        DunetError: for an unknown name or an invalid value.
    """
    unknown = sorted(set(changes) - set(InferenceOptions.field_names()))
    if unknown:
        raise DunetError(f"unknown option(s) {', '.join(unknown)}; options are "
                         f"{', '.join(InferenceOptions.field_names())}")
    base = InferenceOptions() if options is None else options
    return base.replace(**changes) if changes else base


def _settings(options: InferenceOptions, sources: Sources) -> dict[str, Any]:
    """The ``inference`` record of a summary: TTA, post-processing, resampling and sources."""
    return {**_inference(options).to_dict(), "resample": options.resample,
            "bias_correct": options.bias_correct, "source": dict(sources)}


def _inference(options: InferenceOptions) -> InferenceDefaults:
    assert options.tta is not None and options.min_lesion_mm3 is not None
    return InferenceDefaults(tta=options.tta, min_lesion_mm3=options.min_lesion_mm3,
                             register=options.register or "auto")


def as_volume(image: ImageLike, affine: npt.ArrayLike | None = None) -> NiftiVolume:
    """Turn any accepted image input into a :class:`NiftiVolume` (float32 data).

    Raises:
        DunetError: for an unreadable file, a bytes path, a non-3D, non-numeric
            or non-finite array, a singular or non-finite ``affine``, or an
            ``affine`` given with an input that has its own.
    """
    if isinstance(image, (bytes, bytearray)) or (
            isinstance(image, os.PathLike) and isinstance(os.fspath(image), bytes)):
        raise DunetError(f"image {image!r}: a bytes path; give a str or pathlib.Path",
                         option="image")
    if isinstance(image, (str, os.PathLike)):
        if affine is not None:
            raise DunetError(f"{image}: affine= is only for array inputs (a file has its own)")
        return load_nifti(image)
    if isinstance(image, NiftiVolume):
        if affine is not None:
            raise DunetError("affine= is only for array inputs (a NiftiVolume has its own)")
        return image
    if hasattr(image, "get_fdata") and hasattr(image, "affine"):  # a nibabel image
        if affine is not None:
            raise DunetError("affine= is only for array inputs (a nibabel image has its own)")
        img: Any = image
        data = np.asarray(img.get_fdata(dtype=np.float32))
        while data.ndim > 3 and data.shape[-1] == 1:
            data = data[..., 0]
        return _checked(data, _affine(img.affine), img.header)
    try:
        data = np.asarray(image, dtype=np.float32)
    except (TypeError, ValueError):
        raise DunetError(f"image: expected a path, a nibabel image, a NiftiVolume or a 3D array "
                         f"of numbers, got {type(image).__name__}", option="image") from None
    return _checked(data, np.eye(4) if affine is None else _affine(affine), None)


def _affine(affine: npt.ArrayLike) -> np.ndarray:
    """A finite, invertible ``[4, 4]`` voxel-to-world matrix, else a one-line error."""
    try:
        aff = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError):
        raise DunetError("affine must be a finite 4x4 matrix of numbers", option="affine") from None
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise DunetError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}",
                         option="affine")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise DunetError("affine is singular (a zero voxel size or collinear axes): no "
                         "geometry to segment on", option="affine")
    return aff


def _checked(data: np.ndarray, affine: np.ndarray, header: Any) -> NiftiVolume:
    if data.ndim != 3 or min(data.shape) < 1:
        raise DunetError(f"expected a 3D volume, got an array of shape {data.shape}")
    if not np.isfinite(data).all():
        raise DunetError(f"{int(data.size - np.isfinite(data).sum())} voxel(s) are NaN or Inf")
    return NiftiVolume(data=data, affine=affine, header=header)
