"""Checkpoint files: round trip, atomic writes and every kind of bad file."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.errors import DunetError  # noqa: E402
from dunet_deploy.models import create_model  # noqa: E402
from dunet_deploy.spec import PreprocessSpec  # noqa: E402
from dunet_deploy.training.checkpoint import (  # noqa: E402
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)

SPEC = PreprocessSpec.for_geometry((40, 48, 24), image_size=32)


def _save(path, **kw):
    torch.manual_seed(0)
    model = create_model("dunet", base_filters=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, 32, 32)).mean().backward()
    opt.step()
    save_checkpoint(path, model=model, spec=SPEC, config={"lr": 1e-3}, epoch=3,
                    metrics={"dsc_mean": 0.5}, optimizer=opt, **kw)
    return model


def test_round_trip_rebuilds_identical_model(tmp_path):
    path = tmp_path / "last.pt"
    model = _save(path)
    doc = load_checkpoint(path)
    assert doc["model_name"] == "dunet" and doc["model_args"]["base_filters"] == 8
    assert doc["epoch"] == 3 and doc["metrics"] == {"dsc_mean": 0.5}
    assert doc["spec_obj"] == SPEC
    assert doc["optimizer"]["state"]  # Adam moments survived
    rebuilt = model_from_checkpoint(doc)
    assert not rebuilt.training
    for (k, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), k
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(DunetError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    _save(good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(DunetError, match="truncated or corrupt") as e:
        load_checkpoint(trunc)
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(DunetError, match="not a dunet-deploy checkpoint"):
        load_checkpoint(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(DunetError):
        load_checkpoint(text)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_payload_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": "dunet-deploy-checkpoint", "x": _Payload()}, f)
    with pytest.raises(DunetError, match="refused|not a torch checkpoint"):
        load_checkpoint(evil)
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"format": "dunet-deploy-checkpoint", "x": _Payload()}, evil_zip)
    with pytest.raises(DunetError, match="refused"):
        load_checkpoint(evil_zip)


def test_weights_of_another_architecture(tmp_path):
    path = tmp_path / "ckpt.pt"
    _save(path)
    doc = load_checkpoint(path)
    doc["model_args"] = {**doc["model_args"], "base_filters": 16}
    with pytest.raises(DunetError, match="weights do not fit model 'dunet'"):
        model_from_checkpoint(doc, "ckpt.pt")
    doc = load_checkpoint(path)
    doc["model_name"] = "unet3d"
    doc["model_args"] = {"in_channels": 4, "base_filters": 8}
    with pytest.raises(DunetError, match="weights do not fit model 'unet3d'"):
        model_from_checkpoint(doc)


def test_unknown_model_and_newer_format(tmp_path):
    path = tmp_path / "ckpt.pt"
    _save(path)
    doc = torch.load(path, weights_only=True)
    doc["model_name"] = "resnet"
    torch.save(doc, path)
    with pytest.raises(DunetError, match="unknown model 'resnet'"):
        load_checkpoint(path)
    doc["model_name"], doc["format_version"] = "dunet", 99
    torch.save(doc, path)
    with pytest.raises(DunetError, match="newer"):
        load_checkpoint(path)
