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
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dunet_deploy.artifacts import ArtifactInfo, read_artifact_info, write_json
from dunet_deploy.choices import PROB_DTYPES, RESAMPLE_MODES
from dunet_deploy.data.nifti import NiftiVolume, load_nifti
from dunet_deploy.errors import DunetError
from dunet_deploy.postprocess import with_tta
from dunet_deploy.runtime.base import Closeable, Runner, open_runner
from dunet_deploy.runtime.core import Prediction, Predictor, geometry_of, segment, to_network
from dunet_deploy.runtime.pipeline import (
    SUMMARY_NAME,
    CaseResult,
    OutputOptions,
    Prefetcher,
    expand_inputs,
    prepare_output_dir,
    run_cases,
    summary_document,
)
from dunet_deploy.runtime.workers import run_in_workers
from dunet_deploy.spec import InferenceDefaults, PreprocessSpec

__all__ = ["Prediction", "Segmenter", "as_volume", "resolve_inference"]

ImageLike = str | os.PathLike[str] | NiftiVolume | np.ndarray | Any


class Segmenter(Closeable):
    """An exported D-UNet (ONNX or TensorRT engine) ready to segment volumes.

    Args:
        model: ``.onnx`` or ``.plan`` / ``.engine`` (with its ``.json`` sidecar).
        backend: ``auto``, ``onnxruntime``, ``openvino`` or ``tensorrt``.
        precision: ``auto`` or one the backend can run for this model.
        device: ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (ONNX Runtime providers).
        threads: Backend CPU threads (``None``: the backend's choice).
        batch_size: Slabs per model call, >= 1 (capped at an engine's maximum).
        runner_opts: Extra keyword arguments for the backend's runner.
        runner_factory: Builds the runner from the model path and its metadata
            instead of a local backend (e.g. a Triton client); ``backend``,
            ``precision``, ``device`` and ``threads`` are then not used.
        tta: ``"none"`` or ``"flip"`` (left-right mirror, averaged); ``None``
            takes the model's own default (stored at export).
        min_lesion_mm3: Remove connected lesions smaller than this (mm³);
            ``None`` takes the model's default (0: keep all).
        resample: ``"auto"`` (inputs off the training grid are resampled onto
            it) or ``"never"`` (they are refused).
        lazy: Load the model on first use instead of on entering ``with``.

    Raises:
        DunetError: when the model file is missing or is not one of ours.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        backend: str = "auto",
        precision: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        batch_size: int = 16,
        runner_opts: dict[str, Any] | None = None,
        runner_factory: Callable[[Path, ArtifactInfo], Runner] | None = None,
        tta: str | None = None,
        min_lesion_mm3: float | None = None,
        resample: str = "auto",
        lazy: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DunetError(f"batch size must be >= 1, got {batch_size}")
        if resample not in RESAMPLE_MODES:
            raise DunetError(f"resample {resample!r}: choose one of {', '.join(RESAMPLE_MODES)}")
        self.model_path = Path(model)
        self.info: ArtifactInfo = read_artifact_info(self.model_path)
        self.inference, self._inference_source = resolve_inference(
            self.info.inference, tta=tta, min_lesion_mm3=min_lesion_mm3)
        self.resample = resample
        self.batch_size = int(batch_size)
        self.threads = threads
        self._open_args: dict[str, Any] = {"backend": backend, "precision": precision,
                                           "device": device, "threads": threads,
                                           **(runner_opts or {})}
        self._factory = runner_factory
        self._lazy = lazy
        self._runner: Runner | None = None
        self.load_s = 0.0

    # ---------------------------------------------------------- lifecycle
    @property
    def spec(self) -> PreprocessSpec:
        """The model's preprocessing spec (read from its metadata)."""
        return self.info.spec

    @property
    def runner(self) -> Runner:
        """The loaded backend runner (loads the model on first access)."""
        return self.open()._runner  # type: ignore[return-value]

    def open(self) -> Segmenter:
        """Load the model (once); later calls return at once."""
        if self._runner is None:
            t0 = time.perf_counter()
            if self._factory is not None:
                self._runner = self._factory(self.model_path, self.info)
            else:
                args = dict(self._open_args)
                backend = args.pop("backend")
                self._runner = open_runner(self.model_path, backend, info=self.info, **args)
            self.load_s = time.perf_counter() - t0
        return self

    def close(self) -> None:
        """Release the backend (a later call loads the model again)."""
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
        return {**self.inference.to_dict(), "resample": self.resample,
                "source": dict(self._inference_source)}

    def _traffic(self) -> tuple[int, int] | None:
        """Bytes sent and received so far by a remote runner (a Triton client), else ``None``."""
        traffic = getattr(self._runner, "traffic", None)
        return None if traffic is None else (int(traffic[0]), int(traffic[1]))

    def predictor(self) -> Predictor:
        """The runner, wrapped for test-time augmentation when asked for."""
        return with_tta(self.runner.infer, self.inference.tta, self.spec)

    # ---------------------------------------------------------- prediction
    def predict(self, image: ImageLike, *, affine: npt.ArrayLike | None = None) -> Prediction:
        """Segment one volume.

        Args:
            image: A NIfTI path, a nibabel image, a :class:`NiftiVolume`, or a
                3D array (voxel values; then ``affine`` gives its geometry).
            affine: ``[4, 4]`` voxel-to-world matrix of an array input
                (default: identity, 1 mm voxels); not allowed with other inputs.

        Returns:
            A :class:`Prediction` on the input's own grid.

        Raises:
            DunetError: for a file that cannot be read or a volume the model's
                spec cannot take.
        """
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        vol = as_volume(image, affine)
        times["read"] = time.perf_counter() - t0
        net = to_network(vol.data, self.spec, affine=vol.affine, resample=self.resample,
                         times=times)
        return segment(net, geometry_of(vol), self.spec, self.predictor(),
                       batch_size=self.batch_size,
                       min_lesion_mm3=self.inference.min_lesion_mm3, times=times)

    def predict_files(
        self,
        inputs: Sequence[str | os.PathLike[str]],
        out_dir: str | os.PathLike[str],
        *,
        save_prob: bool = False,
        prefetch: int = 1,
        workers: int = 0,
        on_start: Callable[[Runner, int], None] | None = None,
        on_result: Callable[[CaseResult], None] | None = None,
        prob_dtype: str = "float32",
    ) -> dict[str, Any]:
        """Segment NIfTI files into ``out_dir`` and write ``summary.json``.

        Writes ``<name>_mask.nii.gz`` (and ``<name>_prob.nii.gz`` with
        ``save_prob``) per input. Reading and preprocessing run ahead of the
        model (on a background thread, or in ``workers`` processes that also
        post-process and write); when the model is not loaded yet it is loaded
        while the first volume is read. A bad input fails only its own case
        (reported in the summary and to ``on_result``). On Ctrl-C or SIGTERM
        the cases already complete are kept, ``summary.json`` lists them (with
        ``"interrupted"``) and the interrupt is re-raised; no partial file is left.

        Args:
            inputs: Files, directories or glob patterns.
            out_dir: Output folder (created if missing).
            save_prob: Also write float32 probability volumes.
            prefetch: Prepared volumes queued ahead of the model, >= 1.
            workers: Worker processes (0: everything in this process).
            on_start: Called once the model is loaded, with the runner and the
                number of inputs.
            on_result: Called with each finished :class:`CaseResult`, in order.
            prob_dtype: ``float32`` or ``uint16`` probability maps (see
                :meth:`Prediction.save`).

        Returns:
            The summary document (also written to ``out_dir/summary.json``).

        Raises:
            DunetError: when the model cannot be loaded or ``out_dir`` cannot
                be created; per-input problems are in the summary instead.
        """
        if workers < 0:
            raise DunetError(f"workers must be >= 0, got {workers}")
        t_start = time.perf_counter()
        out = prepare_output_dir(out_dir)
        items = expand_inputs(inputs)
        if prob_dtype not in PROB_DTYPES:
            raise DunetError(f"prob_dtype {prob_dtype!r}: choose one of {', '.join(PROB_DTYPES)}")
        opts = OutputOptions(out, save_prob=save_prob,
                             min_lesion_mm3=self.inference.min_lesion_mm3, prob_dtype=prob_dtype)
        results: list[CaseResult] = []

        def predictor() -> Predictor:
            if on_start is not None:
                on_start(self.runner, len(items))
            return self.predictor()

        interrupted: KeyboardInterrupt | None = None
        try:
            if workers:
                run_in_workers(predictor, self.spec, items, opts, workers=workers,
                               batch_size=self.batch_size, prefetch=prefetch,
                               resample=self.resample, on_result=on_result, results=results,
                               meter=self._traffic)
            else:
                with Prefetcher(items, self.spec, depth=prefetch,
                                resample=self.resample) as prefetcher:
                    run_cases(predictor(), self.spec, prefetcher, opts,
                              batch_size=self.batch_size, on_result=on_result, results=results,
                              meter=self._traffic)
        except KeyboardInterrupt as exc:
            interrupted = exc
        summary = summary_document(
            self._runner, results, batch_size=self.batch_size, threads=self.threads,
            load_s=self.load_s, wall_s=time.perf_counter() - t_start,
            inference=self.inference_settings(), workers=workers,
            interrupted=None if interrupted is None else str(interrupted) or "SIGINT",
            total=len(items))
        write_json(out / SUMMARY_NAME, summary)
        if interrupted is not None:
            raise interrupted
        return summary


def resolve_inference(
    defaults: InferenceDefaults, *, tta: str | None = None, min_lesion_mm3: float | None = None
) -> tuple[InferenceDefaults, dict[str, str]]:
    """Apply explicit settings over a model's defaults.

    Returns:
        ``(settings, source)`` where ``source`` maps each setting to ``"model"``
        or ``"argument"``.

    Raises:
        DunetError: for an unknown TTA mode or a negative / non-finite size.
    """
    settings = InferenceDefaults(
        tta=defaults.tta if tta is None else tta,
        min_lesion_mm3=defaults.min_lesion_mm3 if min_lesion_mm3 is None else min_lesion_mm3,
    )
    source = {"tta": "model" if tta is None else "argument",
              "min_lesion_mm3": "model" if min_lesion_mm3 is None else "argument"}
    return settings, source


def as_volume(image: ImageLike, affine: npt.ArrayLike | None = None) -> NiftiVolume:
    """Turn any accepted image input into a :class:`NiftiVolume` (float32 data).

    Raises:
        DunetError: for an unreadable file, a non-3D or non-finite array, or an
            ``affine`` given with an input that has its own.
    """
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
        return _checked(data, np.asarray(img.affine, dtype=np.float64), img.header)
    data = np.asarray(image, dtype=np.float32)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise DunetError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    return _checked(data, aff, None)


def _checked(data: np.ndarray, affine: np.ndarray, header: Any) -> NiftiVolume:
    if data.ndim != 3 or min(data.shape) < 1:
        raise DunetError(f"expected a 3D volume, got an array of shape {data.shape}")
    if not np.isfinite(data).all():
        raise DunetError(f"{int(data.size - np.isfinite(data).sum())} voxel(s) are NaN or Inf")
    return NiftiVolume(data=data, affine=affine, header=header)
