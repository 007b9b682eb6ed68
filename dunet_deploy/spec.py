"""The preprocessing contract shared by training, export and the runtime.

A :class:`PreprocessSpec` fully describes how a T1 volume becomes the network's
input slabs and how the network's output becomes a volume again. It travels
with every artefact (slice cache, checkpoint, ONNX/TensorRT engine, server) as
JSON, and :meth:`PreprocessSpec.digest` lets any two of them check cheaply that
they agree.

Defaults reproduce the D-UNet paper (§3.3) and the authors' code on ATLAS R1.1:
volumes of shape ``(197, 233, 189)`` (x, y, z as nibabel returns them), axial
slices ``vol[:, :, z]`` transposed to 233×197 (rows = y, columns = x), the
square ``rows 40:220, cols 10:190`` cropped out and resized bilinearly to
192×192, and slices z−2, z−1, z, z+1 stacked into a 4-channel slab whose label
is slice z.

Version 2 adds the scan geometry of the training data (``orientation``,
``voxel_size``, ``grid_affine``, see :mod:`dunet_deploy.data.geometry`);
version-1 specs still load, with those fields ``None`` ("unknown": volumes are
passed to the network in their stored voxel order and spacing, as before), and
serialise exactly as before, so their digests do not change.

:class:`InferenceDefaults` (test-time augmentation, small-lesion removal) is
the post-processing a model is shipped with; it travels beside the spec.

This module imports only the standard library and numpy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from dunet_deploy.choices import REGISTER_MODES, TTA_MODES
from dunet_deploy.errors import DunetError

SPEC_VERSION = 2

#: ATLAS R1.1 volume shape (x, y, z) as nibabel returns it.
ATLAS_SHAPE: tuple[int, int, int] = (197, 233, 189)
#: The paper's crop box in transposed-slice coordinates (half-open).
ATLAS_CROP_ROWS: tuple[int, int] = (40, 220)
ATLAS_CROP_COLS: tuple[int, int] = (10, 190)

INTENSITY_MODES = ("robust_zscore", "dataset_minmax_zscore")
INTERPOLATIONS = ("bilinear",)
DATASET_STAT_FIELDS = ("dataset_min", "dataset_max", "dataset_mean", "dataset_std")
#: Fields added in spec version 2 (``None`` = unknown, the version-1 behaviour).
GEOMETRY_FIELDS = ("orientation", "voxel_size", "grid_affine")
#: The NIfTI axis codes, as pairs of opposite directions.
_AXIS_PAIRS = (("L", "R"), ("P", "A"), ("I", "S"))

# Field kinds used by the strict JSON decoder: (python type, tuple length or
# None for "any length", optional?).
_INT, _STR, _FLOAT, _BOOL = "int", "str", "float", "bool"


@dataclass(frozen=True)
class PreprocessSpec:
    """How a volume is turned into network input and back.

    Attributes:
        version: Schema version of this spec (``SPEC_VERSION``).
        model_name: Name of the network the spec is meant for.
        volume_shape: Expected input volume shape ``(X, Y, Z)`` as nibabel
            returns it. Only the in-plane part must match; the number of
            slices along ``axial_axis`` may differ.
        axial_axis: Array axis that indexes axial slices.
        transpose_slice: Transpose each axial slice so that rows follow the
            second in-plane array axis (y) and columns the first (x).
        crop_rows: Half-open row range of the crop box, in oriented-slice
            coordinates.
        crop_cols: Half-open column range of the crop box.
        image_size: Side ``S`` of the square network input; a multiple of 16
            (four 2×2 poolings).
        interpolation: Resize method; only ``"bilinear"`` (half-pixel
            centres, no antialiasing) exists.
        intensity: ``"robust_zscore"`` (per volume) or
            ``"dataset_minmax_zscore"`` (the paper; needs the dataset_* fields).
        clip_percentiles: Percentiles of the nonzero voxels that
            ``robust_zscore`` clips to.
        dataset_min: Dataset-wide minimum voxel value (dataset_minmax_zscore).
        dataset_max: Dataset-wide maximum voxel value.
        dataset_mean: Mean of the min–max scaled voxels over the dataset.
        dataset_std: Standard deviation of the min–max scaled voxels.
        slab_offsets: Slice offsets stacked as channels; the label is the slice
            at offset 0. Slices beyond the volume are zeros.
        threshold: Probabilities ``>= threshold`` are lesion.
        orientation: Axis codes of the training volumes' voxel axes
            (``nibabel.aff2axcodes``, e.g. ``("R", "A", "S")``); every input is
            reoriented to it. ``None``: unknown (version-1 spec).
        voxel_size: Training voxel size in mm along those axes; ``None``:
            unknown.
        grid_affine: The 16 numbers (row-major 4×4) of the voxel-to-world
            affine shared by all training volumes (with ``volume_shape`` it is
            the training grid, e.g. MNI 197×233×189 at 1 mm); ``None`` when the
            training volumes do not share one grid.
    """

    version: int = SPEC_VERSION
    model_name: str = "dunet"
    volume_shape: tuple[int, int, int] = ATLAS_SHAPE
    axial_axis: int = 2
    transpose_slice: bool = True
    crop_rows: tuple[int, int] = ATLAS_CROP_ROWS
    crop_cols: tuple[int, int] = ATLAS_CROP_COLS
    image_size: int = 192
    interpolation: str = "bilinear"
    intensity: str = "robust_zscore"
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    dataset_min: float | None = None
    dataset_max: float | None = None
    dataset_mean: float | None = None
    dataset_std: float | None = None
    slab_offsets: tuple[int, ...] = (-2, -1, 0, 1)
    threshold: float = 0.5
    orientation: tuple[str, str, str] | None = None
    voxel_size: tuple[float, float, float] | None = None
    grid_affine: tuple[float, ...] | None = None

    # field name -> (kind, tuple length | None | -1 for "not a tuple", optional)
    _SCHEMA: ClassVar[dict[str, tuple[str, int | None, bool]]] = {
        "version": (_INT, -1, False),
        "model_name": (_STR, -1, False),
        "volume_shape": (_INT, 3, False),
        "axial_axis": (_INT, -1, False),
        "transpose_slice": (_BOOL, -1, False),
        "crop_rows": (_INT, 2, False),
        "crop_cols": (_INT, 2, False),
        "image_size": (_INT, -1, False),
        "interpolation": (_STR, -1, False),
        "intensity": (_STR, -1, False),
        "clip_percentiles": (_FLOAT, 2, False),
        "dataset_min": (_FLOAT, -1, True),
        "dataset_max": (_FLOAT, -1, True),
        "dataset_mean": (_FLOAT, -1, True),
        "dataset_std": (_FLOAT, -1, True),
        "slab_offsets": (_INT, None, False),
        "threshold": (_FLOAT, -1, False),
        "orientation": (_STR, 3, True),
        "voxel_size": (_FLOAT, 3, True),
        "grid_affine": (_FLOAT, 16, True),
    }

    def __post_init__(self) -> None:
        # Normalise friendly inputs (lists, numpy scalars) into the canonical
        # immutable types so that equality, hashing and JSON are stable.
        for name, (kind, length, _optional) in self._SCHEMA.items():
            value = getattr(self, name)
            object.__setattr__(self, name, _coerce(name, value, kind, length))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check the spec's internal consistency.

        Raises:
            DunetError: naming the first offending field.
        """
        if self.version < 1 or self.version > SPEC_VERSION:
            raise DunetError(
                f"spec field 'version': {self.version} is not supported "
                f"(this dunet_deploy reads version {SPEC_VERSION})"
            )
        if not self.model_name:
            raise DunetError("spec field 'model_name': must not be empty")
        if any(n < 1 for n in self.volume_shape):
            raise DunetError(f"spec field 'volume_shape': {self.volume_shape} has a size < 1")
        if self.axial_axis not in (0, 1, 2):
            raise DunetError(f"spec field 'axial_axis': {self.axial_axis} is not 0, 1 or 2")
        rows, cols = self.inplane_shape
        for name, (lo, hi), limit in (
            ("crop_rows", self.crop_rows, rows),
            ("crop_cols", self.crop_cols, cols),
        ):
            if not 0 <= lo < hi <= limit:
                raise DunetError(
                    f"spec field '{name}': ({lo}, {hi}) is not a non-empty range inside "
                    f"0..{limit} (in-plane shape {self.inplane_shape})"
                )
        if self.image_size <= 0 or self.image_size % 16:
            raise DunetError(
                f"spec field 'image_size': {self.image_size} must be a positive multiple of 16"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise DunetError(
                f"spec field 'interpolation': {self.interpolation!r} is not one of {INTERPOLATIONS}"
            )
        if self.intensity not in INTENSITY_MODES:
            raise DunetError(
                f"spec field 'intensity': {self.intensity!r} is not one of {INTENSITY_MODES}"
            )
        lo_p, hi_p = self.clip_percentiles
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise DunetError(
                f"spec field 'clip_percentiles': {self.clip_percentiles} must satisfy "
                "0 <= low < high <= 100"
            )
        for name in DATASET_STAT_FIELDS:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise DunetError(f"spec field '{name}': {value} is not finite")
        if self.intensity == "dataset_minmax_zscore":
            for name in DATASET_STAT_FIELDS:
                if getattr(self, name) is None:
                    raise DunetError(
                        f"spec field '{name}': required when intensity is 'dataset_minmax_zscore' "
                        "(see fit_dataset_intensity)"
                    )
            assert self.dataset_min is not None and self.dataset_max is not None
            assert self.dataset_std is not None
            if not self.dataset_max > self.dataset_min:
                raise DunetError(
                    f"spec field 'dataset_max': {self.dataset_max} must be greater than "
                    f"dataset_min {self.dataset_min}"
                )
            if not self.dataset_std > 0:
                raise DunetError(f"spec field 'dataset_std': {self.dataset_std} must be > 0")
        if not self.slab_offsets:
            raise DunetError("spec field 'slab_offsets': must not be empty")
        if len(set(self.slab_offsets)) != len(self.slab_offsets):
            raise DunetError(f"spec field 'slab_offsets': {self.slab_offsets} has duplicates")
        if 0 not in self.slab_offsets:
            raise DunetError(
                f"spec field 'slab_offsets': {self.slab_offsets} must contain 0 (the label slice)"
            )
        if not 0.0 < self.threshold < 1.0:
            raise DunetError(f"spec field 'threshold': {self.threshold} must be in (0, 1)")
        self._validate_geometry()

    def _validate_geometry(self) -> None:
        """Check the version-2 geometry fields (orientation, voxel size, grid)."""
        if self.version < 2:
            for name in GEOMETRY_FIELDS:
                if getattr(self, name) is not None:
                    raise DunetError(f"spec field '{name}': needs spec version 2, got version "
                                     f"{self.version}")
            return
        if self.orientation is not None:
            axes = [next((k for k, pair in enumerate(_AXIS_PAIRS) if code in pair), None)
                    for code in self.orientation]
            if None in axes or sorted(axes) != [0, 1, 2]:  # type: ignore[type-var]
                raise DunetError(
                    f"spec field 'orientation': {self.orientation} is not one of L/R, A/P and "
                    "S/I per axis"
                )
        if self.voxel_size is not None and not all(
            math.isfinite(v) and v > 0 for v in self.voxel_size
        ):
            raise DunetError(f"spec field 'voxel_size': {self.voxel_size} must be finite and > 0")
        if self.grid_affine is not None:
            self._validate_grid()

    def _validate_grid(self) -> None:
        assert self.grid_affine is not None
        if self.orientation is None or self.voxel_size is None:
            raise DunetError("spec field 'grid_affine': needs 'orientation' and 'voxel_size'")
        aff = np.asarray(self.grid_affine, dtype=np.float64).reshape(4, 4)
        if not np.isfinite(aff).all() or not np.allclose(aff[3], (0, 0, 0, 1)):
            raise DunetError(f"spec field 'grid_affine': {self.grid_affine} is not a finite "
                             "affine with last row 0 0 0 1")
        zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
        if abs(np.linalg.det(aff[:3, :3])) < 1e-9 or not np.allclose(
            zooms, self.voxel_size, rtol=1e-3
        ):
            raise DunetError(
                f"spec field 'grid_affine': voxel sizes {tuple(round(float(z), 4) for z in zooms)}"
                f" differ from voxel_size {self.voxel_size}"
            )

    def check_volume_shape(self, shape: Sequence[int]) -> None:
        """Check that this spec can process a volume of ``shape``.

        The in-plane shape must equal the spec's; any number (>= 1) of slices
        along ``axial_axis`` is accepted.

        Args:
            shape: The volume's array shape.

        Raises:
            DunetError: saying why the volume cannot be processed.
        """
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3:
            raise DunetError(f"volume has shape {shape}; a 3D volume is required")
        expected = _drop(self.volume_shape, self.axial_axis)
        got = _drop(shape, self.axial_axis)
        if got != expected:
            raise DunetError(
                f"volume has shape {shape}; the preprocessing spec expects in-plane shape "
                f"{expected} (axes other than axial axis {self.axial_axis}, spec volume_shape "
                f"{self.volume_shape})"
            )
        if shape[self.axial_axis] < 1:
            raise DunetError(f"volume has shape {shape}: no slices along axis {self.axial_axis}")

    # -------------------------------------------------------------- properties
    @property
    def in_channels(self) -> int:
        """Number of slices per slab, i.e. network input channels."""
        return len(self.slab_offsets)

    @property
    def label_index(self) -> int:
        """Channel index of the labelled slice (offset 0) within a slab."""
        return self.slab_offsets.index(0)

    @property
    def crop_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the crop box."""
        return (self.crop_rows[1] - self.crop_rows[0], self.crop_cols[1] - self.crop_cols[0])

    @property
    def inplane_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of an oriented axial slice ((233, 197) for ATLAS)."""
        a, b = _drop(self.volume_shape, self.axial_axis)
        return (b, a) if self.transpose_slice else (a, b)

    @property
    def grid_matrix(self) -> np.ndarray | None:
        """float64 ``[4, 4]`` training-grid affine, or ``None`` (no shared grid)."""
        if self.grid_affine is None:
            return None
        return np.asarray(self.grid_affine, dtype=np.float64).reshape(4, 4)

    @property
    def num_slices(self) -> int:
        """Expected number of axial slices (``volume_shape[axial_axis]``)."""
        return self.volume_shape[self.axial_axis]

    # ------------------------------------------------------------ construction
    @classmethod
    def for_geometry(
        cls,
        volume_shape: Sequence[int],
        *,
        image_size: int | None = None,
        crop: Literal["auto"] | tuple[tuple[int, int], tuple[int, int]] | None = None,
        model_name: str = "dunet",
        slab_offsets: Sequence[int] = (-2, -1, 0, 1),
        orientation: Sequence[str] | None = None,
        voxel_size: Sequence[float] | None = None,
        grid_affine: npt.ArrayLike | None = None,
        **kw: Any,
    ) -> PreprocessSpec:
        """Build a spec for an arbitrary volume geometry.

        Args:
            volume_shape: ``(X, Y, Z)`` of the volumes.
            image_size: Network input side. ``None`` picks 192 for the paper's
                geometry and otherwise the crop side rounded up to a multiple
                of 16 (64 for the 64×80×48 synthetic data).
            crop: ``((r0, r1), (c0, c1))`` in oriented-slice coordinates;
                ``"auto"`` for the centred square of side ``min(rows, cols)``;
                ``None`` means the paper's box for ``(197, 233, 189)`` volumes
                and ``"auto"`` otherwise.
            model_name: Stored in the spec.
            slab_offsets: Slice offsets forming a slab.
            orientation: Axis codes of the training data (``None``: unknown).
            voxel_size: Training voxel size in mm (``None``: unknown).
            grid_affine: The training volumes' shared affine, ``[4, 4]`` or 16
                numbers row-major (``None``: no shared grid). These three are
                what :func:`dunet_deploy.data.geometry.measure_geometry` returns.
            **kw: Any other :class:`PreprocessSpec` field (``axial_axis``,
                ``transpose_slice``, ``intensity``, ``threshold``, ...).

        Returns:
            A validated spec.

        Raises:
            DunetError: on an unusable geometry or field.
        """
        shape = _coerce("volume_shape", volume_shape, _INT, 3)
        probe = cls(
            volume_shape=shape,
            axial_axis=kw.get("axial_axis", 2),
            transpose_slice=kw.get("transpose_slice", True),
            crop_rows=(0, 1),
            crop_cols=(0, 1),
        )
        rows, cols = probe.inplane_shape
        paper = shape == ATLAS_SHAPE and probe.inplane_shape == (233, 197)
        if crop is None:
            crop = (ATLAS_CROP_ROWS, ATLAS_CROP_COLS) if paper else "auto"
        if isinstance(crop, str):
            if crop != "auto":
                raise DunetError(f"crop: {crop!r} is not 'auto' or ((r0, r1), (c0, c1))")
            side = min(rows, cols)
            r0, c0 = (rows - side) // 2, (cols - side) // 2
            crop_rows, crop_cols = (r0, r0 + side), (c0, c0 + side)
        else:
            try:
                (r0, r1), (c0, c1) = crop
            except (TypeError, ValueError):
                raise DunetError(f"crop: {crop!r} is not 'auto' or ((r0, r1), (c0, c1))") from None
            crop_rows, crop_cols = (r0, r1), (c0, c1)
        if image_size is None:
            if paper and (crop_rows, crop_cols) == (ATLAS_CROP_ROWS, ATLAS_CROP_COLS):
                image_size = 192
            else:
                side = max(crop_rows[1] - crop_rows[0], crop_cols[1] - crop_cols[0])
                image_size = max(16, -(-side // 16) * 16)
        return cls(
            volume_shape=shape,
            crop_rows=crop_rows,
            crop_cols=crop_cols,
            image_size=image_size,
            model_name=model_name,
            slab_offsets=tuple(slab_offsets),
            orientation=_coerce("orientation", orientation, _STR, 3),
            voxel_size=_coerce("voxel_size", voxel_size, _FLOAT, 3),
            grid_affine=None if grid_affine is None else tuple(
                float(v) for v in np.asarray(grid_affine, dtype=np.float64).reshape(-1)),
            **kw,
        )

    def replace(self, **changes: Any) -> PreprocessSpec:
        """Return a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------- JSON
    @classmethod
    def _fields(cls, version: int) -> list[str]:
        """The JSON fields of a spec of ``version`` (version 1 lacks the geometry)."""
        return [n for n in cls._SCHEMA if version >= 2 or n not in GEOMETRY_FIELDS]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict (tuples become lists).

        A version-1 spec gives exactly the version-1 fields (same JSON, same
        digest as before version 2 existed).
        """
        out: dict[str, Any] = {}
        for name in self._fields(self.version):
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessSpec:
        """Strictly decode a dict produced by :meth:`to_dict`.

        Raises:
            DunetError: on unknown or missing keys, a newer spec version, or a
                value of the wrong type; the message names the field.
        """
        if not isinstance(d, Mapping):
            raise DunetError(f"spec: expected a JSON object, got {type(d).__name__}")
        version = d.get("version")
        if isinstance(version, int) and not isinstance(version, bool) and version > SPEC_VERSION:
            raise DunetError(
                f"spec field 'version': {version} is newer than this dunet_deploy supports "
                f"({SPEC_VERSION}); upgrade dunet_deploy"
            )
        fields = cls._fields(version if isinstance(version, int) else SPEC_VERSION)
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise DunetError(f"spec field {unknown[0]!r}: unknown field")
        missing = [name for name in fields if name not in d]
        if missing:
            raise DunetError(f"spec field {missing[0]!r}: missing")
        kwargs = {}
        for name in fields:
            kind, length, optional = cls._SCHEMA[name]
            kwargs[name] = _decode(name, d[name], kind, length, optional)
        return cls(**kwargs)

    def to_json(self, indent: int | None = None) -> str:
        """Serialise to JSON (keys in field order)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, s: str | bytes) -> PreprocessSpec:
        """Parse JSON produced by :meth:`to_json`.

        Raises:
            DunetError: on invalid JSON or an invalid spec.
        """
        try:
            d = json.loads(s)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DunetError(f"spec: invalid JSON ({exc})") from None
        return cls.from_dict(d)

    def digest(self) -> str:
        """Short stable fingerprint: sha256 of the canonical JSON, 16 hex chars."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class InferenceDefaults:
    """Post-processing a model is shipped with (stored in its artefacts).

    Attributes:
        tta: Test-time augmentation, one of :data:`~dunet_deploy.choices.TTA_MODES`
            (``"flip"``: mean of the prediction and of the left-right mirrored one).
        min_lesion_mm3: Connected lesions smaller than this (mm³) are removed
            from the mask; 0 keeps every lesion.
        register: Registration to the model's template, one of
            :data:`~dunet_deploy.choices.REGISTER_MODES` (``auto``: scans that
            do not look registered are registered).
    """

    tta: str = "none"
    min_lesion_mm3: float = 0.0
    register: str = "auto"

    #: Prefix of the keys in :meth:`to_parameters` (ONNX metadata / Triton parameters).
    PARAMETER_PREFIX: ClassVar[str] = "dunet.inference."

    def __post_init__(self) -> None:
        if not isinstance(self.tta, str) or self.tta not in TTA_MODES:
            raise DunetError(f"inference default 'tta' (--tta): {self.tta!r} is not one of "
                             f"{', '.join(TTA_MODES)}")
        value = self.min_lesion_mm3
        if not _scalar_ok(value, _FLOAT) or not math.isfinite(float(value)) or value < 0:
            raise DunetError(f"inference default 'min_lesion_mm3' (--min-lesion-mm3): {value!r} "
                             "must be a finite number >= 0")
        object.__setattr__(self, "min_lesion_mm3", float(value))
        if not isinstance(self.register, str) or self.register not in REGISTER_MODES:
            raise DunetError(f"inference default 'register' (--register): {self.register!r} "
                             f"is not one of {', '.join(REGISTER_MODES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict."""
        return {"tta": self.tta, "min_lesion_mm3": self.min_lesion_mm3,
                "register": self.register}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InferenceDefaults:
        """Decode :meth:`to_dict` output; a missing key takes its default.

        Raises:
            DunetError: on a non-object, an unknown key or an invalid value.
        """
        if not isinstance(d, Mapping):
            raise DunetError(f"inference defaults: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"tta", "min_lesion_mm3", "register"})
        if unknown:
            raise DunetError(f"inference default {unknown[0]!r}: unknown field")
        return cls(**dict(d))

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str | bytes) -> InferenceDefaults:
        """Parse :meth:`to_json` output.

        Raises:
            DunetError: on invalid JSON or invalid defaults.
        """
        try:
            d = json.loads(s)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DunetError(f"inference defaults: invalid JSON ({exc})") from None
        return cls.from_dict(d)

    def to_parameters(self) -> dict[str, str]:
        """String key/value pairs (Triton ``parameters``, ONNX ``metadata_props``).

        Returns:
            ``{"dunet.inference.tta": "flip", "dunet.inference.min_lesion_mm3": "10.0"}``.
        """
        return {f"{self.PARAMETER_PREFIX}tta": self.tta,
                f"{self.PARAMETER_PREFIX}min_lesion_mm3": repr(self.min_lesion_mm3),
                f"{self.PARAMETER_PREFIX}register": self.register}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> InferenceDefaults:
        """Inverse of :meth:`to_parameters`; absent keys mean the defaults.

        Raises:
            DunetError: when a value is not valid.
        """
        key = f"{cls.PARAMETER_PREFIX}min_lesion_mm3"
        kwargs: dict[str, Any] = {}
        if f"{cls.PARAMETER_PREFIX}tta" in params:
            kwargs["tta"] = params[f"{cls.PARAMETER_PREFIX}tta"]
        if f"{cls.PARAMETER_PREFIX}register" in params:
            kwargs["register"] = params[f"{cls.PARAMETER_PREFIX}register"]
        if key in params:
            try:
                kwargs["min_lesion_mm3"] = float(params[key])
            except ValueError:
                raise DunetError(f"{key}: {params[key]!r} is not a number") from None
        return cls(**kwargs)


def fit_dataset_intensity(volumes_iter: Iterable[np.ndarray]) -> dict[str, float]:
    """Compute the paper's dataset-wide intensity statistics in one pass.

    The paper min–max scales all voxels of the dataset to [0, 1] and then
    z-scores them with the dataset mean and standard deviation (background
    included). Since min–max scaling is affine, the scaled mean/std follow from
    the raw ones: ``mean' = (mean - min) / (max - min)``, ``std' = std / (max -
    min)``. Per-volume moments are merged with Chan's parallel algorithm in
    float64 to stay accurate over hundreds of millions of voxels.

    Args:
        volumes_iter: Iterable of volumes (any shape, any real dtype).

    Returns:
        ``{"dataset_min", "dataset_max", "dataset_mean", "dataset_std"}``,
        ready to pass as keyword arguments to :class:`PreprocessSpec`.

    Raises:
        DunetError: when there are no voxels, non-finite voxels, or all voxels
            are equal.
    """
    n_total = 0
    mean_total = 0.0
    m2_total = 0.0
    vmin, vmax = math.inf, -math.inf
    for vol in volumes_iter:
        arr = np.asarray(vol)
        if arr.size == 0:
            continue
        a64 = arr.astype(np.float64, copy=False)
        if not np.isfinite(a64).all():
            raise DunetError("fit_dataset_intensity: a volume contains NaN or Inf voxels")
        n = int(a64.size)
        mean = float(a64.mean())
        m2 = float(((a64 - mean) ** 2).sum())
        vmin, vmax = min(vmin, float(a64.min())), max(vmax, float(a64.max()))
        delta = mean - mean_total
        n_new = n_total + n
        mean_total += delta * n / n_new
        m2_total += m2 + delta * delta * n_total * n / n_new
        n_total = n_new
    if n_total == 0:
        raise DunetError("fit_dataset_intensity: no voxels given")
    if not vmax > vmin:
        raise DunetError(f"fit_dataset_intensity: all voxels equal {vmin}; cannot scale")
    scale = vmax - vmin
    std = math.sqrt(m2_total / n_total)
    return {
        "dataset_min": vmin,
        "dataset_max": vmax,
        "dataset_mean": (mean_total - vmin) / scale,
        "dataset_std": std / scale,
    }


# ---------------------------------------------------------------- internals
def _drop(shape: Sequence[int], axis: int) -> tuple[int, int]:
    rest = [int(n) for i, n in enumerate(shape) if i != axis]
    return (rest[0], rest[1])


def _scalar_ok(value: Any, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False  # bool is an int subclass; never accept it as a number
    if kind == _INT:
        return isinstance(value, (int, np.integer))
    if kind == _FLOAT:
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, str)


def _convert(value: Any, kind: str) -> Any:
    if kind == _INT:
        return int(value)
    if kind == _FLOAT:
        return float(value)
    if kind == _BOOL:
        return bool(value)
    return str(value)


def _type_error(name: str, value: Any, kind: str, length: int | None) -> DunetError:
    if length == -1:
        want = {"int": "an integer", "str": "a string", "float": "a number", "bool": "a boolean"}[
            kind
        ]
    elif length is None:
        want = f"a list of {kind}s"
    else:
        want = f"a list of {length} {kind}s"
    return DunetError(f"spec field '{name}': expected {want}, got {value!r}")


def _coerce(name: str, value: Any, kind: str, length: int | None) -> Any:
    """Lenient constructor-side conversion (accepts lists, numpy scalars)."""
    if value is None and (name in DATASET_STAT_FIELDS or name in GEOMETRY_FIELDS):
        return None
    if length == -1:
        if not _scalar_ok(value, kind):
            raise _type_error(name, value, kind, length)
        return _convert(value, kind)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise _type_error(name, value, kind, length)
    items = list(value)
    if (length is not None and len(items) != length) or not all(
        _scalar_ok(v, kind) for v in items
    ):
        raise _type_error(name, value, kind, length)
    return tuple(_convert(v, kind) for v in items)


def _decode(name: str, value: Any, kind: str, length: int | None, optional: bool) -> Any:
    """Strict JSON-side check: only JSON types, lists for tuples."""
    if value is None and optional:
        return None
    if length != -1 and not isinstance(value, list):
        raise _type_error(name, value, kind, length)
    return _coerce(name, value, kind, length)
