"""mypy checks the TensorRT builder against tensorrt-stubs with real types, not Any."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "dunet_deploy" / "export" / "tensorrt_build.py"


@pytest.mark.slow
def test_builder_is_checked_against_the_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    import trt_stubs  # tests/trt_stubs.py

    if trt_stubs.stubs_site() is None:
        pytest.skip("tensorrt-stubs not installed")
    cfg = trt_stubs.build(tmp_path / "typings")
    # A copy of the module that reveals the types mypy infers inside build_engine
    # and misuses one API on purpose: both prove the stubs are really used.
    probe = tmp_path / "probe_trt.py"
    src = MODULE.read_text()
    anchor = "    network = builder.create_network(flags)\n"
    assert anchor in src
    probe.write_text(
        src.replace(
            anchor,
            anchor + "    reveal_type(builder)\n    reveal_type(network)\n"
            "    config_probe = builder.create_builder_config()\n"
            "    reveal_type(config_probe)\n"
            "    config_probe.set_memory_pool_limit('workspace', 1)\n",
        )
    )
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(cfg),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports=silent",
            str(MODULE),
            str(probe),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    out = res.stdout + res.stderr
    module_errors = [
        line for line in out.splitlines() if "tensorrt_build.py:" in line and "error:" in line
    ]
    assert module_errors == [], out
    assert 'Revealed type is "tensorrt_bindings.tensorrt.Builder"' in out, out
    assert 'Revealed type is "tensorrt_bindings.tensorrt.INetworkDefinition"' in out, out
    assert 'Revealed type is "tensorrt_bindings.tensorrt.IBuilderConfig"' in out, out
    assert "set_memory_pool_limit" in out and "arg-type" in out, out  # misuse caught
