"""dunet-infer and the Segmenter on scans in any voxel order, spacing and field of view."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from dunet_deploy.artifacts import ArtifactInfo
from dunet_deploy.data.preprocess import normalize_intensity
from dunet_deploy.data.synth import synthesize_case
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.segmenter import Segmenter
from dunet_deploy.spec import PreprocessSpec

pytest.importorskip("torch")

SHAPE = (48, 56, 40)


def _affine(shape, zoom=1.0) -> np.ndarray:
    aff = np.diag([zoom, zoom, zoom, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) * zoom / 2.0
    return aff


SPEC = PreprocessSpec.for_geometry(SHAPE, image_size=32, orientation=("R", "A", "S"),
                                   voxel_size=(1.0, 1.0, 1.0), grid_affine=_affine(SHAPE))


def _save(path: Path, data: np.ndarray, affine: np.ndarray, codes: str = "RAS") -> Path:
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    ornt = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(codes)))
    nib.save(img.as_reoriented(ornt), str(path))
    return path


def _to_ras(path: Path) -> np.ndarray:
    """A saved volume in RAS voxel order, by nibabel alone (independent of our code)."""
    img = nib.load(str(path))
    return np.asarray(nib.as_closest_canonical(img).dataobj, np.float32)


def _infer(model: Path, out: Path, *inputs: object, extra: tuple[str, ...] = ()):
    return subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--engine",
                           str(model), *map(str, inputs), "-o", str(out), "--backend",
                           "onnxruntime", "--save-prob", "-q", *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    root = tmp_path_factory.mktemp("geom")
    torch.manual_seed(1)
    export_onnx(create_model("dunet", base_filters=8).eval(), SPEC, root / "model.onnx")
    image, mask = synthesize_case(SHAPE, seed=3)
    return {"root": root, "model": root / "model.onnx", "image": image, "mask": mask}


def test_every_voxel_order_gives_the_same_physical_probabilities(setup, tmp_path):
    scans = [_save(tmp_path / f"{c}.nii.gz", setup["image"], _affine(SHAPE), c)
             for c in ("RAS", "LAS", "PIR", "SAL")]
    run = _infer(setup["model"], tmp_path / "out", *scans)
    assert run.returncode == 0, run.stderr
    probs = {p.name.split(".")[0]: _to_ras(tmp_path / "out" / f"{p.name[:3]}_prob.nii.gz")
             for p in scans}
    assert probs["RAS"].shape == SHAPE and probs["RAS"].max() > 0
    for codes in ("LAS", "PIR", "SAL"):
        np.testing.assert_allclose(probs[codes], probs["RAS"], atol=1e-5, err_msg=codes)
        out = nib.load(str(tmp_path / "out" / f"{codes}_mask.nii.gz"))
        src = nib.load(str(tmp_path / f"{codes}.nii.gz"))
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    geo = {Path(c["input"]).name: c["geometry"] for c in summary["cases"]}
    assert geo["RAS.nii.gz"]["method"] == "none" and geo["PIR.nii.gz"]["method"] == "reorient"
    assert geo["SAL.nii.gz"]["input_orientation"] == "SAL"
    assert summary["inference"]["resample"] == "auto"


def _phantom() -> np.ndarray:
    """A head (100) holding a bright 'lesion' ellipsoid (200): two flat levels, sharp edges."""
    x, y, z = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    c = (np.asarray(SHAPE) - 1) / 2
    head = ((x - c[0]) / 20) ** 2 + ((y - c[1]) / 24) ** 2 + ((z - c[2]) / 16) ** 2 <= 1
    lesion = ((x - c[0] - 4) / 12) ** 2 + ((y - c[1] + 3) / 11) ** 2 + ((z - c[2]) / 8) ** 2 <= 1
    return (100.0 * head + 100.0 * lesion).astype(np.float32)


#: Normalised intensity half-way between the phantom's head and lesion levels.
_MID = float(np.mean(np.unique(np.round(normalize_intensity(_phantom(), SPEC), 3))[-2:]))


class _Thresholder(Runner):
    """A 'model' that marks the phantom's bright ellipsoid (threshold half-way up its edge)."""

    backend = "numpy"

    def __init__(self, path: Path, info: ArtifactInfo) -> None:
        super().__init__(path, info)

    @property
    def input_shape(self):
        return (None, SPEC.in_channels, 32, 32)

    @property
    def precision(self) -> str:
        return "fp32"

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        x = slabs[:, SPEC.label_index : SPEC.label_index + 1]
        return 1.0 / (1.0 + np.exp(np.clip(-40.0 * (x - _MID), -50, 50)))


def _resampled(data: np.ndarray, zoom: float):
    shape = tuple(int(n) for n in np.rint(np.asarray(SHAPE) / zoom))
    src = _affine(SHAPE)
    new = np.diag([zoom, zoom, zoom, 1.0])
    new[:3, 3] = src[:3, 3] - 0.5 + zoom / 2.0  # same world box
    m = np.linalg.solve(src, new)
    out = ndimage.affine_transform(data.astype(np.float32), np.diag(m[:3, :3]), offset=m[:3, 3],
                                   output_shape=shape, order=1, mode="grid-constant")
    return out, new


@pytest.mark.parametrize("zoom", [1.25, 0.8])
def test_other_spacings_segment_like_the_1mm_scan(setup, tmp_path, zoom):
    phantom = _phantom()
    ref_path = _save(tmp_path / "ref.nii.gz", phantom, _affine(SHAPE))
    data, aff = _resampled(phantom, zoom)
    other = _save(tmp_path / "other.nii.gz", data, aff)
    with Segmenter(setup["model"], runner_factory=_Thresholder) as seg:
        ref = seg.predict(ref_path)
        pred = seg.predict(other)
    assert pred.shape == data.shape != SHAPE and ref.lesion_voxels > 1000
    assert abs(ref.lesion_voxels - int((phantom > 150).sum())) < 0.05 * (phantom > 150).sum()
    assert pred.geometry["resampled"] and pred.geometry["spacing_before_mm"] == [zoom] * 3
    # Bring the 1 mm mask onto the other grid (nearest, by world coordinates) and compare.
    m = np.linalg.solve(_affine(SHAPE), aff)
    ref_on_other = ndimage.affine_transform(ref.mask.astype(np.float32), np.diag(m[:3, :3]),
                                            offset=m[:3, 3], output_shape=data.shape, order=0)
    a, b = pred.mask > 0, ref_on_other > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.9  # 0.958 / 0.953 seen


def test_refusals_and_oblique_warning_through_the_cli(setup, tmp_path):
    image = setup["image"]
    coarse, coarse_aff = _resampled(image, 1.25)
    never = _save(tmp_path / "coarse.nii.gz", coarse, coarse_aff)
    native = np.zeros((96, 112, 80), np.float32)
    native[30:60, 30:70, 20:50] = 1.0
    far = _affine(native.shape)
    far[:3, 3] += (300.0, 0.0, 0.0)  # a scanner-space scan nowhere near the training grid
    native_path = _save(tmp_path / "native.nii.gz", native, far)
    run = _infer(setup["model"], tmp_path / "out", never, native_path,
                 extra=("--resample", "never"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert "--resample never" in lines[0] and "48x56x40 at 1 mm" in lines[0]
    assert "registered to that space" in lines[1]
    assert not list((tmp_path / "out").glob("*.nii.gz"))

    theta = math.radians(12.0)
    rot = np.eye(4)
    rot[:2, :2] = [[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]
    oblique = _save(tmp_path / "oblique.nii.gz", image, rot @ _affine(SHAPE))
    run = _infer(setup["model"], tmp_path / "obl", oblique)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("warning: ") and "oblique" in run.stderr
    case = json.loads((tmp_path / "obl" / "summary.json").read_text())["cases"][0]
    assert case["geometry"]["obliquity_deg"] == pytest.approx(12.0, abs=0.01)
    assert case["warnings"] and "oblique" in case["warnings"][0]
