"""Small CLI habits (issue 13, items 5 and 11): -h, --version, a runtime-only install."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from dunet_deploy import __version__
from dunet_deploy.metrics import format_summary, mean_pm_std

COMMANDS = ("synth", "train", "eval", "export", "infer", "serve", "bench", "demo")
TORCH_COMMANDS = ("train", "export", "bench", "demo")


def _main(name: str):
    module = __import__(f"dunet_deploy.cli.{name}", fromlist=["main"])
    return module.main


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_short_help_and_version(name):
    main = _main(name)
    short = CliRunner().invoke(main, ["-h"])
    assert short.exit_code == 0, short.output
    assert short.output.startswith("Usage: ") and "--version" in short.output
    assert short.output == CliRunner().invoke(main, ["--help"]).output
    version = CliRunner().invoke(main, ["--version"], prog_name=f"dunet-{name}")
    assert version.exit_code == 0, version.output
    assert version.output.strip() == f"dunet-{name} (dunet-deploy) {__version__}"


ARGS = {
    "train": ["--data", "data", "--out", "run"],
    "export": ["run/best.pt", "-o", "export"],
    "bench": ["--out", "bench", "--backends", "onnxruntime"],
    "demo": ["--out", "demo"],
}


@pytest.mark.parametrize("name", TORCH_COMMANDS)
def test_runtime_only_install_names_the_extra(name, tmp_path, run_without):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"PK\x03\x04")
    proc = run_without(("torch",), name, ARGS[name], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0] == (f"error: dunet-{name} needs PyTorch, which is not installed (a "
                        "runtime-only install): pip install 'dunet-deploy[train]' torch==2.13.0")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing created


def test_one_case_spread_is_na():
    one = {"cases": 1, "dsc_global": 0.5}
    two = {"cases": 2, "dsc_global": 0.5}
    for key in ("dsc", "recall", "precision", "lesion_f1", "lesion_count_diff",
                "volume_diff_ml"):
        one[f"{key}_mean"], one[f"{key}_std"] = 0.25, 0.0
        two[f"{key}_mean"], two[f"{key}_std"] = 0.25, 0.125
    assert mean_pm_std(one, "dsc") == "0.2500±n/a"
    assert mean_pm_std(two, "dsc") == "0.2500±0.1250"
    assert mean_pm_std({**two, "dsc_std": math.nan}, "dsc") == "0.2500±n/a"
    assert "±0.0000" not in format_summary(one) and format_summary(one).count("±n/a") == 6
    assert format_summary(two).count("±n/a") == 0


def test_model_input_not_divisible_by_16_is_a_user_error():
    torch = pytest.importorskip("torch")
    from dunet_deploy.errors import DunetError
    from dunet_deploy.models import create_model

    for name, channels in (("dunet", 4), ("unet2d", 1), ("unet3d", 4)):
        model = create_model(name, base_filters=16 if name == "dunet" else 4).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, channels, 32, 32)).shape == (1, 1, 32, 32)
            with pytest.raises(DunetError, match=r"40x32: H and W must be divisible by 16"):
                model(torch.zeros(1, channels, 40, 32))


def test_eval_engine_without_matplotlib_skips_the_box_plot_with_a_note(tiny_run, tmp_path,
                                                                        run_without):
    args = ["--engine", tiny_run.onnx, "--data", tiny_run.data, "--out", "eval",
            "--backend", "onnxruntime"]
    proc = run_without(("matplotlib", "torch"), "eval", args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ("note: matplotlib is not installed: no dsc_boxplot.png "
                                   "(pip install matplotlib)")
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "cases.csv", "summary.json", "summary.md"]
    asked = run_without(("matplotlib", "torch"), "eval", [*args, "--boxplot"], tmp_path)
    assert asked.returncode == 2 and asked.stderr.startswith(
        "error: --boxplot: matplotlib is not installed")
