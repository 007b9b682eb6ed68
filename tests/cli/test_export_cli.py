"""``dunet-export``: artefacts, verification gates, bad input, nothing written on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import export_helpers
import numpy as np
import onnx
import pytest
import torch

from dunet_deploy.artifacts import read_artifact_info, read_sidecar
from dunet_deploy.cli import export as cli
from dunet_deploy.errors import DunetError
from dunet_deploy.export import tensorrt_build as tb
from dunet_deploy.export import verify as ver
from dunet_deploy.models import create_model, model_kwargs
from dunet_deploy.spec import InferenceDefaults
from dunet_deploy.training.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[2]


H = export_helpers  # tests/export_helpers.py (tests/ is on sys.path through its conftest)


@pytest.fixture(scope="module")
def spec32():  # type: ignore[no-untyped-def]
    return H.tiny_spec()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, spec32) -> Path:  # type: ignore[no-untyped-def]
    """Trained tiny D-UNet checkpoint (numerics are meaningful, FP16 passes)."""
    path = tmp_path_factory.mktemp("cli") / "tiny.pt"
    save_checkpoint(
        path,
        model=H.train_tiny(spec32),
        spec=spec32,
        epoch=2,
        metrics={"dice": 0.4},
        best_metrics={"dice": 0.45},
    )
    return path


run = H.run_export_cli
_one_line_error = H.one_line_error


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------ success
def test_default_export_writes_onnx_and_json(ckpt: Path, tmp_path: Path, spec32) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, stdout, err = run(ckpt, "-o", out, "--seed", "3")
    assert code == 0, err
    assert _files(out) == ["model.json", "model.onnx"]
    assert _files(tmp_path) == ["out", "out/model.json", "out/model.onnx"]  # no staging left
    assert "verification of model.onnx" in stdout and "synthetic" in stdout
    info = read_artifact_info(out / "model.onnx")
    assert info.spec == spec32 and info.metrics == {"dice": 0.4} and info.precision == "fp32"
    doc = json.loads((out / "model.json").read_text())
    assert doc["source"]["checkpoint"] == "tiny.pt" and doc["source"]["epoch"] == 2
    assert doc["source"]["best_metrics"] == {"dice": 0.45}
    assert doc["onnx"]["opset"] == 17
    assert doc["flops_per_slab"] > 0
    rows = doc["verification"]["rows"]
    assert {r["inputs"] for r in rows} == {"random", "synthetic"}
    assert all(r["passed"] and r["max_abs"] <= 1e-4 for r in rows)
    assert read_sidecar(out / "model.json").spec == spec32


def test_fp16_and_triton(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(
        ckpt,
        "-o",
        out,
        "--format",
        "onnx-fp16",
        "--format",
        "triton",
        "--batch-range",
        "1,4,16",
        "--seed",
        "3",
    )
    assert code == 0, err
    assert _files(out) == [
        "model_fp16.json",
        "model_fp16.onnx",
        "triton",
        "triton/dunet",
        "triton/dunet/1",
        "triton/dunet/1/model.onnx",
        "triton/dunet/config.pbtxt",
        "triton/dunet_volume",
        "triton/dunet_volume/1",
        "triton/dunet_volume/1/model.py",
        "triton/dunet_volume/config.pbtxt",
    ]
    assert "verification of model_fp16.onnx" in stdout
    info = read_artifact_info(out / "model_fp16.onnx")
    assert info.precision == "fp16"
    doc = json.loads((out / "model_fp16.json").read_text())
    assert doc["fp16"]["policy"]["keep_head"] is True
    syn = [r for r in doc["verification"]["rows"] if r["inputs"] == "synthetic"]
    assert syn and all(r["passed"] and r["positives"] > 0 for r in syn)
    assert "max_batch_size: 16" in (out / "triton/dunet/config.pbtxt").read_text()
    assert info.inference.tta == "none" and info.inference.min_lesion_mm3 == 0.0


def test_inference_defaults_are_stored_in_every_artefact(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(ckpt, "-o", out, "--format", "onnx", "--format", "onnx-fp16",
                       "--format", "triton", "--no-verify", "--tta", "flip",
                       "--min-lesion-mm3", "12.5")
    assert code == 0, err
    want = InferenceDefaults(tta="flip", min_lesion_mm3=12.5)
    for name in ("model.onnx", "model_fp16.onnx", "triton/dunet/1/model.onnx"):
        assert read_artifact_info(out / name).inference == want, name
    for name in ("model.json", "model_fp16.json"):
        assert read_sidecar(out / name).inference == want, name
    config = (out / "triton/dunet/config.pbtxt").read_text()
    for key, value in want.to_parameters().items():
        assert key in config and value in config
    m = onnx.load(str(out / "triton/dunet/1/model.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_trt_with_fake_tensorrt(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trt = H.make_fake_tensorrt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tb, "probe_gpu", lambda: tb.GpuInfo("Fake GPU", "9.0", "cuda-python"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "timing.cache").write_bytes(b"cache")
    code, stdout, err = run(
        ckpt,
        "-o",
        out,
        "--format",
        "trt",
        "--format",
        "triton",
        "--triton-backend",
        "trt",
        "--workspace-mb",
        "256",
        "--opt-level",
        "4",
        "--no-verify",
    )
    assert code == 0, err
    assert _files(out) == [
        "model.plan",
        "model.plan.json",
        "model.plan.layers.json",
        "timing.cache",
        "triton",
        "triton/dunet",
        "triton/dunet/1",
        "triton/dunet/1/model.plan",
        "triton/dunet/config.pbtxt",
        "triton/dunet_volume",
        "triton/dunet_volume/1",
        "triton/dunet_volume/1/model.py",
        "triton/dunet_volume/config.pbtxt",
    ]
    built = json.loads((out / "model.plan").read_bytes())
    assert built["source"] == "model_fp16.onnx" and built["network_flags"] == 2
    assert built["workspace"] == 256 << 20 and built["opt_level"] == 4
    assert (out / "timing.cache").read_bytes() == b"cache+tuned"
    side = read_artifact_info(out / "model.plan")
    assert side.precision == "fp16"
    assert side.extra["tensorrt"] == "10.13.0.35"
    assert side.extra["gpu"]["compute_capability"] == "9.0"
    assert [p["opt"] for p in side.extra["profiles"]] == [[1, 4, 32, 32], [8, 4, 32, 32]]
    assert side.extra["layer_precisions"] == {"fp16": 3, "fp32": 2}
    assert "TensorRT engine: 5 layers (fp16 3, fp32 2)" in stdout + err
    assert 'platform: "tensorrt_plan"' in (out / "triton/dunet/config.pbtxt").read_text()


# ------------------------------------------------------ failures write nothing
def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p for p in tmp_path.iterdir() if "dunet-export" in p.name]
    assert leftovers == []


def test_fp32_verification_failure(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ver.run_onnxruntime
    monkeypatch.setattr(ver, "run_onnxruntime", lambda *a, **k: real(*a, **k) + 1e-3)
    out = tmp_path / "out"
    code, stdout, err = run(ckpt, "-o", out)
    line = _one_line_error(code, err)
    assert "verification failed" in line and "1.00e-03" in line
    assert "NO" in stdout  # the table shows the failing rows
    _assert_nothing_written(tmp_path, out)


def test_fp16_refused_below_agreement(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ver.run_openvino

    def flipped(*a, **k):  # type: ignore[no-untyped-def]
        p = real(*a, **k)
        p.reshape(-1)[: p.size // 100] = 1 - p.reshape(-1)[: p.size // 100]  # flip 1 %
        return p

    monkeypatch.setattr(ver, "run_openvino", flipped)
    monkeypatch.setattr(ver, "openvino_available", lambda: True)
    out = tmp_path / "out"
    code, _, err = run(ckpt, "-o", out, "--format", "onnx", "--format", "onnx-fp16", "--seed", "3")
    line = _one_line_error(code, err)
    assert "FP16 verification failed" in line and "openvino" in line
    _assert_nothing_written(tmp_path, out)


def test_existing_outputs_survive_a_failure(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"previous")
    monkeypatch.setattr(ver, "run_onnxruntime", lambda model, slabs, *a, **k: np.full(
        (slabs.shape[0], 1, *slabs.shape[2:]), np.nan, np.float32))
    code, _, _ = run(ckpt, "-o", out)
    assert code != 0
    assert (out / "model.onnx").read_bytes() == b"previous"
    assert _files(out) == ["model.onnx"]


def test_missing_tensorrt(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "out"
    line = _one_line_error(*run(ckpt, "-o", out, "--format", "onnx", "--format", "trt")[::2])
    assert "TensorRT is not installed" in line
    _assert_nothing_written(tmp_path, out)


def test_missing_gpu(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", H.make_fake_tensorrt())

    def no_gpu() -> tb.GpuInfo:
        raise cli.DunetError("no CUDA GPU available (cudaGetDeviceCount: cudaErrorNoDevice)")

    monkeypatch.setattr(tb, "probe_gpu", no_gpu)
    out = tmp_path / "out"
    line = _one_line_error(*run(ckpt, "-o", out, "--format", "trt")[::2])
    assert "no CUDA GPU available" in line
    _assert_nothing_written(tmp_path, out)


# ---------------------------------------------------------------- bad input
def _foreign(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)


def _other_architecture(path: Path, spec) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint(path, model=create_model("dunet", base_filters=8), spec=spec)
    doc = torch.load(path, weights_only=True)
    doc["model_name"] = "unet2d"
    doc["model_args"] = model_kwargs("unet2d", base_filters=8, in_channels=4)
    torch.save(doc, path)


def _truncated(path: Path, spec) -> None:  # type: ignore[no-untyped-def]
    save_checkpoint(path, model=create_model("dunet", base_filters=8), spec=spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "checkpoint not found"),
        ("foreign", "not a dunet-deploy checkpoint"),
        ("architecture", "weights do not fit model 'unet2d'"),
        ("truncated", "truncated or corrupt checkpoint"),
        ("payload", "refused"),
    ],
)
def test_bad_checkpoints(kind: str, needle: str, tmp_path: Path, spec32) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.pt"
    marker = tmp_path / "pwned"
    if kind == "foreign":
        _foreign(path)
    elif kind == "architecture":
        _other_architecture(path, spec32)
    elif kind == "truncated":
        _truncated(path, spec32)
    elif kind == "payload":
        torch.save({"format": "dunet-deploy-checkpoint", "x": _Payload(marker)}, path)
    out = tmp_path / "out"
    line = _one_line_error(*run(path, "-o", out)[::2])
    assert needle in line and "bad.pt" in line
    assert not marker.exists()
    _assert_nothing_written(tmp_path, out)


def test_payload_checkpoint_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    marker = tmp_path / "pwned"
    torch.save({"format": "dunet-deploy-checkpoint", "x": _Payload(marker)}, path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.export", str(path), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0]
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    _assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--format", "pdf"], "'pdf' is not one of"),
        (["--batch-range", "1,8"], "three integers"),
        (["--batch-range", "1,x,3"], "three integers"),
        (["--batch-range", "8,4,32"], "MIN <= OPT <= MAX"),
        (["--batch-range", "0,1,2"], ">= 1"),
        (["--opset", "16"], "opset >= 17"),
        (["--min-lesion-mm3", "-1"], "--min-lesion-mm3"),
        (["--tta", "spin"], "--tta"),
        (["--opt-level", "9"], "--opt-level"),
        (["--format", "triton", "--triton-backend", "trt"], "needs --format trt"),
        (
            [
                "--format",
                "trt",
                "--format",
                "triton",
                "--triton-backend",
                "trt",
                "--batch-range",
                "2,8,32",
            ],
            "starting at 1",
        ),
    ],
)
def test_bad_options(args: list[str], needle: str, ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _one_line_error(*run(ckpt, "-o", out, *args)[::2])
    assert needle in line
    _assert_nothing_written(tmp_path, out)


# ----------------------------------------------------------------- real size
@pytest.mark.slow
def test_paper_size_export(tmp_path: Path) -> None:
    """The paper's D-UNet at 192×192: the parameter count and FLOPs land in the metadata."""
    from dunet_deploy.models import PAPER_SEADD123_PARAMS  # noqa: F401 - registry loaded
    from dunet_deploy.spec import PreprocessSpec

    spec = PreprocessSpec()
    path = tmp_path / "paper.pt"
    save_checkpoint(path, model=create_model("dunet"), spec=spec)
    out = tmp_path / "out"
    code, _, err = run(path, "-o", out, "--verify-slabs", "2")
    assert code == 0, err
    info = read_artifact_info(out / "model.onnx")
    assert info.params == 8_640_163  # Table 5, SEAdd-23
    m = onnx.load(str(out / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 4, 192, 192]
    doc = json.loads((out / "model.json").read_text())
    assert all(r["passed"] for r in doc["verification"]["rows"])
    assert doc["flops_per_slab"] > 10**10  # tens of GFLOPs per 192×192 slab


# ------------------------------------------------- staging (mounts, issue 13)
def test_staging_is_inside_the_output_folder(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renames from the stage never cross a file system: it lives in OUT_DIR itself."""
    from dunet_deploy.export import pipeline

    moves: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        moves.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", spy)
    out = tmp_path / "mnt" / "out"
    code, _, err = run(ckpt, "-o", out, "--no-verify")
    assert code == 0, err
    commits = [(s, d) for s, d in moves if d.parent == out]  # atomic writes use os.replace too
    assert {d.name for _, d in commits} == {"model.onnx", "model.json"}
    for src, _ in commits:
        assert src.parent.parent == out.absolute() and src.parent.name.startswith(".dunet-export-")
    assert _files(out) == ["model.json", "model.onnx"]


def test_failure_removes_the_folders_it_created(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ver.run_onnxruntime
    monkeypatch.setattr(ver, "run_onnxruntime", lambda *a, **k: real(*a, **k) + 1e-3)
    out = tmp_path / "new" / "deeper" / "out"
    code, _, err = run(ckpt, "-o", out)
    assert "verification failed" in _one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_that_cannot_be_created(ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    line = _one_line_error(*run(ckpt, "-o", blocker / "out")[::2])
    assert "file/out" in line and "cannot be created" in line and "not a folder" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_request_defaults_and_rules_live_in_the_library(ckpt: Path, tmp_path: Path) -> None:
    from dunet_deploy.export.pipeline import ExportRequest, run_export

    req = ExportRequest(ckpt, out_dir=tmp_path / "lib")
    assert req.checked().formats == ("onnx",) and req.batch_range == (1, 8, 32)
    bad = ExportRequest(ckpt, formats=("triton",), triton_backend="trt")
    with pytest.raises(cli.DunetError, match="needs --format trt"):
        run_export(bad, log=lambda _: None)
    written = run_export(ExportRequest(ckpt, out_dir=tmp_path / "lib", verify=False),
                         log=lambda _: None)
    assert written == [Path("model.onnx"), Path("model.json")]


def test_template_travels_beside_the_model(ckpt: Path, tmp_path: Path) -> None:
    """--template FILE: written beside the ONNX, its digest in the metadata, checked at load."""
    from dunet_deploy.data.registration import TEMPLATE_FILE, Template, load_template

    data = np.zeros((20, 24, 18), np.float32)
    data[5:15, 6:18, 4:14] = 1.0
    data[8:12, 9:15, 7:11] = 2.0
    src = Template(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    src.save(tmp_path / "mine.nii.gz")
    out = tmp_path / "out"
    code, _, err = run(ckpt, "-o", out, "--no-verify", "--template", tmp_path / "mine.nii.gz")
    assert code == 0, err
    assert (out / TEMPLATE_FILE).is_file()
    assert read_artifact_info(out / "model.onnx").template["digest"] == src.digest()
    assert read_sidecar(out / "model.json").template["digest"] == src.digest()
    assert load_template(out / "model.onnx").digest() == src.digest()
    assert read_artifact_info(out / "model.onnx").inference.register == "auto"
    code, _, err = run(ckpt, "-o", tmp_path / "none", "--no-verify", "--register", "never")
    assert code == 0, err
    # --register stores the model's default, like --tta.
    assert read_artifact_info(tmp_path / "none" / "model.onnx").inference.register == "never"
    with pytest.raises(DunetError, match="--template FILE"):
        load_template(tmp_path / "none" / "model.onnx")
    code, _, err = run(ckpt, "-o", tmp_path / "bad", "--no-verify", "--template",
                       tmp_path / "missing.nii.gz")
    assert code != 0 and "template not found" in err and not (tmp_path / "bad").exists()
