"""``dunet_deploy.filetypes``: kinds recognised by content, one line naming the right command."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from dunet_deploy.errors import DunetError
from dunet_deploy.filetypes import CHECKPOINT, MODEL, VOLUME, check_kind, sniff


def _nifti(path, cls=nib.Nifti1Image):
    nib.save(cls(np.zeros((4, 5, 6), np.float32), np.eye(4)), str(path))
    return path


def _onnx(path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_each_kind_is_recognised_by_content_whatever_its_name(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.bin")
    assert sniff(tmp_path / "weights.bin").name == "checkpoint"
    assert sniff(_onnx(tmp_path / "model.pt")).name == "onnx"
    assert sniff(_nifti(tmp_path / "scan.nii")).name == "nifti"
    assert sniff(_nifti(tmp_path / "scan.nii.gz")).name == "nifti"
    assert sniff(_nifti(tmp_path / "scan2.nii.gz", nib.Nifti2Image)).name == "nifti"
    (tmp_path / "model.plan").write_bytes(b"ftrt" + bytes(60))
    assert sniff(tmp_path / "model.plan").name == "engine"
    # An engine without the magic is still recognised by its dunet-deploy sidecar.
    (tmp_path / "other.plan").write_bytes(bytes(64))
    side = {"format": "dunet-deploy", "tensorrt": "10.13"}
    (tmp_path / "other.plan.json").write_text(json.dumps(side))
    assert sniff(tmp_path / "other.plan").name == "engine"
    assert sniff(tmp_path / "other.plan.json").name == "sidecar"


def test_unknown_missing_and_foreign_files_are_none(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"garbage, not protobuf")
    (tmp_path / "b.nii.gz").write_bytes(gzip.compress(b"x" * 600))
    (tmp_path / "c.json").write_text('{"format": "something else"}')
    (tmp_path / "d.pt").write_bytes(b"PK\x03\x04 not a zip")
    for name in ("a.onnx", "b.nii.gz", "c.json", "d.pt", "missing.pt"):
        assert sniff(tmp_path / name) is None, name
    assert sniff(tmp_path) is None
    check_kind(tmp_path / "a.onnx", MODEL, "--engine")  # unknown: left to the reader


def test_check_kind_says_what_the_file_is_and_what_takes_it(tmp_path):
    scan = _nifti(tmp_path / "scan.nii.gz")
    onnx_path = _onnx(tmp_path / "model.onnx")
    with pytest.raises(DunetError) as err:
        check_kind(scan, CHECKPOINT)
    assert str(err.value) == (
        f"{scan}: is a NIfTI volume, not a dunet-train checkpoint (run/best.pt): segment it "
        f"with dunet-infer --engine MODEL {scan} -o masks")
    with pytest.raises(DunetError, match=r"model.onnx: is an ONNX model; --checkpoint takes a "
                                         r"dunet-train checkpoint .*dunet-infer --engine "):
        check_kind(onnx_path, CHECKPOINT, "--checkpoint")
    with pytest.raises(DunetError, match=r"is an ONNX model, not a NIfTI volume"):
        check_kind(onnx_path, VOLUME)
    assert check_kind(onnx_path, MODEL).name == "onnx"
