"""The one inference core: a volume in, probabilities on its voxel grid out.

Shaped like MONAI's ``Inferer``: the network is any callable
``predict(float32 [N, C, S, S]) -> float32 [N, 1, S, S]`` — a runtime
:class:`~dunet_deploy.runtime.base.Runner`, a torch model wrapped by the
caller, a Triton client — so this module never imports torch or a backend::

    volume (+ affine) --to_network--> NetworkInput: plan onto the model's grid
           (exact reorientation, or one linear resampling; data.geometry), then
           slices [Z, S, S] and the slab positions worth running [K]
      --predict_grid(predict)--> [Z, 1, S, S]   (slabs not in indices = 0)
      --grid_to_volume--> probabilities on the model's grid
      --ModelSpace.to_input--> float32 probabilities on the input's own grid
      --segment: threshold, remove lesions < min_lesion_mm3--> Prediction

``dunet-infer``, the :class:`~dunet_deploy.Segmenter`, ``dunet-eval`` (with a
checkpoint or an engine), training validation, the bench's end-to-end run and
the Triton models all call these functions, so every path scores and segments
identically. All geometry is :mod:`dunet_deploy.data.preprocess`, the code
training uses. Slabs whose slices are all background inside the crop box are
not sent to the network; their probability is 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dunet_deploy.choices import PROB_DTYPES
from dunet_deploy.data.geometry import ModelSpace, plan_model_space
from dunet_deploy.data.nifti import NiftiVolume, output_descrip, save_nifti_like
from dunet_deploy.data.preprocess import (
    binarize,
    nonempty_slab_indices,
    probs_to_mask,
    probs_to_volume,
    slices_to_slabs,
    volume_to_slices,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.postprocess import remove_small_lesions
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "NetworkInput",
    "Prediction",
    "Predictor",
    "add_time",
    "finish_prediction",
    "geometry_of",
    "grid_to_volume",
    "predict_grid",
    "predict_volume",
    "segment",
    "to_network",
]

#: uint16 probability maps store ``round(p * PROB_STEPS)`` (``scl_slope = 1 / PROB_STEPS``).
PROB_STEPS = 65535

#: ``predict(slabs float32 [N, C, S, S]) -> probabilities float32 [N, 1, S, S]``.
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class NetworkInput:
    """One volume in the network's space, ready for :func:`predict_grid`.

    Attributes:
        shape: Shape of the volume on the model's grid (restored by
            :func:`grid_to_volume`).
        slices: float32 ``[Z, S, S]`` preprocessed slices; ``None`` when no slab
            is worth running (``indices`` empty), so a blank volume costs nothing.
        indices: int64 ``[K]`` slab positions to run, ascending.
        space: How the input maps onto the model's grid and back (``None``:
            the volume was given without an affine and is taken as it is).
    """

    shape: tuple[int, ...]
    slices: np.ndarray | None
    indices: np.ndarray
    space: ModelSpace | None = None

    def to_input(self, prob: np.ndarray) -> np.ndarray:
        """Model-grid probabilities -> the input's own grid (identity without a plan)."""
        # "none" is the identity too: skip its copy into C order (NIfTI is Fortran order).
        return prob if self.space is None or self.space.method == "none" else (
            self.space.to_input(prob))

    def release(self) -> None:
        """Drop the slices (the grid is all that is needed afterwards)."""
        self.slices = None


def add_time(times: dict[str, float] | None, key: str, seconds: float) -> None:
    """Add ``seconds`` to ``times[key]`` when ``times`` is given."""
    if times is not None:
        times[key] = times.get(key, 0.0) + seconds


def to_network(
    volume: npt.ArrayLike,
    spec: PreprocessSpec,
    *,
    affine: npt.ArrayLike | None = None,
    resample: str = "auto",
    times: dict[str, float] | None = None,
) -> NetworkInput:
    """Bring a raw volume onto the model's grid, then into slices and slab positions.

    Args:
        volume: Raw volume.
        spec: The model's preprocessing spec.
        affine: The volume's ``[4, 4]`` voxel-to-world matrix: the volume is
            reoriented (exactly) or resampled onto the training grid the spec
            records (:func:`~dunet_deploy.data.geometry.plan_model_space`).
            ``None`` takes the volume as already on the model's grid.
        resample: ``"auto"`` or ``"never"`` (refuse an input off the training grid).
        times: When given, ``"preprocess"`` seconds are added to it.

    Returns:
        A :class:`NetworkInput`.

    Raises:
        DunetError: when the spec cannot take the volume (shape, grid, space).
    """
    t0 = time.perf_counter()
    vol = np.asarray(volume)
    space = None
    if affine is not None:
        space = plan_model_space(vol.shape, affine, spec, resample=resample)
        if space.method != "none":
            vol = space.to_model(vol)
    spec.check_volume_shape(vol.shape)
    indices = nonempty_slab_indices(vol, spec)
    slices = volume_to_slices(vol, spec) if indices.size else None
    add_time(times, "preprocess", time.perf_counter() - t0)
    return NetworkInput(tuple(int(n) for n in vol.shape), slices, indices, space)


def predict_grid(
    net: NetworkInput,
    spec: PreprocessSpec,
    predict: Predictor,
    *,
    batch_size: int = 16,
    times: dict[str, float] | None = None,
) -> np.ndarray:
    """Run ``predict`` over the selected slabs in batches and stitch the grid.

    Args:
        net: From :func:`to_network`.
        spec: The model's preprocessing spec.
        predict: The network; a ``max_batch`` attribute (as runners have) caps
            the batch further.
        batch_size: Slabs per ``predict`` call, >= 1.
        times: When given, ``"preprocess"`` (slab stacking) and ``"infer"``
            seconds are added to it.

    Returns:
        float32 ``[Z, 1, S, S]``; slabs not in ``net.indices`` are 0.

    Raises:
        DunetError: when ``predict`` returns the wrong shape.
    """
    if batch_size < 1:
        raise DunetError(f"batch size must be >= 1, got {batch_size}")
    s = spec.image_size
    z = int(net.shape[spec.axial_axis])
    grid = np.zeros((z, 1, s, s), dtype=np.float32)
    if net.slices is None or net.indices.size == 0:
        return grid
    cap = getattr(predict, "max_batch", None)
    step = batch_size if cap is None else max(1, min(batch_size, int(cap)))
    t_stack = t_infer = 0.0
    for i in range(0, net.indices.size, step):
        idx = net.indices[i : i + step]
        t0 = time.perf_counter()
        slabs = slices_to_slabs(net.slices, spec, idx)
        t1 = time.perf_counter()
        out = np.asarray(predict(slabs), dtype=np.float32)
        if out.shape != (idx.size, 1, s, s):
            raise DunetError(
                f"the model returned shape {out.shape} for {idx.size} slabs; expected "
                f"{(idx.size, 1, s, s)}"
            )
        grid[idx] = out
        t_stack += t1 - t0
        t_infer += time.perf_counter() - t1
    add_time(times, "preprocess", t_stack)
    add_time(times, "infer", t_infer)
    return grid


def grid_to_volume(
    grid: np.ndarray,
    spec: PreprocessSpec,
    shape: tuple[int, ...],
    *,
    times: dict[str, float] | None = None,
) -> np.ndarray:
    """Map the ``[Z, 1, S, S]`` grid back onto the volume's voxel grid.

    Args:
        grid: float32 ``[Z, 1, S, S]`` from :func:`predict_grid`.
        spec: The model's preprocessing spec.
        shape: The volume's shape.
        times: When given, ``"postprocess"`` seconds are added to it.

    Returns:
        float32 probabilities of ``shape`` (0 outside the crop box).
    """
    t0 = time.perf_counter()
    out = probs_to_volume(grid, spec, shape)
    add_time(times, "postprocess", time.perf_counter() - t0)
    return out


def predict_volume(
    volume: npt.ArrayLike,
    spec: PreprocessSpec,
    predict: Predictor,
    *,
    affine: npt.ArrayLike | None = None,
    resample: str = "auto",
    batch_size: int = 16,
    times: dict[str, float] | None = None,
) -> np.ndarray:
    """Lesion probabilities of a raw volume on its own voxel grid.

    :func:`to_network`, :func:`predict_grid`, :func:`grid_to_volume` and the
    way back onto the input's grid in one call.

    Args:
        volume: Raw volume.
        spec: The model's preprocessing spec.
        predict: ``float32 [N, C, S, S] -> float32 [N, 1, S, S]``.
        affine: The volume's voxel-to-world matrix (see :func:`to_network`).
        resample: ``"auto"`` or ``"never"``.
        batch_size: Slabs per ``predict`` call.
        times: When given, per-stage seconds are added to it.

    Returns:
        float32 array of the volume's shape.
    """
    net = to_network(volume, spec, affine=affine, resample=resample, times=times)
    grid = predict_grid(net, spec, predict, batch_size=batch_size, times=times)
    net.release()
    prob = grid_to_volume(grid, spec, net.shape, times=times)
    t0 = time.perf_counter()
    out = net.to_input(prob)
    add_time(times, "postprocess", time.perf_counter() - t0)
    return out


# ------------------------------------------------------------- predictions
@dataclass
class Prediction:
    """A segmented volume on the input's own voxel grid.

    Attributes:
        mask: uint8 lesion mask (1 = lesion, ``prob >= spec.threshold``), the
            input's shape.
        prob: float32 lesion probabilities, the input's shape (``None`` when
            :func:`segment` was told ``keep_prob=False``).
        affine: float64 ``[4, 4]`` voxel-to-world matrix of the input.
        header: The input's NIfTI header (``None`` for an array input).
        zooms: Voxel sizes in mm.
        slabs_run: Slabs sent to the network.
        slabs_skipped: All-background slabs not sent (probability 0).
        times: Seconds per stage (``read``, ``preprocess``, ``infer``,
            ``postprocess``, ``write``).
        geometry: What was done to bring the input onto the model's grid
            (:meth:`~dunet_deploy.data.geometry.ModelSpace.describe`; ``None``
            for an input taken as it is).
        lesions_removed: Connected lesions removed for being smaller than
            ``min_lesion_mm3``.
        warnings: One-line warnings (e.g. an oblique input).
    """

    mask: np.ndarray
    prob: np.ndarray | None
    affine: np.ndarray
    header: Any
    zooms: tuple[float, ...]
    slabs_run: int
    slabs_skipped: int
    times: dict[str, float] = field(default_factory=dict)
    geometry: dict[str, Any] | None = None
    lesions_removed: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The input's (and the mask's) shape."""
        return tuple(self.mask.shape)

    @property
    def lesion_voxels(self) -> int:
        """Voxels in the mask."""
        return int(np.count_nonzero(self.mask))

    @property
    def lesion_volume_mm3(self) -> float:
        """``lesion_voxels`` × the voxel volume."""
        return float(self.lesion_voxels * float(np.prod(self.zooms)))

    def _reference(self) -> NiftiVolume:
        return geometry_of(NiftiVolume(data=self.mask, affine=self.affine, header=self.header))

    def save(
        self, mask: str | os.PathLike[str], prob: str | os.PathLike[str] | None = None,
        *, prob_dtype: str = "float32",
    ) -> list[Path]:
        """Write the mask (uint8) and optionally the probabilities as NIfTI.

        Each file has the input's shape, affine, qform/sform and voxel sizes
        and is written atomically (missing folders are created); when the
        second write fails the first file is removed too, so a case is never
        half saved. ``.nii.gz`` files are written at gzip level 1 (nibabel's
        default, the fastest). Their header description is ``dunet-deploy
        mask`` / ``dunet-deploy prob``, so a later run never takes them for scans.

        Args:
            mask: ``.nii`` / ``.nii.gz`` path of the mask.
            prob: Path of the probability map, or ``None``.
            prob_dtype: One of :data:`~dunet_deploy.choices.PROB_DTYPES`:
                ``float32``, or ``uint16`` (half the bytes: ``round(p * 65535)``
                with ``scl_slope = 1/65535``, read back within 7.7e-6; NIfTI
                has no float16 data type).

        Returns:
            The written paths.

        Raises:
            DunetError: naming the file that could not be written.
        """
        t0 = time.perf_counter()
        ref = self._reference()
        written: list[Path] = []
        for path in (mask, prob):
            if path is not None:
                _make_parent(Path(path))
        try:
            written.append(save_nifti_like(mask, self.mask, ref, dtype=np.uint8,
                                           descrip=output_descrip("mask")))
            if prob is not None:
                written.append(save_prob_map(prob, self.prob, ref, prob_dtype))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        add_time(self.times, "write", time.perf_counter() - t0)
        return written


def save_prob_map(path: str | os.PathLike[str], prob: np.ndarray | None, ref: NiftiVolume,
                  dtype: str = "float32") -> Path:
    """Write probabilities as float32, or as uint16 fractions of 65535 with ``scl_slope``.

    Raises:
        ValueError: when there are no probabilities (``keep_prob=False``: a bug
            of the caller).
        DunetError: for an unknown ``dtype``, or naming the file that could
            not be written.
    """
    if prob is None:
        raise ValueError("this prediction kept no probabilities (segment(keep_prob=False))")
    if dtype == "float32":
        return save_nifti_like(path, prob, ref, dtype=np.float32, descrip=output_descrip("prob"))
    if dtype != "uint16":
        raise DunetError(f"prob dtype {dtype!r}: choose one of {', '.join(PROB_DTYPES)}")
    if not np.isfinite(prob).all():
        raise DunetError(f"{path}: refusing to write NaN or Inf voxels")
    steps = np.rint(np.clip(prob, 0.0, 1.0) * np.float32(PROB_STEPS)).astype(np.uint16)
    return save_nifti_like(path, steps, ref, dtype=np.uint16, scale=1.0 / PROB_STEPS,
                           descrip=output_descrip("prob"))


def geometry_of(vol: NiftiVolume) -> NiftiVolume:
    """The volume's geometry only: ``data`` becomes a zero-cost broadcast of its shape."""
    geometry = np.broadcast_to(np.zeros((), np.float32), vol.shape)
    return NiftiVolume(data=geometry, affine=vol.affine, header=vol.header, path=vol.path)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DunetError(f"{path}: cannot create folder {path.parent} ({exc.strerror})") from None


def finish_prediction(
    grid: np.ndarray,
    net: NetworkInput,
    geometry: NiftiVolume,
    spec: PreprocessSpec,
    *,
    min_lesion_mm3: float = 0.0,
    times: dict[str, float] | None = None,
    keep_prob: bool = True,
) -> Prediction:
    """From the network's ``[Z, 1, S, S]`` grid to a thresholded :class:`Prediction`.

    The grid goes back onto the model's grid, then onto the input's own grid;
    the mask is ``prob >= spec.threshold`` without lesions under ``min_lesion_mm3``.
    Needs no network, so it can run in another process than :func:`predict_grid`.

    Args:
        grid: float32 ``[Z, 1, S, S]`` from :func:`predict_grid`.
        net: The :class:`NetworkInput` the grid was computed from (slices may
            be released).
        geometry: The input's affine and header (its ``data`` only gives the shape).
        spec: The model's preprocessing spec.
        min_lesion_mm3: Remove 3D face-connected lesions smaller than this
            (mm³ on the input's grid); 0 keeps all.
        times: Per-stage seconds so far; the :class:`Prediction` carries them on.
        keep_prob: ``False`` when no probability map is wanted: on an input
            that needs no resampling back, only the box where the mask can be
            1 is resized (the mask is bit-identical) and ``Prediction.prob``
            is ``None``.
    """
    stage = times if times is not None else {}
    space = net.space
    prob: np.ndarray | None = None
    t0 = time.perf_counter()
    if keep_prob or (space is not None and space.method != "none"):
        prob = net.to_input(grid_to_volume(grid, spec, net.shape))
        binary = binarize(prob, spec)
    else:
        binary = probs_to_mask(grid, spec, net.shape)
    zooms = tuple(float(v) for v in geometry.zooms)
    mask, removed = remove_small_lesions(binary, zooms, min_lesion_mm3)
    add_time(stage, "postprocess", time.perf_counter() - t0)
    z = int(net.shape[spec.axial_axis])
    return Prediction(
        mask=mask, prob=prob, affine=np.asarray(geometry.affine, dtype=np.float64),
        header=geometry.header, zooms=zooms, slabs_run=int(net.indices.size),
        slabs_skipped=z - int(net.indices.size), times=stage,
        geometry=None if space is None else space.describe(), lesions_removed=removed,
        warnings=() if space is None else tuple(space.warnings),
    )


def segment(
    net: NetworkInput,
    geometry: NiftiVolume,
    spec: PreprocessSpec,
    predict: Predictor,
    *,
    batch_size: int = 16,
    min_lesion_mm3: float = 0.0,
    times: dict[str, float] | None = None,
    keep_prob: bool = True,
) -> Prediction:
    """Run the network on a prepared volume and threshold on the input's grid.

    :func:`predict_grid` then :func:`finish_prediction` (whose arguments
    ``geometry``, ``min_lesion_mm3``, ``times`` and ``keep_prob`` these are).

    Args:
        net: From :func:`to_network` (its slices are released afterwards).
        predict: ``float32 [N, C, S, S] -> float32 [N, 1, S, S]`` (already
            wrapped for test-time augmentation when wanted).
        batch_size: Slabs per ``predict`` call.

    Returns:
        The :class:`Prediction`.
    """
    stage = times if times is not None else {}
    grid = predict_grid(net, spec, predict, batch_size=batch_size, times=stage)
    net.release()  # free the slices before allocating the output volume
    return finish_prediction(grid, net, geometry, spec, min_lesion_mm3=min_lesion_mm3,
                             times=stage, keep_prob=keep_prob)
