"""A tiny trained run and its ONNX export, shared by the CLI tests that need real files."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SHAPE = (32, 40, 16)


@dataclass(frozen=True)
class TinyRun:
    """``data/`` (4 synthetic ATLAS R1.1 cases), ``run/best.pt`` and ``export/model.onnx``."""

    root: Path
    data: Path
    checkpoint: Path
    onnx: Path
    scan: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    pytest.importorskip("torch")
    from dunet_deploy.data.layouts import discover_cases
    from dunet_deploy.data.synth import write_dataset
    from dunet_deploy.export.pipeline import ExportRequest, run_export
    from dunet_deploy.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("tinyrun")
    write_dataset(root / "data", cases=4, shape=SHAPE, seed=5)
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), image_size=32,
                      base_filters=16, batch_size=8, epochs=1, device="cpu", progress=False))
    run_export(ExportRequest(
        checkpoint=root / "run" / "best.pt", out_dir=root / "export", formats=("onnx",),
        batch_range=(1, 8, 16), opset=17, verify=True, triton_backend="onnx",
        timing_cache=None, workspace_mb=None, opt_level=None, verify_slabs=4, seed=0),
        log=lambda _m: None)
    scan = discover_cases(root / "data")[1][0].image
    return TinyRun(root, root / "data", root / "run" / "best.pt", root / "export" / "model.onnx",
                   scan)


def _run_without(blocked: tuple[str, ...], name: str, args: list[str], cwd: Path,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``dunet-<name> ARGS`` in a fresh interpreter where importing ``blocked`` fails."""
    code = (f"import sys\nfor m in {list(blocked)!r}:\n    sys.modules[m] = None\n"
            f"sys.argv = ['dunet-{name}', *{[str(a) for a in args]!r}]\n"
            f"from dunet_deploy.cli.{name} import main\nmain()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture
def run_without():
    """``run_without(("torch",), "train", [...], cwd)``: a command on a smaller install."""
    return _run_without
