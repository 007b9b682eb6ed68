"""Malformed NIfTI headers sent to a live ``dunet_volume`` (real tritonserver, python backend).

Every file of the battery (tests/malformed_nifti.py) must come back to the client as
one line "<file>: <reason>", while the server goes on serving a good file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import malformed_nifti
from triton_testutils import Server, infer, model_and_volumes, write_repository

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


def test_every_malformed_header_is_a_named_one_line_error(tmp_path: Path) -> None:
    model, volumes = model_and_volumes(tmp_path, n=1)
    cases = malformed_nifti.battery()
    inputs = []
    for case, (blob, _) in sorted(cases.items()):
        inputs.append(tmp_path / "in" / f"{case}.nii")
        inputs[-1].parent.mkdir(exist_ok=True)
        inputs[-1].write_bytes(blob)
    server = Server(["--repository", str(write_repository(tmp_path, model))],
                    tmp_path / "server.log")
    try:
        for url in (server.grpc_url, server.http_url):
            out = tmp_path / url.split(":")[0]
            client = infer(model, [*inputs, volumes[0]], out, "--triton-url", url,
                           "--server-side")
            assert client.wait(timeout=300) == 1
            err = client.stderr.read()
            lines = err.strip().splitlines()
            assert "Traceback" not in err and len(lines) == len(cases), err
            for line, path in zip(lines, inputs, strict=True):
                # the server's own "<name>: <reason>", re-attached to the client's path
                assert line.startswith(f"error: {path}: "), line
                assert cases[path.stem][1] in line and "dunet_volume on" in line, line
            summary = json.loads((out / "summary.json").read_text())
            assert (summary["ok"], summary["failed"]) == (1, len(cases))
            assert sorted(p.name for p in out.iterdir()) == ["case0_mask.nii.gz", "summary.json"]
    finally:
        assert server.stop() == 0, server.output()[-2000:]
