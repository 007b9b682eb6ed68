"""Issue 13 item 7: the wrong kind of file gets one line saying what it is and what takes it."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from dunet_deploy.cli import eval as eval_cli
from dunet_deploy.cli import export as export_cli
from dunet_deploy.cli import infer as infer_cli


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_infer_with_a_checkpoint_as_engine(tiny_run, tmp_path):
    out = tmp_path / "masks"
    res = CliRunner().invoke(infer_cli.main, ["--engine", str(tiny_run.checkpoint),
                                              str(tiny_run.scan), "-o", str(out)])
    line = _one_line_error(res)
    ckpt = tiny_run.checkpoint
    assert line == (f"error: {ckpt}: is a PyTorch checkpoint; --engine takes an exported model "
                    "(.onnx, or a TensorRT engine with its sidecar): export it first: "
                    f"dunet-export {ckpt} -o export")
    assert not out.exists()


def test_infer_with_model_json_as_engine(tiny_run, tmp_path):
    side = tiny_run.onnx.with_name("model.json")
    res = CliRunner().invoke(infer_cli.main, ["--engine", str(side), str(tiny_run.scan),
                                              "-o", str(tmp_path / "m")])
    line = _one_line_error(res)
    assert f"{side}: is a dunet-deploy model description (JSON sidecar); --engine takes" in line
    # Issue 19.7: the model it describes is model.onnx beside it, not "model".
    assert line.endswith(f": give the model it describes instead: --engine {tiny_run.onnx}")


def test_triton_repository_mistakes_suggest_the_fix(tiny_run, tmp_path):
    """Issue 19.7: config.pbtxt as --engine, a model folder as --repository, and an onnx-backend
    repository on a server without that backend each name what to give instead."""
    from dunet_deploy.cli import serve as serve_cli

    out = tmp_path / "export é"
    res = CliRunner().invoke(export_cli.main, [str(tiny_run.checkpoint), "-o", str(out),
                                               "--format", "triton", "--no-verify"])
    assert res.exit_code == 0, res.output
    repo = out / "triton"
    config = repo / "dunet" / "config.pbtxt"
    res = CliRunner().invoke(infer_cli.main, ["--engine", str(config), str(tiny_run.scan),
                                              "-o", str(tmp_path / "m")])
    assert _one_line_error(res) == (
        f"error: {config}: is a Triton model configuration; --engine takes an exported model "
        "(.onnx, or a TensorRT engine with its sidecar): serve its repository: dunet-serve "
        f"--repository {repo}")

    res = CliRunner().invoke(serve_cli.main, ["--repository", str(repo / "dunet")])
    assert _one_line_error(res) == (f"error: {repo / 'dunet'}: is one model of a repository; "
                                    f"serve the repository that holds it: {repo}")
    pytest.importorskip("pytriton")  # its tritonserver has only the python backend
    res = CliRunner().invoke(serve_cli.main, ["--repository", str(repo)])
    line = _one_line_error(res)
    assert line.startswith(f"error: {repo / 'dunet'}: needs Triton's 'onnxruntime' backend, which "
                           "this tritonserver (")
    assert line.endswith("--format triton --triton-backend python")


def test_infer_with_a_checkpoint_as_input_fails_that_case(tiny_run, tmp_path):
    out = tmp_path / "masks"
    res = CliRunner().invoke(infer_cli.main, ["--engine", str(tiny_run.onnx), str(tiny_run.scan),
                                              str(tiny_run.checkpoint), "-o", str(out),
                                              "--backend", "onnxruntime"])
    line = _one_line_error(res, code=1)
    assert line.startswith(f"error: {tiny_run.checkpoint}: is a PyTorch checkpoint, not a NIfTI "
                           "volume (.nii / .nii.gz): export it first")
    assert "1/2 volume(s) segmented" in res.stdout


def test_eval_with_onnx_as_checkpoint(tiny_run, tmp_path):
    res = CliRunner().invoke(eval_cli.main, ["--checkpoint", str(tiny_run.onnx), "--data",
                                             str(tiny_run.data), "--out", str(tmp_path / "e")])
    line = _one_line_error(res)
    assert line == (f"error: {tiny_run.onnx}: is an ONNX model, not a dunet-train checkpoint "
                    f"(run/best.pt): run it with dunet-infer --engine {tiny_run.onnx} "
                    f"or dunet-eval --engine {tiny_run.onnx}")
    assert "Python objects" not in line and not (tmp_path / "e").exists()


@pytest.mark.parametrize("kind", ["onnx", "nifti"])
def test_export_of_a_model_or_a_scan(tiny_run, tmp_path, kind):
    src = tiny_run.onnx if kind == "onnx" else tmp_path / "scan.nii.gz"
    if kind == "nifti":
        shutil.copy(tiny_run.scan, src)
    res = CliRunner().invoke(export_cli.main, [str(src), "-o", str(tmp_path / "x")])
    line = _one_line_error(res)
    what = "an ONNX model" if kind == "onnx" else "a NIfTI volume"
    assert line.startswith(f"error: {src}: is {what}, not a dunet-train checkpoint")
    assert "corrupt" not in line and "Python objects" not in line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["model.py", "summary.json", "notes.txt"])
def test_infer_with_a_file_that_is_no_model_says_what_engine_takes(tiny_run, tmp_path, name):
    """Issue 19.7: a file that is neither ONNX nor a TensorRT engine is not blamed on a
    missing engine sidecar."""
    path = tmp_path / name
    path.write_text("def f():\n    return 1\n" if name.endswith(".py") else '{"ok": 1}\n')
    res = CliRunner().invoke(infer_cli.main, ["--engine", str(path), str(tiny_run.scan),
                                              "-o", str(tmp_path / "m")])
    line = _one_line_error(res)
    assert line == (f"error: {path}: not an exported model (neither ONNX nor a TensorRT "
                    "engine); --engine takes a .onnx file, or a TensorRT engine with its sidecar")
    assert not (tmp_path / "m").exists()
