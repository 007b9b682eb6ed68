"""The inference core's cheaper outputs: mask-only segmentation, uint16 probability maps,
fast gzip, and no C-order copies on the way out (issue 14, item 3)."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_testutils import SHAPE, fake_engine_fn, tiny_spec, write_volume

from dunet_deploy.data.nifti import load_nifti
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.core import geometry_of, segment, to_network


def _segment(path: Path, keep_prob: bool, min_lesion_mm3: float = 0.0):
    spec = tiny_spec()
    vol = load_nifti(path)
    net = to_network(vol.data, spec, affine=vol.affine)
    return segment(net, geometry_of(vol), spec, fake_engine_fn, batch_size=5,
                   keep_prob=keep_prob, min_lesion_mm3=min_lesion_mm3)


@pytest.mark.parametrize("zooms", [(1.0, 1.0, 1.0), (1.25, 1.0, 1.0)])  # as is / resampled
def test_mask_only_segmentation_is_identical(tmp_path: Path, zooms: tuple[float, ...]) -> None:
    path = write_volume(tmp_path / "a.nii.gz", seed=1, zooms=zooms)
    full = _segment(path, keep_prob=True, min_lesion_mm3=3.0)
    lean = _segment(path, keep_prob=False, min_lesion_mm3=3.0)
    assert full.prob is not None and full.lesion_voxels > 0
    np.testing.assert_array_equal(lean.mask, full.mask)
    assert lean.lesions_removed == full.lesions_removed
    # Without resampling back, no probability volume is made at all.
    assert (lean.prob is None) == (full.geometry is None or full.geometry["method"] == "none")
    if lean.prob is None:
        with pytest.raises(ValueError, match="keep_prob"):
            lean.save(tmp_path / "m.nii.gz", tmp_path / "p.nii.gz")
        assert not list(tmp_path.glob("m*"))  # the mask written first is removed again


def test_uint16_probabilities_read_back_within_half_a_step(tmp_path: Path) -> None:
    pred = _segment(write_volume(tmp_path / "a.nii.gz", seed=2), keep_prob=True)
    assert pred.prob is not None
    mask_p, f32_p, u16_p = (tmp_path / n for n in ("m.nii.gz", "p32.nii.gz", "p16.nii.gz"))
    pred.save(mask_p, f32_p)
    pred.save(tmp_path / "m2.nii.gz", u16_p, prob_dtype="uint16")
    img = nib.load(str(u16_p))
    assert img.get_data_dtype() == np.uint16 and img.shape == SHAPE
    assert float(img.dataobj.slope) == pytest.approx(1 / 65535, rel=1e-6)
    back = img.get_fdata(dtype=np.float32)
    np.testing.assert_allclose(back, nib.load(str(f32_p)).get_fdata(), rtol=0, atol=8e-6)
    assert u16_p.stat().st_size < f32_p.stat().st_size
    np.testing.assert_array_equal(nib.load(str(tmp_path / "m2.nii.gz")).get_fdata(), pred.mask)
    with pytest.raises(DunetError, match="prob dtype 'float16'"):
        pred.save(tmp_path / "m3.nii.gz", tmp_path / "p3.nii.gz", prob_dtype="float16")
    assert not (tmp_path / "m3.nii.gz").exists() and not (tmp_path / "p3.nii.gz").exists()


def test_outputs_are_fortran_ordered_and_gzipped_fast(tmp_path: Path) -> None:
    pred = _segment(write_volume(tmp_path / "a.nii.gz", seed=3), keep_prob=True)
    assert pred.prob is not None and pred.prob.flags.f_contiguous  # NIfTI order: no transpose
    assert pred.mask.flags.f_contiguous
    out = tmp_path / "m.nii.gz"
    pred.save(out)
    header = out.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b" and header[8] == 4  # gzip XFL 4: fastest level
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), pred.mask)
    with gzip.open(out) as f:  # a whole, valid gzip stream
        assert len(f.read()) >= pred.mask.size


def test_segment_files_writes_uint16_probabilities(tmp_path: Path) -> None:
    from dunet_deploy.bench.pipeline_bench import StandInRunner, pipeline_spec, write_standin_onnx
    from dunet_deploy.runtime.segmenter import segment_files

    model = write_standin_onnx(tmp_path / "standin.onnx", pipeline_spec(SHAPE, 32))
    scan = write_volume(tmp_path / "scan.nii.gz", seed=4)
    out = tmp_path / "out"
    summary = segment_files(model, [scan], out, runner_factory=StandInRunner, save_prob=True,
                            prob_dtype="uint16")
    assert summary["ok"] == 1, summary["cases"]
    prob = nib.load(str(out / "scan_prob.nii.gz"))
    mask = np.asarray(nib.load(str(out / "scan_mask.nii.gz")).dataobj)
    assert prob.get_data_dtype() == np.uint16 and mask.any()
    # The mask is the thresholded probability map, read back through scl_slope.
    np.testing.assert_array_equal(mask, prob.get_fdata() >= 0.5)
