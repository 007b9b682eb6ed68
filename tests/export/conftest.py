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


# ------------------------------------------------------------------ int8
#: Training steps of the int8 tests' model: 40 steps leave lesion predictions so
#: unsure (fp32 DSC ~0.24) that any perturbation moves them; 150 give DSC ~0.7.
INT8_STEPS = 150
INT8_CASES, INT8_VAL = H.INT8_CASES, H.INT8_VAL


@pytest.fixture(scope="session")
def int8_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic ATLAS R1.1 dataset made by ``dunet-synth`` (13 cases at the tiny geometry).

    Case ``i`` is ``synthesize_case(seed=i + 1)``; cases 0-5 are the model's
    training slabs, cases :data:`INT8_VAL` its validation split.
    """
    from click.testing import CliRunner

    from dunet_deploy.cli.synth import main as synth

    out = tmp_path_factory.mktemp("int8") / "data"
    shape = ",".join(map(str, H.TINY_SHAPE))
    res = CliRunner().invoke(synth, [str(out), "--cases", str(INT8_CASES), "--shape", shape,
                                     "--seed", "1"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def int8_ckpt(
    tmp_path_factory: pytest.TempPathFactory, spec32: PreprocessSpec, int8_data: Path
) -> Path:
    """A trained tiny D-UNet; its checkpoint records ``int8_data``, a split and the data's
    geometry (orientation, voxel size, grid), as dunet-train."""
    from dunet_deploy.data.geometry import measure_geometry
    from dunet_deploy.data.layouts import discover_cases

    _, cases = discover_cases(int8_data)
    ids = [c.case_id for c in cases]
    # The data are on this grid already, so the slabs equal spec32's: train_tiny's model fits.
    geometry = measure_geometry(cases)
    spec = spec32.replace(orientation=geometry["orientation"], voxel_size=geometry["voxel_size"],
                          grid_affine=tuple(geometry["grid_affine"].ravel()))
    path = tmp_path_factory.mktemp("ckpt") / "int8.pt"
    save_checkpoint(
        path,
        model=H.train_tiny(spec32, steps=INT8_STEPS),
        spec=spec,
        epoch=4,
        config={"data": str(int8_data),
                "split": {"train": ids[:6], "val": [ids[i] for i in INT8_VAL]}},
        metrics={"dsc_mean": 0.6},
    )
    return path
