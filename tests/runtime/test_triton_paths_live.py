"""``dunet-serve`` from real-world paths (issue 19.2): spaces and ``é`` in the repository or
model path, served by a real tritonserver on free loopback ports and used by ``dunet-infer``.

Triton's python backend starts its stub with ``bash -c`` on unquoted paths and the stub's
Python has an ASCII file-system encoding; ``dunet-serve`` must serve such paths anyway.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from triton_testutils import Server, infer, model_and_volumes, write_repository

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("folder", "mode"), [("my dir", "repository"),
                                              ("repo_é", "repository"),
                                              ("uni_é", "engine")])
def test_serve_from_a_path_with_spaces_or_accents(tmp_path: Path, folder: str, mode: str) -> None:
    model, (scan,) = model_and_volumes(tmp_path, n=1)
    local = tmp_path / "local"
    proc = infer(model, [scan], local)
    assert proc.wait(timeout=300) == 0, proc.communicate()[1]

    where = tmp_path / folder
    where.mkdir()
    if mode == "repository":
        target = write_repository(where, model).rename(where / "triton")
        args, extra = ["--repository", str(target)], ["--server-side"]
    else:
        target = where / "model.onnx"
        target.write_bytes(model.read_bytes())
        args, extra = ["--engine", str(target), "--backend", "onnxruntime",
                       "--precision", "fp32"], []
    server = Server(args, tmp_path / "serve.log")
    try:
        out = tmp_path / "served"
        proc = infer(model, [scan], out, "--triton-url", server.grpc_url, *extra)
        assert proc.wait(timeout=300) == 0, proc.communicate()[1]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "Traceback" not in server.output()
    (mask,) = sorted(out.glob("*_mask.nii.gz"))
    expected = np.asarray(nib.load(str(local / mask.name)).dataobj)
    assert np.array_equal(np.asarray(nib.load(str(mask)).dataobj), expected)
