"""Fixtures of the export tests: tiny D-UNets (base_filters=8) at 32×32 slabs."""

from __future__ import annotations

from pathlib import Path

import export_helpers
import pytest
import torch

from dunet_deploy.models import create_model
from dunet_deploy.spec import PreprocessSpec
from dunet_deploy.training.checkpoint import save_checkpoint

H = export_helpers  # tests/export_helpers.py (tests/ is on sys.path through its conftest)


@pytest.fixture(scope="session")
def spec32() -> PreprocessSpec:
    return H.tiny_spec()


@pytest.fixture(scope="session")
def trained_tiny(spec32: PreprocessSpec) -> torch.nn.Module:
    return H.train_tiny(spec32)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, spec32: PreprocessSpec) -> Path:
    """A checkpoint of an untrained tiny D-UNet (mechanics tests)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(
        path,
        model=create_model("dunet", base_filters=8),
        spec=spec32,
        epoch=3,
        metrics={"dice": 0.25},
    )
    return path


@pytest.fixture(scope="session")
def trained_ckpt(
    tmp_path_factory: pytest.TempPathFactory, spec32: PreprocessSpec, trained_tiny: torch.nn.Module
) -> Path:
    """A checkpoint of the trained tiny D-UNet (numerics tests)."""
    path = tmp_path_factory.mktemp("ckpt") / "trained.pt"
    save_checkpoint(path, model=trained_tiny, spec=spec32, epoch=1, metrics={"dice": 0.5})
    return path


@pytest.fixture(scope="session")
def tiny_onnx(
    tmp_path_factory: pytest.TempPathFactory, spec32: PreprocessSpec, trained_tiny: torch.nn.Module
) -> Path:
    """FP32 ONNX of the trained tiny D-UNet."""
    from dunet_deploy.export.onnx_export import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(trained_tiny, spec32, path)
    return path
