"""The training loop: convergence, exact resume, checkpoints, DDP with two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.data.synth import write_dataset  # noqa: E402
from dunet_deploy.errors import DunetError  # noqa: E402
from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from dunet_deploy.training.trainer import (  # noqa: E402
    TrainConfig,
    capture_rng_state,
    restore_rng_state,
    resume_config,
    train,
)

TINY = (32, 40, 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    write_dataset(root / "data", cases=4, shape=TINY, seed=1)
    return {"data": str(root / "data"), "cache_dir": str(root / "cache")}


def tiny_config(tiny: dict[str, str], out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        data=tiny["data"], out=str(out), cache_dir=tiny["cache_dir"], image_size=32,
        base_filters=8, batch_size=8, epochs=2, device="cpu", workers=0, progress=False,
        deterministic=True,
    )
    base.update(kw)
    return TrainConfig(**base)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _assert_same_tree(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_ends_with_bit_identical_weights(tiny, tmp_path):
    straight = train(tiny_config(tiny, tmp_path / "straight", epochs=3))
    assert straight.epoch == 3 and len(straight.history) == 3

    first = train(tiny_config(tiny, tmp_path / "resumed", epochs=2))
    assert first.epoch == 2
    # A kill during epoch 3 can leave a cut line behind; resume must drop it.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    cfg = resume_config("auto", str(tmp_path / "resumed"), {"epochs": 3})
    resumed = train(cfg)
    assert resumed.epoch == 3

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    _assert_same_tree(a["optimizer"], b["optimizer"], "optimizer")
    assert a["metrics"] == b["metrics"] and a["best_metrics"] == b["best_metrics"]
    ha = _lines(tmp_path / "straight" / "metrics.jsonl")
    hb = _lines(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["epoch"] for r in hb] == [1, 2, 3]
    for ra, rb in zip(ha, hb):
        assert ra["train_loss"] == rb["train_loss"] and ra["val"] == rb["val"]

    # Nothing left to do: resuming a finished run is a no-op.
    again = train(resume_config("auto", str(tmp_path / "resumed"), {"epochs": 3}))
    assert again.epoch == 3 and len(_lines(tmp_path / "resumed" / "metrics.jsonl")) == 3


def test_checkpoint_contents_and_run_folder(tiny, tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(tiny, out, epochs=1, deterministic=False))
    for name in ("last.pt", "best.pt", "metrics.jsonl", "run.json"):
        assert (out / name).is_file(), name
    assert result.best_checkpoint == out / "best.pt" and result.best_epoch == 1
    doc = load_checkpoint(out / "last.pt")  # weights_only=True inside
    assert doc["model_name"] == "dunet" and doc["model_args"]["base_filters"] == 8
    assert doc["epoch"] == 1 and doc["optimizer"] is not None
    cfg = doc["config"]
    assert cfg["lr"] == 1e-3 and cfg["optimizer"] == "adam" and cfg["world_size"] == 1
    assert len(cfg["split"]["val"]) == 1 and len(cfg["split"]["train"]) == 3
    assert doc["spec_obj"].image_size == 32 and doc["spec_obj"].volume_shape == TINY
    assert doc["spec_obj"].slab_offsets == (-2, -1, 0, 1)
    rng = doc["rng"]
    assert isinstance(rng["torch"], torch.Tensor)
    assert isinstance(rng["numpy"]["keys"], list) and isinstance(rng["python"]["state"], list)
    for key in ("dsc_mean", "dsc_std", "dsc_global", "recall_mean", "precision_mean"):
        assert key in doc["metrics"]
    model = model_from_checkpoint(doc)
    with torch.no_grad():
        y = model(torch.zeros(2, 4, 32, 32))
    assert y.shape == (2, 1, 32, 32)

    rec = _lines(out / "metrics.jsonl")[0]
    for key in ("epoch", "train_loss", "val", "seconds", "slabs_per_s", "world_size",
                "rank_samples", "val_cases"):
        assert key in rec, key
    assert rec["world_size"] == 1 and rec["slabs_per_s"] > 0
    assert rec["val"]["cases"] == 1 and rec["val_cases"][0]["case_id"] == cfg["split"]["val"][0]

    # The same folder again without --resume is refused, and so is a contradicting resume.
    with pytest.raises(DunetError, match="already holds a run"):
        train(tiny_config(tiny, out, epochs=1))
    with pytest.raises(DunetError, match="--lr"):
        train(resume_config("auto", str(out), {"epochs": 2, "lr": 0.5}))


def test_rng_state_round_trip():
    state = capture_rng_state()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_two_process_ddp_training(tiny, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dunet_deploy.cli.train", "--data", tiny["data"], "--out", str(out),
        "--cache-dir", str(tmp_path / "ddp_cache"), "--epochs", "1", "--image-size", "32",
        "--base-filters", "8", "--batch-size", "4", "--device", "cpu", "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("done: epoch 1") == 1  # only rank 0 reports
    rec = _lines(out / "metrics.jsonl")
    assert len(rec) == 1
    r = rec[0]
    assert r["world_size"] == 2
    assert len(r["rank_samples"]) == 2 and r["rank_samples"][0] == r["rank_samples"][1] > 0
    assert r["train_slabs"] == sum(r["rank_samples"])
    assert r["rank_digests"][0] != r["rank_digests"][1]  # the ranks saw different slabs
    doc = load_checkpoint(out / "last.pt")
    assert doc["config"]["world_size"] == 2 and doc["epoch"] == 1
    assert not any(k.startswith("module.") for k in doc["state_dict"])
    model_from_checkpoint(doc)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_training_converges_on_synthetic_data(tmp_path):
    """Validation DSC rises well above its first epoch (about 25 s on 2 idle cores)."""
    from click.testing import CliRunner

    from dunet_deploy.cli.train import main

    write_dataset(tmp_path / "data", cases=8, shape=(40, 48, 40), seed=1)
    out = tmp_path / "run"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--image-size", "32",
            "--base-filters", "8", "--batch-size", "8", "--oversample", "3", "--epochs", "10",
            "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    dsc = [r["val"]["dsc_mean"] for r in _lines(out / "metrics.jsonl")]
    assert len(dsc) == 10
    assert dsc[-1] >= dsc[0] + 0.15 and dsc[-1] >= 0.3, dsc


def test_spec_follows_the_data_geometry_and_the_model():
    from dunet_deploy.spec import ATLAS_CROP_COLS, ATLAS_CROP_ROWS
    from dunet_deploy.training.trainer import build_spec

    paper = build_spec(TrainConfig(data="d", out="o"), (197, 233, 189))
    assert (paper.crop_rows, paper.crop_cols) == (ATLAS_CROP_ROWS, ATLAS_CROP_COLS)
    assert paper.image_size == 192 and paper.slab_offsets == (-2, -1, 0, 1)
    assert paper.model_name == "dunet"
    single = build_spec(TrainConfig(data="d", out="o", model="unet2d", image_size=32), TINY)
    assert single.slab_offsets == (0,) and single.image_size == 32
    assert single.model_name == "unet2d"
    with pytest.raises(DunetError, match="--image-size 40"):
        build_spec(TrainConfig(data="d", out="o", image_size=40), TINY)
    # The data's geometry (as measure_geometry returns it) is recorded in the spec.
    mni = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
    geo = build_spec(TrainConfig(data="d", out="o"), (197, 233, 189),
                     {"orientation": ("R", "A", "S"), "voxel_size": (1.0, 1.0, 1.0),
                      "grid_affine": mni})
    assert geo.orientation == ("R", "A", "S") and geo.voxel_size == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(geo.grid_matrix, mni)


def test_single_slice_model_trains_on_one_channel_slabs(tiny, tmp_path):
    result = train(tiny_config(tiny, tmp_path / "u", model="unet2d", epochs=1,
                               cache_dir=str(tmp_path / "cache_u"), deterministic=False))
    doc = load_checkpoint(result.last_checkpoint)
    assert doc["model_name"] == "unet2d" and doc["model_args"]["in_channels"] == 1
    assert doc["spec_obj"].slab_offsets == (0,)
