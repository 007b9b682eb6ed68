"""Registration to the model's template, on MNI152 anatomy with KNOWN motions (real SimpleITK)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("SimpleITK")
pytest.importorskip("nilearn")

from dunet_deploy.artifacts import ArtifactInfo
from dunet_deploy.data import anatomy as A
from dunet_deploy.data import registration as R
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import PreprocessSpec

# 2 mm cases: registration behaves as at 1 mm (the scan is averaged to 3 mm first).
SHAPE = (99, 117, 95)


@pytest.fixture(scope="module")
def template() -> R.Template:
    cases = [A.synthesize_anatomy_case(100 + i, shape=SHAPE) for i in range(3)]
    grid = (A.MNI152_SHAPE, A.mni152_grid())
    return R.build_template([(img, aff) for img, _m, aff in cases], PreprocessSpec(), grid=grid)


@pytest.fixture(scope="module")
def scans() -> list[tuple[np.ndarray, np.ndarray, A.NativeScan]]:
    rng = np.random.default_rng(3)
    out = []
    for i, layout in enumerate(("sagittal", "coronal")):
        # No non-linear warp: the known motion is then the exact answer (with a warp the
        # best affine differs from it by the warp's affine part; see benchmarks/registration.py).
        img, mask, aff = A.synthesize_anatomy_case(200 + i, shape=SHAPE, warp_mm=0.0)
        out.append((img, aff, A.native_scan(img, aff, A.random_motion(rng), mask=mask,
                                            layout=layout, voxel_mm=1.5)))
    return out


def _error_mm(template: R.Template, reg: R.Registration, motion: A.Motion) -> float:
    pts = template._points[0]  # the template's head, every ~4 mm
    est = reg.world_to_template @ (motion.matrix() @ pts)
    return float(np.linalg.norm((est - pts)[:3], axis=0).mean())


def test_native_scan_has_the_layout_and_dtype_asked(scans):
    for _img, _aff, scan in scans:
        want = A.NATIVE_LAYOUTS[scan.layout]
        import nibabel as nib

        assert tuple(nib.aff2axcodes(scan.affine)) == want
        assert scan.data.dtype == np.int16 and scan.mask.any()


def test_template_range_holds_its_training_volumes(template):
    lo, hi = template.similarity_range
    assert 0.5 < lo <= hi <= 1.0
    assert template.floor < lo


def test_registered_scans_raise_no_alarm_and_moved_ones_do(template, scans):
    for img, aff, scan in scans:
        assert R.similarity(img, aff, template) >= template.floor  # registered: no alarm
        assert R.similarity(scan.data, scan.affine, template) < template.floor  # moved
        auto = R.plan_registration(img, aff, template, mode="auto")
        assert not auto.done and auto.method == "none" and not auto.warnings


def test_known_motions_are_recovered_within_1_5_mm(template, scans):
    errors = []
    for _img, _aff, scan in scans:
        reg = R.plan_registration(scan.data, scan.affine, template, mode="auto", threads=1)
        assert reg.done and reg.method == "affine"
        assert reg.similarity_after >= template.floor > reg.similarity_before
        errors.append(_error_mm(template, reg, scan.motion))
    assert np.mean(errors) < 1.5, errors


def test_the_same_scan_registers_to_the_same_transform_every_run(template, scans):
    """A fixed sampling seed: a mask does not change between runs (SimpleITK seeds 0 from the
    clock, which moved the transform by ~0.1 mm and the mask by a few hundred voxels)."""
    _img, _aff, scan = scans[1]
    runs = [R.register(scan.data, scan.affine, template, threads=t).world_to_template
            for t in (1, 1, 2)]
    assert runs[0].tolist() == runs[1].tolist()
    np.testing.assert_allclose(runs[2], runs[0], atol=1e-6)  # thread count: sums' order only
    with pytest.raises(ValueError, match="seed 0"):
        R.register(scan.data, scan.affine, template, threads=1, seed=0)


def test_to_model_and_back_carry_the_lesion(template, scans):
    img, aff, scan = scans[0]
    reg = R.register(scan.data, scan.affine, template, grid=(img.shape, aff), threads=1)
    on_model = reg.to_model(scan.mask.astype(np.float32))
    assert on_model.shape == img.shape
    back = reg.to_input(on_model) >= 0.5
    m = scan.mask > 0
    dsc = 2 * (back & m).sum() / (back.sum() + m.sum())
    assert dsc > 0.7
    d = reg.describe()
    assert d["done"] and np.asarray(d["world_to_template"]).shape == (4, 4)
    assert pickle.loads(pickle.dumps(reg)).world_to_template.tolist() == \
        reg.world_to_template.tolist()


def test_never_warns_and_non_convergence_raises(template, scans):
    _img, _aff, scan = scans[1]
    never = R.plan_registration(scan.data, scan.affine, template, mode="never")
    assert not never.done and "does not look registered" in never.warnings[0]
    noise = np.random.default_rng(0).random((40, 40, 40)).astype(np.float32)
    with pytest.raises(DunetError, match="did not converge|registration failed") as info:
        R.register(noise, np.diag([4.0, 4.0, 4.0, 1.0]), template, threads=1)
    # The numbers travel on the error (to the summary), also through a worker's pickle.
    err = pickle.loads(pickle.dumps(info.value))
    assert isinstance(err, R.RegistrationError) and str(err) == str(info.value)
    assert err.record["done"] is False and err.record["method"] == "affine"
    assert err.record["floor"] == pytest.approx(template.floor, abs=1e-4)
    assert err.record["similarity_before"] is not None and err.record["seconds"] > 0
    with pytest.raises(DunetError, match="choose one of auto, always, never"):
        R.plan_registration(scan.data, scan.affine, template, mode="sometimes")


def test_template_round_trips_and_is_checked_at_load(template, tmp_path):
    path = template.save(tmp_path / R.TEMPLATE_FILE)
    back = R.Template.load(path)
    assert back.digest() == template.digest()
    assert back.similarity_range == template.similarity_range
    doc = R.Template.from_checkpoint(template.to_checkpoint())
    assert doc.digest() == template.digest()
    # Exported beside a model: load_template finds it and checks the digest.
    info = ArtifactInfo(spec=PreprocessSpec(), model_name="dunet", model_args={}, params=1,
                        template=template.describe())
    import json

    side = tmp_path / "model.plan.json"
    (tmp_path / "model.plan").write_bytes(b"\0" * 64)
    side.write_text(json.dumps(info.to_json_dict()))
    assert R.load_template(tmp_path / "model.plan").digest() == template.digest()
    other = R.Template(template.data * 2, template.affine, template.similarity_range)
    other.save(path)
    with pytest.raises(DunetError, match="digest"):
        R.load_template(tmp_path / "model.plan")
    side.write_text(json.dumps({**info.to_json_dict(), "template": None}))
    with pytest.raises(DunetError, match="--template FILE"):
        R.load_template(tmp_path / "model.plan")


def test_bias_correction_flattens_a_strong_field(scans):
    img, aff, _scan = scans[0]
    x = np.linspace(-1, 1, img.shape[0], dtype=np.float32)[:, None, None]
    biased = img * np.exp(np.float32(0.6) * x)
    fixed = R.bias_correct(biased, aff, threads=1)
    brain = img > np.percentile(img[img > 0], 60)

    def left_right(v: np.ndarray) -> float:
        half = img.shape[0] // 2
        return float(np.median(v[:half][brain[:half]]) / np.median(v[half:][brain[half:]]))

    truth = left_right(img)
    assert abs(np.log(left_right(fixed) / truth)) < 0.5 * abs(np.log(left_right(biased) / truth))
