"""Tests for dunet_deploy.data.geometry: orientation, spacing, grids, refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from nibabel.eulerangles import euler2mat
from scipy import ndimage

from dunet_deploy.data.geometry import (
    axcodes,
    describe_grid,
    measure_geometry,
    obliquity_deg,
    plan_model_space,
    reoriented_shape,
)
from dunet_deploy.data.layouts import Case
from dunet_deploy.data.nifti import load_nifti
from dunet_deploy.data.synth import synthesize_case
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

SHAPE = (48, 56, 40)
#: Voxel orders of the same scan: RAS, x flipped, a coronal-ish order and sagittal-first.
ORDERS = ("RAS", "LAS", "PIR", "SAL")


def _centred_affine(shape, zoom=1.0) -> np.ndarray:
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) * zoom / 2.0
    return aff


@pytest.fixture(scope="module")
def scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A real-looking RAS scan ``(image, mask, affine)``."""
    image, mask = synthesize_case(SHAPE, seed=3)
    return image, mask, _centred_affine(SHAPE)


def _spec(affine: np.ndarray, *, grid: bool = True) -> PreprocessSpec:
    geom = measure_geometry([(SHAPE, affine)])
    if not grid:
        geom["grid_affine"] = None
    return PreprocessSpec.for_geometry(SHAPE, **geom)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, codes: str = "RAS") -> Path:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(codes)))
    nib.save(img.as_reoriented(ornt), str(path))
    return path


def _resampled(data: np.ndarray, affine: np.ndarray, zoom: float, like=SHAPE):
    """The same scan on a ``zoom`` mm grid covering the same world box."""
    shape = tuple(int(n) for n in np.rint(np.asarray(like) / zoom))
    new_aff = np.diag([zoom, zoom, zoom, 1.0])
    new_aff[:3, 3] = affine[:3, 3] - 0.5 + zoom / 2.0  # first voxel corner stays put
    m = np.linalg.solve(affine, new_aff)
    out = ndimage.affine_transform(data.astype(np.float32), np.diag(m[:3, :3]), offset=m[:3, 3],
                                   output_shape=shape, order=1, mode="grid-constant")
    return out, new_aff


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)))


# --------------------------------------------------------------- orientation
@pytest.mark.parametrize("grid", [True, False], ids=["grid", "no-grid"])
@pytest.mark.parametrize("codes", ORDERS)
def test_every_voxel_order_gives_the_same_physical_array(scan, tmp_path, codes, grid) -> None:
    image, _, affine = scan
    spec = _spec(affine, grid=grid)
    vol = load_nifti(_save(tmp_path / f"{codes}.nii.gz", image, affine, codes))
    assert "".join(axcodes(vol.affine)) == codes
    space = plan_model_space(vol.shape, vol.affine, spec)
    on_model = space.to_model(vol.data)
    assert on_model.dtype == np.float32 and on_model.shape == SHAPE
    np.testing.assert_array_equal(on_model, image)  # exact: flips and transposes only
    back = space.to_input(on_model)
    assert back.dtype == np.float32 and back.shape == vol.shape
    np.testing.assert_array_equal(back, vol.data)
    info = space.describe()
    assert info["input_orientation"] == codes and info["model_orientation"] == "RAS"
    assert info["method"] == ("none" if codes == "RAS" else "reorient")
    assert info["reoriented"] is (codes != "RAS") and info["resampled"] is False
    assert info["spacing_before_mm"] == info["spacing_after_mm"] == [1.0, 1.0, 1.0]
    assert space.warnings == ()


def test_reoriented_mask_is_exact_and_shape_helper(scan) -> None:
    _, mask, affine = scan
    spec = _spec(affine)
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("P", "I", "R")))
    img = nib.Nifti1Image(mask, affine).as_reoriented(ornt)
    pir = np.asarray(img.dataobj)
    assert reoriented_shape(pir.shape, img.affine, ("R", "A", "S")) == SHAPE
    assert reoriented_shape(pir.shape, img.affine, None) == pir.shape
    space = plan_model_space(pir.shape, img.affine, spec)
    np.testing.assert_array_equal(space.mask_to_model(pir), mask)


# ------------------------------------------------------------------ spacing
@pytest.mark.parametrize("zoom", [1.25, 0.8])
def test_other_spacing_maps_onto_the_training_grid(scan, tmp_path, zoom) -> None:
    image, mask, affine = scan
    spec = _spec(affine)
    data, new_aff = _resampled(image, affine, zoom)
    mask_z, _ = _resampled(mask, affine, zoom)
    vol = load_nifti(_save(tmp_path / "z.nii.gz", data, new_aff, "LPS"))  # and another order
    assert vol.shape != SHAPE
    space = plan_model_space(vol.shape, vol.affine, spec)
    assert space.method == "linear" and space.model_shape == SHAPE
    on_model = space.to_model(vol.data)
    assert np.corrcoef(on_model.ravel(), image.ravel())[0, 1] > 0.97
    head = image > 0.2 * image.max()
    assert _dsc(on_model > 0.2 * image.max(), head) > 0.93
    lps_mask = nib.Nifti1Image((mask_z >= 0.5).astype(np.uint8), new_aff).as_reoriented(
        nio.ornt_transform(nio.io_orientation(new_aff), nio.axcodes2ornt(("L", "P", "S"))))
    assert _dsc(space.mask_to_model(np.asarray(lps_mask.dataobj)) > 0, mask > 0) >= 0.9
    # Probabilities go back onto the input's own grid by one linear interpolation.
    back = space.to_input(on_model)
    assert back.shape == vol.shape and back.dtype == np.float32
    assert np.corrcoef(back.ravel(), vol.data.ravel())[0, 1] > 0.97
    info = space.describe()
    assert info["resampled"] is True and info["method"] == "linear"
    assert info["spacing_before_mm"] == pytest.approx([zoom] * 3)
    assert info["spacing_after_mm"] == [1.0, 1.0, 1.0]
    assert info["grid"] == "48x56x40 at 1 mm, RAS" and info["overlap"] > 0.95


def test_spec_without_grid_resamples_to_training_spacing(scan) -> None:
    image, _, affine = scan
    spec = _spec(affine, grid=False)
    data, new_aff = _resampled(image, affine, 1.25)
    new_aff[:3, 3] += 40.0  # another position: without a grid only spacing matters
    space = plan_model_space(data.shape, new_aff, spec)
    assert space.method == "linear"
    assert space.model_zooms == pytest.approx((1.0, 1.0, 1.0))
    # The spec's in-plane size (its crop rule stays valid); slices at 1 mm.
    spec.check_volume_shape(space.model_shape)
    assert space.model_shape == SHAPE
    on_model = space.to_model(data)
    assert np.corrcoef(on_model.ravel(), image.ravel())[0, 1] > 0.97
    assert space.describe()["grid"] is None


def test_same_spacing_without_grid_keeps_todays_shape_rule(scan) -> None:
    _, _, affine = scan
    spec = _spec(affine, grid=False)
    with pytest.raises(DunetError) as exc:
        plan_model_space((30, 56, 40), _centred_affine((30, 56, 40)), spec)
    msg = str(exc.value)
    assert "\n" not in msg and "in-plane shape" in msg


def test_old_spec_passes_volumes_through_unchanged(scan) -> None:
    image, _, affine = scan
    spec = PreprocessSpec.for_geometry(SHAPE, version=1)
    flipped = affine @ np.diag([-1.0, 1, 1, 1])  # LAS, would be reoriented by a v2 spec
    space = plan_model_space(SHAPE, flipped, spec)
    assert space.method == "none" and space.describe()["model_orientation"] is None
    np.testing.assert_array_equal(space.to_model(image), image)
    np.testing.assert_array_equal(space.to_input(image), image)
    with pytest.raises(DunetError):  # today's shape check still applies
        plan_model_space((30, 30, 40), affine, spec)


# ----------------------------------------------------------------- refusals
def test_native_space_scan_is_refused_with_the_registration_message() -> None:
    mni = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
    geom = measure_geometry([((197, 233, 189), mni)])
    spec = PreprocessSpec.for_geometry((197, 233, 189), **geom)
    assert describe_grid(spec.volume_shape, mni) == "MNI 197x233x189 at 1 mm"
    native = np.diag([1.0, 1.0, 1.2, 1.0])  # scanner grid starting at the world origin
    with pytest.raises(DunetError) as exc:
        plan_model_space((256, 256, 150), native, spec)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "training grid MNI 197x233x189 at 1 mm" in msg and "registered to that space" in msg
    assert "256x256x150" in msg
    # Grids are named by where they lie, not only by their shape.
    assert "256x256x150 at 1x1x1.2 mm, RAS at x 0..256 y 0..256 z -1..179 mm covers" in msg
    assert "MNI 197x233x189 at 1 mm at x -98..98 y -134..98 z -72..116 mm" in msg
    assert "--register" in msg
    # The same space at another field of view is fine.
    crop = mni.copy()
    crop[:3, 3] += (20, 20, 20)
    assert plan_model_space((150, 180, 140), crop, spec).method == "linear"


def test_resample_never_refuses_another_grid_naming_both(scan) -> None:
    image, _, affine = scan
    for grid in (True, False):
        spec = _spec(affine, grid=grid)
        data, new_aff = _resampled(image, affine, 1.25)
        with pytest.raises(DunetError) as exc:
            plan_model_space(data.shape, new_aff, spec, resample="never")
        msg = str(exc.value)
        assert "\n" not in msg and "--resample never" in msg
        assert "38x45x32 at 1.25 mm" in msg
        assert ("48x56x40 at 1 mm" if grid else "training voxel size 1 mm") in msg
        # Pure reorientation is not resampling: allowed under "never".
        las = affine @ np.array([[-1.0, 0, 0, SHAPE[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0],
                                 [0, 0, 0, 1]])
        assert plan_model_space(SHAPE, las, spec, resample="never").method == "reorient"
    with pytest.raises(DunetError) as exc:
        plan_model_space(SHAPE, affine, spec, resample="sometimes")
    assert "--resample" in str(exc.value)


def test_oblique_input_is_reported_and_warned(scan) -> None:
    _, _, affine = scan
    rot = np.eye(4)
    rot[:3, :3] = euler2mat(np.radians(12.0), 0, 0)
    oblique = rot @ affine
    assert obliquity_deg(oblique) == pytest.approx(12.0, abs=1e-6)
    for grid, method in ((True, "linear"), (False, "none")):
        space = plan_model_space(SHAPE, oblique, _spec(affine, grid=grid))
        assert space.method == method
        info = space.describe()
        assert info["obliquity_deg"] == pytest.approx(12.0, abs=1e-3)
        assert len(space.warnings) == 1 and "oblique" in space.warnings[0]
        assert "12.0 degrees" in space.warnings[0] and info["warnings"] == list(space.warnings)
    quiet = plan_model_space(SHAPE, oblique, _spec(affine), oblique_warn_deg=15.0)
    assert quiet.warnings == ()
    assert plan_model_space(SHAPE, affine, _spec(affine)).describe()["obliquity_deg"] == 0.0


# --------------------------------------------------------- measure_geometry
def test_measure_geometry_of_cases_images_and_pairs(scan, tmp_path) -> None:
    image, mask, affine = scan
    paths = []
    for k, codes in enumerate(("LAS", "RAS", "LAS")):
        img = _save(tmp_path / f"i{k}.nii.gz", image, affine, codes)
        msk = _save(tmp_path / f"m{k}.nii.gz", mask, affine, codes)
        paths.append(Case(f"c{k}", img, (msk,)))
    geom = measure_geometry(paths)
    assert geom["orientation"] == ("L", "A", "S")  # the majority
    assert geom["voxel_size"] == (1.0, 1.0, 1.0)
    # One grid once reoriented: the LAS version of the RAS affine.
    las_aff = nib.load(str(paths[0].image)).affine
    np.testing.assert_allclose(geom["grid_affine"], las_aff)
    vol = load_nifti(paths[1].image)
    assert measure_geometry([vol])["orientation"] == ("R", "A", "S")
    other = measure_geometry([(SHAPE, affine), ((40, 56, 40), _centred_affine((40, 56, 40)))])
    assert other["grid_affine"] is None and other["orientation"] == ("R", "A", "S")
    mixed = measure_geometry([(SHAPE, affine), (SHAPE, _centred_affine(SHAPE, 1.2)),
                              (SHAPE, _centred_affine(SHAPE, 1.2))])
    assert mixed["voxel_size"] == pytest.approx((1.2, 1.2, 1.2))
    with pytest.raises(DunetError):
        measure_geometry([])


# ------------------------------------------- through the network (ONNX Runtime)
def _segment(path: Path, spec: PreprocessSpec, predict, **plan_kw) -> tuple[np.ndarray, object]:
    """NIfTI in, probabilities on the file's own grid out: the runtime's path."""
    from dunet_deploy.training.evaluate import predict_volume  # torch-free at import

    vol = load_nifti(path)
    space = plan_model_space(vol.shape, vol.affine, spec, **plan_kw)
    prob = predict_volume(space.to_model(vol.data), spec, predict)
    return space.to_input(prob), vol


def test_onnx_probabilities_agree_across_voxel_orders(scan, tmp_path) -> None:
    pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    image, _, affine = scan
    spec = PreprocessSpec.for_geometry(SHAPE, image_size=32,
                                       **measure_geometry([(SHAPE, affine)]))
    torch.manual_seed(0)
    export_onnx(create_model("dunet", base_filters=8).eval(), spec, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {"slabs": x})[0]

    ref, _ = _segment(_save(tmp_path / "RAS.nii.gz", image, affine), spec, predict)
    assert ref.max() > 0.0
    for codes in ORDERS[1:]:
        prob, vol = _segment(_save(tmp_path / f"{codes}.nii.gz", image, affine, codes), spec,
                             predict)
        assert prob.shape == vol.shape  # the input's own voxel order
        back = nib.Nifti1Image(prob, vol.affine).as_reoriented(
            nio.ornt_transform(nio.io_orientation(vol.affine), nio.axcodes2ornt(tuple("RAS"))))
        np.testing.assert_allclose(np.asarray(back.dataobj), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("zoom", [1.25, 0.8])
def test_masks_of_resampled_scans_agree_with_the_1mm_mask(tmp_path, zoom) -> None:
    shape = (80, 96, 64)  # structures of about real size (boundary voxels are few)
    image, _ = synthesize_case(shape, seed=3)
    affine = _centred_affine(shape)
    spec = PreprocessSpec.for_geometry(shape, image_size=80,
                                       **measure_geometry([(shape, affine)]))

    def tissue(x: np.ndarray) -> np.ndarray:  # a deterministic "network": brain tissue
        return (x[:, spec.label_index : spec.label_index + 1] > -0.5).astype(np.float32)

    ref, _ = _segment(_save(tmp_path / "ref.nii.gz", image, affine), spec, tissue)
    ref_mask = ref >= spec.threshold
    data, new_aff = _resampled(image, affine, zoom, shape)
    prob, vol = _segment(_save(tmp_path / "z.nii.gz", data, new_aff), spec, tissue)
    assert prob.shape == vol.shape != shape
    mask = (prob >= spec.threshold).astype(np.float32)
    # Once on one grid (the 1 mm one), the two masks agree.
    on_1mm = plan_model_space(vol.shape, vol.affine, spec).mask_to_model(mask) > 0
    assert ref_mask.sum() > 50_000
    assert _dsc(on_1mm, ref_mask) >= 0.9
