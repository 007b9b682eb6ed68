"""``dunet-train``: options, a run and its resume, and one-line errors for bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from dunet_deploy.cli.train import HELP_DEFAULTS, main  # noqa: E402
from dunet_deploy.data.synth import write_dataset  # noqa: E402
from dunet_deploy.models import create_model  # noqa: E402
from dunet_deploy.spec import PreprocessSpec  # noqa: E402
from dunet_deploy.training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from dunet_deploy.training.trainer import TrainConfig  # noqa: E402

SHAPE = (32, 40, 16)
FAST = ["--image-size", "32", "--base-filters", "8", "--batch-size", "8", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("traincli") / "data"
    write_dataset(root, cases=4, shape=SHAPE, seed=2)
    return root


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_the_options_and_defaults_match_the_library():
    result = run("--help")
    assert result.exit_code == 0
    for opt in ("--data", "--out", "--model", "--epochs", "--batch-size", "--image-size",
                "--optimizer", "--lr", "--loss", "--val-fraction", "--seed", "--device",
                "--amp", "--workers", "--resume", "--oversample", "--augment / --no-augment",
                "--tensorboard", "--cache-dir", "--base-filters"):
        assert opt in result.output, opt
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key, value in HELP_DEFAULTS.items():
        assert defaults[key] == value, key


def test_train_then_resume(data, tmp_path):
    out = tmp_path / "run"
    # --resume auto on a fresh --out starts a new run ...
    first = run("--data", data, "--out", out, "--epochs", "1", "--tensorboard",
                "--resume", "auto", *FAST)
    assert first.exit_code == 0, first.output
    assert "epoch 1/1" in first.stdout and "done: epoch 1" in first.stdout
    assert "resumed from" not in first.stdout
    assert json.loads((out / "run.json").read_text())["config"]["resume"] is None
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in first.stdout
    assert {p.name for p in out.iterdir()} >= {"last.pt", "best.pt", "metrics.jsonl", "run.json"}

    # ... and continues it once last.pt exists. Options not given again come from
    # the checkpoint; --epochs may grow.
    second = run("--data", data, "--out", out, "--resume", "auto", "--epochs", "2",
                 "--no-progress")
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.stdout and "epoch 2/2" in second.stdout
    doc = load_checkpoint(out / "last.pt")
    assert doc["epoch"] == 2 and doc["model_args"]["base_filters"] == 8
    assert doc["config"]["image_size"] == 32
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]

    refused = run("--data", data, "--out", out, "--resume", str(out / "last.pt"), "--epochs",
                  "3", "--lr", "0.5")
    assert_one_line_error(refused, "--lr")
    again = run("--data", data, "--out", out, "--epochs", "1", *FAST)
    assert_one_line_error(again, "already holds a run")


def _foreign(tmp: Path) -> Path:
    path = tmp / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    return path


def _corrupt(tmp: Path) -> Path:
    path = tmp / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 this is not a zip")
    return path


def _weights_only(tmp: Path) -> Path:
    """A dunet-deploy checkpoint without a training config (e.g. exported weights)."""
    path = tmp / "weights.pt"
    spec = PreprocessSpec.for_geometry(SHAPE, image_size=32, model_name="unet2d", slab_offsets=(0,))
    save_checkpoint(path, model=create_model("unet2d", base_filters=8), spec=spec)
    return path


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing-data", "does not exist"),
        ("empty-data", "no cases found"),
        ("no-layout", "no cases found"),
        ("bad-model", "--model 'resnet'"),
        ("bad-size", "--image-size 40"),
        ("resume-missing", "checkpoint not found"),
        ("resume-corrupt", "corrupt"),
        ("resume-foreign", "not a dunet-deploy checkpoint"),
        ("resume-weights-only", "no training config"),
        ("bad-epochs", "--epochs 0"),
        ("bad-optimizer", "--optimizer"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(case, needle, data, tmp_path):
    out = tmp_path / "out"
    args: list[str | Path] = ["--data", data, "--out", out, *FAST]
    if case == "missing-data":
        args[1] = tmp_path / "nope"
    elif case == "empty-data":
        (tmp_path / "empty").mkdir()
        args[1] = tmp_path / "empty"
    elif case == "no-layout":
        (tmp_path / "junk").mkdir()
        (tmp_path / "junk" / "readme.txt").write_text("hello")
        args[1] = tmp_path / "junk"
    elif case == "bad-model":
        args += ["--model", "resnet"]
    elif case == "bad-size":
        args += ["--image-size", "40"]
    elif case == "resume-missing":
        args += ["--resume", tmp_path / "nope.pt"]
    elif case == "resume-corrupt":
        args += ["--resume", _corrupt(tmp_path)]
    elif case == "resume-foreign":
        args += ["--resume", _foreign(tmp_path)]
    elif case == "resume-weights-only":
        args += ["--resume", _weights_only(tmp_path)]
    elif case == "bad-epochs":
        args += ["--epochs", "0"]
    elif case == "bad-optimizer":
        args += ["--optimizer", "rmsprop"]
    result = run(*args)
    assert_one_line_error(result, needle)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(data, tmp_path):
    result = run("--data", data, "--out", tmp_path / "out", "--device", "cuda")
    assert_one_line_error(result, "CUDA is not available")
    assert not (tmp_path / "out").exists()


def test_resume_of_another_runs_checkpoint_is_refused(data, tmp_path):
    out = tmp_path / "a"
    assert run("--data", data, "--out", out, "--epochs", "1", *FAST).exit_code == 0
    # Same data, different model: the checkpoint is a dunet one, this run asks for unet2d.
    result = run("--data", data, "--out", tmp_path / "b", "--resume", out / "last.pt",
                 "--model", "unet2d")
    assert_one_line_error(result, "--model")
    assert not (tmp_path / "b").exists()
