"""Tests for dunet_deploy.spec: defaults, validation, JSON, digest, geometry helpers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dunet_deploy.choices import TTA_MODES
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import (
    SPEC_VERSION,
    InferenceDefaults,
    PreprocessSpec,
    fit_dataset_intensity,
)


def assert_one_line(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    for needle in needles:
        assert needle in msg, msg


# ------------------------------------------------------------------ defaults
def test_defaults_reproduce_the_paper() -> None:
    spec = PreprocessSpec()
    assert spec.version == SPEC_VERSION == 2
    assert spec.orientation is None and spec.voxel_size is None and spec.grid_affine is None
    assert spec.volume_shape == (197, 233, 189)
    assert spec.inplane_shape == (233, 197)  # transposed axial slice: rows = y
    assert spec.crop_rows == (40, 220) and spec.crop_cols == (10, 190)
    assert spec.crop_shape == (180, 180)
    assert spec.image_size == 192
    assert spec.slab_offsets == (-2, -1, 0, 1)
    assert spec.in_channels == 4
    assert spec.label_index == 2
    assert spec.num_slices == 189
    assert spec.threshold == 0.5


def test_inplane_shape_follows_axis_and_transpose() -> None:
    spec = PreprocessSpec(volume_shape=(30, 40, 50), axial_axis=0, transpose_slice=False,
                          crop_rows=(0, 16), crop_cols=(0, 16), image_size=16)
    assert spec.inplane_shape == (40, 50)
    spec_t = spec.replace(transpose_slice=True)
    assert spec_t.inplane_shape == (50, 40)


# ---------------------------------------------------------------------- JSON
def test_json_round_trip_keeps_tuples_and_equality() -> None:
    spec = PreprocessSpec.for_geometry((64, 80, 48), slab_offsets=(-1, 0, 1), threshold=0.4)
    back = PreprocessSpec.from_json(spec.to_json())
    assert back == spec
    assert isinstance(back.crop_rows, tuple) and isinstance(back.slab_offsets, tuple)
    assert isinstance(back.clip_percentiles, tuple)
    assert isinstance(json.loads(spec.to_json())["crop_rows"], list)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_round_trip_with_dataset_stats() -> None:
    spec = PreprocessSpec(intensity="dataset_minmax_zscore", dataset_min=0.0, dataset_max=255.0,
                          dataset_mean=0.2, dataset_std=0.3)
    assert PreprocessSpec.from_json(spec.to_json(indent=2)) == spec


def test_digest_is_stable_and_sensitive() -> None:
    spec = PreprocessSpec()
    d = spec.digest()
    assert len(d) == 16 and int(d, 16) >= 0
    # Pinned: changing the serialisation silently would orphan every cache,
    # checkpoint and engine built before. Bump SPEC_VERSION instead.
    assert d == PreprocessSpec().digest() == PreprocessSpec.from_json(spec.to_json()).digest()
    assert d == "2b08d646ed775d78"
    # A version-1 spec keeps its JSON and digest (old caches and engines stay valid).
    assert PreprocessSpec(version=1).digest() == "3a0bab5591a54d25"
    assert d == _sha256_prefix(spec.to_dict())
    assert spec.replace(threshold=0.6).digest() != d
    assert spec.replace(model_name="unet").digest() != d


def _sha256_prefix(d: dict) -> str:
    import hashlib

    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.pop("threshold"), "threshold"),
        (lambda d: d.update(image_size="192"), "image_size"),
        (lambda d: d.update(image_size=192.0), "image_size"),
        (lambda d: d.update(image_size=True), "image_size"),
        (lambda d: d.update(transpose_slice=1), "transpose_slice"),
        (lambda d: d.update(crop_rows=[40, 220, 1]), "crop_rows"),
        (lambda d: d.update(crop_rows=(40, 220)), "crop_rows"),  # JSON has no tuples
        (lambda d: d.update(slab_offsets=[0, "1"]), "slab_offsets"),
        (lambda d: d.update(model_name=None), "model_name"),
        (lambda d: d.update(threshold="0.5"), "threshold"),
        (lambda d: d.update(dataset_min="x"), "dataset_min"),
    ],
)
def test_from_dict_rejects_bad_input_naming_the_field(mutate, field) -> None:
    d = PreprocessSpec().to_dict()
    mutate(d)
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.from_dict(d)
    assert_one_line(exc, f"'{field}'")


def test_from_dict_rejects_newer_version() -> None:
    d = PreprocessSpec().to_dict()
    d["version"] = SPEC_VERSION + 1
    d["new_field_of_the_future"] = 1  # the version message wins over "unknown field"
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.from_dict(d)
    assert_one_line(exc, "'version'", "newer")


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.from_json("{not json")
    assert_one_line(exc, "invalid JSON")
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.from_json("[1, 2]")
    assert_one_line(exc, "JSON object")


def test_int_where_float_expected_is_accepted() -> None:
    d = PreprocessSpec().to_dict()
    d["threshold"] = 0
    with pytest.raises(DunetError):  # accepted as a number, then rejected by range
        PreprocessSpec.from_dict(d)
    d["clip_percentiles"] = [1, 99]
    d["threshold"] = 0.5
    assert PreprocessSpec.from_dict(d).clip_percentiles == (1.0, 99.0)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"crop_rows": (40, 240)}, "crop_rows"),  # beyond 233 rows
        ({"crop_cols": (100, 100)}, "crop_cols"),  # empty
        ({"crop_cols": (-1, 10)}, "crop_cols"),
        ({"image_size": 100}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"slab_offsets": (-1, 1)}, "slab_offsets"),
        ({"slab_offsets": (0, 0)}, "slab_offsets"),
        ({"slab_offsets": ()}, "slab_offsets"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"intensity": "zscore"}, "intensity"),
        ({"interpolation": "nearest"}, "interpolation"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles"),
        ({"axial_axis": 3}, "axial_axis"),
        ({"volume_shape": (197, 233)}, "volume_shape"),
        ({"volume_shape": (197, 233, 0)}, "volume_shape"),
        ({"model_name": ""}, "model_name"),
        ({"version": 0}, "version"),
        ({"intensity": "dataset_minmax_zscore"}, "dataset_min"),
        (
            {"intensity": "dataset_minmax_zscore", "dataset_min": 1.0, "dataset_max": 1.0,
             "dataset_mean": 0.0, "dataset_std": 1.0},
            "dataset_max",
        ),
        (
            {"intensity": "dataset_minmax_zscore", "dataset_min": 0.0, "dataset_max": 1.0,
             "dataset_mean": 0.0, "dataset_std": 0.0},
            "dataset_std",
        ),
        ({"dataset_mean": float("nan")}, "dataset_mean"),
    ],
)
def test_invalid_specs_raise_naming_the_field(kwargs, field) -> None:
    with pytest.raises(DunetError) as exc:
        PreprocessSpec(**kwargs)
    assert_one_line(exc, f"'{field}'")


def test_constructor_coerces_lists_and_numpy_scalars() -> None:
    spec = PreprocessSpec(crop_rows=[40, 220], slab_offsets=np.array([-2, -1, 0, 1]),
                          image_size=np.int64(192), threshold=np.float32(0.5))
    assert spec == PreprocessSpec()
    assert hash(spec) == hash(PreprocessSpec())


def test_check_volume_shape() -> None:
    spec = PreprocessSpec()
    spec.check_volume_shape((197, 233, 189))
    spec.check_volume_shape((197, 233, 7))  # any number of slices
    for shape, needle in [((197, 233), "3D"), ((197, 233, 189, 2), "3D"),
                          ((233, 197, 189), "in-plane"), ((197, 233, 0), "no slices")]:
        with pytest.raises(DunetError) as exc:
            spec.check_volume_shape(shape)
        assert_one_line(exc, needle, str(tuple(shape)))


# ---------------------------------------------------------------- for_geometry
def test_for_geometry_paper_shape_uses_paper_box() -> None:
    assert PreprocessSpec.for_geometry((197, 233, 189)) == PreprocessSpec()


def test_for_geometry_auto_crop_is_centred_square() -> None:
    spec = PreprocessSpec.for_geometry((64, 80, 48))
    assert spec.inplane_shape == (80, 64)
    assert spec.crop_rows == (8, 72) and spec.crop_cols == (0, 64)
    assert spec.image_size == 64
    assert spec.volume_shape == (64, 80, 48)
    # Odd side -> image size rounded up to a multiple of 16.
    odd = PreprocessSpec.for_geometry((40, 48, 24))
    assert odd.crop_cols == (0, 40) and odd.crop_rows == (4, 44) and odd.image_size == 48
    # "auto" on the paper shape gives the centred square, not the paper box.
    auto = PreprocessSpec.for_geometry((197, 233, 189), crop="auto")
    assert auto.crop_rows == (18, 215) and auto.crop_cols == (0, 197)


def test_for_geometry_explicit_crop_and_kwargs() -> None:
    spec = PreprocessSpec.for_geometry(
        (64, 80, 48), crop=((10, 70), (2, 62)), image_size=32, model_name="m",
        slab_offsets=(0,), threshold=0.3, intensity="robust_zscore",
    )
    assert spec.crop_rows == (10, 70) and spec.crop_cols == (2, 62)
    assert spec.image_size == 32 and spec.model_name == "m" and spec.in_channels == 1
    assert spec.threshold == 0.3
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.for_geometry((64, 80, 48), crop=((10, 90), (0, 64)))
    assert_one_line(exc, "'crop_rows'")
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.for_geometry((64, 80, 48), crop="centre")  # type: ignore[arg-type]
    assert_one_line(exc, "crop")
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.for_geometry((64, 80))
    assert_one_line(exc, "'volume_shape'")


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(1, 300)),
    axis=st.integers(0, 2),
    transpose=st.booleans(),
    offsets=st.lists(st.integers(-5, 5), min_size=0, max_size=5, unique=True),
    threshold=st.floats(0.01, 0.99),
)
def test_for_geometry_round_trips_for_any_geometry(shape, axis, transpose, offsets,
                                                   threshold) -> None:
    spec = PreprocessSpec.for_geometry(shape, axial_axis=axis, transpose_slice=transpose,
                                       slab_offsets=sorted({0, *offsets}), threshold=threshold)
    rows, cols = spec.inplane_shape
    assert spec.crop_shape[0] == spec.crop_shape[1] == min(rows, cols)
    assert spec.image_size % 16 == 0 and spec.image_size >= spec.crop_shape[0]
    back = PreprocessSpec.from_json(spec.to_json())
    assert back == spec and back.digest() == spec.digest()


# ------------------------------------------------------- fit_dataset_intensity
def test_fit_dataset_intensity_matches_pooled_statistics() -> None:
    rng = np.random.default_rng(0)
    vols = [rng.gamma(2.0, 50.0, size=s).astype(np.float32) for s in [(5, 6, 7), (8, 3, 2), (9,)]]
    stats = fit_dataset_intensity(iter(vols))
    allv = np.concatenate([v.ravel().astype(np.float64) for v in vols])
    scaled = (allv - allv.min()) / (allv.max() - allv.min())
    assert stats["dataset_min"] == pytest.approx(allv.min())
    assert stats["dataset_max"] == pytest.approx(allv.max())
    assert stats["dataset_mean"] == pytest.approx(scaled.mean(), rel=1e-9)
    assert stats["dataset_std"] == pytest.approx(scaled.std(), rel=1e-9)
    spec = PreprocessSpec(intensity="dataset_minmax_zscore", **stats)
    assert spec.dataset_std == stats["dataset_std"]


def test_fit_dataset_intensity_errors() -> None:
    with pytest.raises(DunetError) as exc:
        fit_dataset_intensity([])
    assert_one_line(exc, "no voxels")
    with pytest.raises(DunetError) as exc:
        fit_dataset_intensity([np.ones((2, 2, 2))])
    assert_one_line(exc, "equal")
    with pytest.raises(DunetError) as exc:
        fit_dataset_intensity([np.array([1.0, np.nan])])
    assert_one_line(exc, "NaN")


# ------------------------------------------------------------ geometry (v2)
MNI = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])


def _geo_spec() -> PreprocessSpec:
    return PreprocessSpec.for_geometry((197, 233, 189), orientation=("R", "A", "S"),
                                       voxel_size=(1, 1, 1), grid_affine=MNI)


def test_geometry_fields_round_trip_strictly() -> None:
    spec = _geo_spec()
    assert spec.orientation == ("R", "A", "S") and spec.voxel_size == (1.0, 1.0, 1.0)
    assert len(spec.grid_affine or ()) == 16
    np.testing.assert_array_equal(spec.grid_matrix, MNI)
    d = json.loads(spec.to_json())
    assert d["orientation"] == ["R", "A", "S"] and d["version"] == 2
    back = PreprocessSpec.from_json(spec.to_json())
    assert back == spec and back.digest() == spec.digest()
    assert spec.digest() != spec.replace(grid_affine=None).digest()
    # Strict: a v2 spec must carry every field, a list where a tuple is expected.
    for name in ("orientation", "voxel_size", "grid_affine"):
        broken = dict(d)
        del broken[name]
        with pytest.raises(DunetError) as exc:
            PreprocessSpec.from_dict(broken)
        assert_one_line(exc, name, "missing")
    with pytest.raises(DunetError) as exc:
        PreprocessSpec.from_dict({**d, "orientation": "RAS"})
    assert_one_line(exc, "orientation")


def test_version_1_specs_still_load_as_unknown_geometry() -> None:
    old = PreprocessSpec(version=1).to_dict()
    assert "orientation" not in old and old["version"] == 1
    spec = PreprocessSpec.from_dict(old)
    assert spec.version == 1 and spec.orientation is None and spec.grid_matrix is None
    assert spec.to_dict() == old
    with pytest.raises(DunetError) as exc:  # v1 has no such field
        PreprocessSpec.from_dict({**old, "orientation": ["R", "A", "S"]})
    assert_one_line(exc, "orientation", "unknown")
    with pytest.raises(DunetError) as exc:
        PreprocessSpec(version=1, voxel_size=(1, 1, 1))
    assert_one_line(exc, "voxel_size", "version 2")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"orientation": ("R", "A", "X")}, "orientation"),
        ({"orientation": ("R", "L", "S")}, "orientation"),
        ({"orientation": ("R", "A")}, "orientation"),
        ({"voxel_size": (1.0, 0.0, 1.0)}, "voxel_size"),
        ({"voxel_size": (1.0, float("nan"), 1.0)}, "voxel_size"),
        ({"grid_affine": tuple(np.eye(4).ravel())}, "grid_affine"),  # no orientation/voxel
        ({"orientation": ("R", "A", "S"), "voxel_size": (2, 2, 2),
          "grid_affine": tuple(np.eye(4).ravel())}, "grid_affine"),  # 1 mm grid, 2 mm voxels
        ({"orientation": ("R", "A", "S"), "voxel_size": (1, 1, 1),
          "grid_affine": tuple(np.ones(16))}, "grid_affine"),  # last row not 0 0 0 1
    ],
)
def test_invalid_geometry_names_the_field(kwargs, field) -> None:
    with pytest.raises(DunetError) as exc:
        PreprocessSpec(**kwargs)
    assert_one_line(exc, field)


# ------------------------------------------------------- inference defaults
def test_inference_defaults_round_trip_and_parameters() -> None:
    assert TTA_MODES == ("none", "flip")
    default = InferenceDefaults()
    assert (default.tta, default.min_lesion_mm3) == ("none", 0.0)
    d = InferenceDefaults(tta="flip", min_lesion_mm3=10)
    assert d.min_lesion_mm3 == 10.0 and isinstance(d.min_lesion_mm3, float)
    assert InferenceDefaults.from_json(d.to_json()) == d
    assert InferenceDefaults.from_dict({}) == default
    params = d.to_parameters()
    assert params == {"dunet.inference.tta": "flip", "dunet.inference.min_lesion_mm3": "10.0",
                      "dunet.inference.register": "auto"}
    never = InferenceDefaults(register="never")
    assert InferenceDefaults.from_parameters(never.to_parameters()) == never
    assert InferenceDefaults.from_json(never.to_json()) == never
    assert all(isinstance(v, str) for v in params.values())
    assert InferenceDefaults.from_parameters(params) == d
    assert InferenceDefaults.from_parameters({"dunet.spec": "{}"}) == default


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: InferenceDefaults(tta="mirror"), "tta"),
        (lambda: InferenceDefaults(register="sometimes"), "register"),
        (lambda: InferenceDefaults(min_lesion_mm3=-1), "min_lesion_mm3"),
        (lambda: InferenceDefaults(min_lesion_mm3=float("inf")), "min_lesion_mm3"),
        (lambda: InferenceDefaults(min_lesion_mm3=True), "min_lesion_mm3"),
        (lambda: InferenceDefaults.from_dict({"tta": "flip", "extra": 1}), "extra"),
        (lambda: InferenceDefaults.from_dict([]), "inference defaults"),
        (lambda: InferenceDefaults.from_json("{"), "invalid JSON"),
        (lambda: InferenceDefaults.from_parameters({"dunet.inference.min_lesion_mm3": "x"}),
         "min_lesion_mm3"),
    ],
)
def test_inference_defaults_errors_are_one_line(make, needle) -> None:
    with pytest.raises(DunetError) as exc:
        make()
    assert_one_line(exc, needle)
