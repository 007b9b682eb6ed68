"""Tests for dunet_deploy.postprocess: flip TTA in the network's space, small-lesion removal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dunet_deploy.data.preprocess import volume_to_slices
from dunet_deploy.data.synth import synthesize_case
from dunet_deploy.errors import DunetError
from dunet_deploy.postprocess import lr_slab_axis, remove_small_lesions, with_tta
from dunet_deploy.spec import PreprocessSpec


def _square_spec(axial_axis: int, transpose: bool, orientation) -> PreprocessSpec:
    shape = [32, 32, 32]
    shape[axial_axis] = 12  # the other two are 32x32: the crop is the whole slice
    return PreprocessSpec.for_geometry(tuple(shape), image_size=32, axial_axis=axial_axis,
                                       transpose_slice=transpose, orientation=orientation)


@pytest.mark.parametrize(
    ("axial_axis", "transpose", "orientation", "want"),
    [
        (2, True, ("R", "A", "S"), -1),  # the paper's rule: x -> columns
        (2, True, ("L", "A", "S"), -1),
        (2, True, None, -1),  # version-1 spec: x is L-R
        (2, False, ("R", "A", "S"), -2),
        (2, True, ("A", "R", "S"), -2),  # L-R stored second: rows after the transpose
        (0, True, ("S", "A", "L"), -2),
        (1, False, ("I", "P", "R"), -1),
    ],
)
def test_lr_slab_axis_mirrors_the_volume_left_right(axial_axis, transpose, orientation,
                                                    want) -> None:
    spec = _square_spec(axial_axis, transpose, orientation)
    assert lr_slab_axis(spec) == want
    image, _ = synthesize_case(spec.volume_shape, seed=1)
    codes = orientation or ("R", "A", "S")
    lr = next(i for i, c in enumerate(codes) if c in "LR")
    # Mirroring the scan left-right == mirroring every network slice along that axis.
    np.testing.assert_array_equal(volume_to_slices(np.flip(image, lr), spec),
                                  np.flip(volume_to_slices(image, spec), want))


def test_sagittal_slabs_cannot_be_flipped() -> None:
    spec = _square_spec(2, True, ("A", "S", "R"))  # L-R is the slice axis
    with pytest.raises(DunetError) as exc:
        with_tta(lambda x: x[:, :1], "flip", spec)
    assert "\n" not in str(exc.value) and "left-right" in str(exc.value)


def test_tta_none_is_the_predictor_and_bad_modes_are_refused() -> None:
    def predict(x: np.ndarray) -> np.ndarray:
        return x[:, :1]

    assert with_tta(predict, "none") is predict
    with pytest.raises(DunetError) as exc:
        with_tta(predict, "rotate")
    assert "--tta" in str(exc.value) and "flip" in str(exc.value)


def test_flip_tta_averages_the_mirrored_prediction() -> None:
    rng = np.random.default_rng(0)
    slabs = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)
    calls = []

    def ramp(x: np.ndarray) -> np.ndarray:  # not mirror-symmetric: weights grow with column
        calls.append(x.copy())
        w = np.linspace(0, 1, x.shape[-1], dtype=np.float32)
        return (1 / (1 + np.exp(-(x[:, 2:3] * w)))).astype(np.float32)

    out = with_tta(ramp, "flip")(slabs)
    assert out.shape == (3, 1, 16, 16) and out.dtype == np.float32
    assert len(calls) == 2 and np.array_equal(calls[1], slabs[..., ::-1])
    want = (ramp(slabs) + ramp(slabs[..., ::-1])[..., ::-1]) / 2
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-7)
    assert not np.allclose(out, ramp(slabs), atol=1e-3)  # it did change something


def test_flip_tta_through_onnx_runtime_is_exactly_mirror_equivariant(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    spec = PreprocessSpec.for_geometry((40, 48, 24), image_size=32,
                                       orientation=("L", "A", "S"), voxel_size=(1, 1, 1))
    torch.manual_seed(0)
    export_onnx(create_model("dunet", base_filters=8).eval(), spec, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"slabs": x})[0]

    image, _ = synthesize_case(spec.volume_shape, seed=2)
    slices = volume_to_slices(image, spec)
    slabs = np.stack([slices[z - 2 : z + 2] for z in (8, 12, 16)])
    tta = with_tta(predict, "flip", spec)
    out = tta(slabs)
    # The mean of a map and its mirrored twin is the same whichever way the scan is stored.
    np.testing.assert_array_equal(tta(np.ascontiguousarray(slabs[..., ::-1])), out[..., ::-1])
    plain = predict(slabs)
    assert np.abs(out - plain).max() > 1e-4  # the untrained network is not symmetric
    np.testing.assert_allclose(out, (plain + predict(np.ascontiguousarray(slabs[..., ::-1]))
                                     [..., ::-1]) / 2, atol=1e-6)


# ------------------------------------------------------------ small lesions
def _lesions() -> np.ndarray:
    m = np.zeros((10, 10, 10), np.uint8)
    m[1, 1, 1] = 1  # 1 voxel
    m[5:7, 5, 5] = 1  # 2 voxels, face-connected
    m[8, 8, 8] = m[9, 9, 8] = 1  # two 1-voxel lesions touching by an edge only
    m[2:5, 2:5, 6:9] = 1  # 27 voxels
    return m


def test_remove_small_lesions_by_volume_in_mm3() -> None:
    m = _lesions()
    out, removed = remove_small_lesions(m, (1.0, 1.0, 1.0), 2.0)
    assert removed == 3 and out.dtype == np.uint8
    assert out.sum() == 29 and out[5, 5, 5] == out[6, 5, 5] == 1 and out[1, 1, 1] == 0
    # 2 mm voxels: 1 voxel = 8 mm^3, 2 voxels = 16 mm^3.
    out, removed = remove_small_lesions(m, (2.0, 2.0, 2.0), 10.0)
    assert removed == 3 and out.sum() == 29
    out, removed = remove_small_lesions(m, (2.0, 2.0, 2.0), 8.0)  # ">= min" is kept
    assert removed == 0 and np.array_equal(out, m)
    out, removed = remove_small_lesions(m, (1.0, 1.0, 1.0), 30.0)
    assert removed == 5 and out.sum() == 0


def test_remove_small_lesions_off_and_empty() -> None:
    m = _lesions() * 3  # any nonzero is lesion
    for off in (0.0, -1.0):
        out, removed = remove_small_lesions(m, (1.0, 1.0, 1.0), off)
        assert removed == 0 and np.array_equal(out, m > 0)
    out, removed = remove_small_lesions(np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), 5.0)
    assert removed == 0 and out.sum() == 0
