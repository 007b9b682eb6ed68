"""``dunet-serve --engine`` (a real tritonserver, python backend) driven by dunet-infer clients.

Every server is started on free ports with a bounded wait and always stopped;
the clients' requests are bounded by the volumes they segment. The server-killed and
first-ready tests of this mode are in test_triton_repository_live.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from triton_testutils import Server, infer, model_and_volumes

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 120


def _infer(model: Path, inputs: list[Path], out: Path, *extra: str) -> subprocess.Popen[str]:
    return infer(model, inputs, out, *extra)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    model, volumes = model_and_volumes(root)
    server = Server(["--engine", str(model), "--backend", "onnxruntime", "--threads", "1"],
                    root / "server.log")
    try:
        yield root, model, volumes, server
    finally:
        rc = server.stop(signal.SIGINT)  # Ctrl-C; the repository tests stop with SIGTERM
        log = server.log_path.read_text()[-2000:]
        assert rc == 0, f"server did not stop cleanly (rc={rc}):\n{log}"


def test_two_clients_match_local_inference(served):
    root, model, volumes, server = served
    local = _infer(model, volumes, root / "local", "--backend", "onnxruntime")
    assert local.wait(timeout=300) == 0, local.stderr.read()
    clients = [
        _infer(model, volumes[:2], root / "http", "--triton-url", f"http://127.0.0.1:{server.http}"),
        _infer(model, volumes[2:], root / "grpc", "--triton-url", f"grpc://127.0.0.1:{server.grpc}"),
    ]
    for c in clients:
        assert c.wait(timeout=300) == 0, c.stderr.read()
    for out, vols in ((root / "http", volumes[:2]), (root / "grpc", volumes[2:])):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ok"] == 2 and summary["backend"] == "triton"
        for case in summary["cases"]:  # float32 slabs out [N, 4, 32, 32], probabilities back
            # on the wire: the tensors plus each request's (at most 8 slabs) framing
            requests = -(-case["slabs_run"] // 8)
            sent, received = case["slabs_run"] * 4 * 32 * 32 * 4, case["slabs_run"] * 32 * 32 * 4
            assert sent < case["bytes_sent"] < sent + 1024 * requests
            assert received < case["bytes_received"] < received + 1024 * requests
        for v in vols:
            name = v.name.removesuffix(".nii.gz")
            remote = nib.load(out / f"{name}_mask.nii.gz")
            ref = nib.load(root / "local" / f"{name}_mask.nii.gz")
            assert np.array_equal(np.asarray(remote.dataobj), np.asarray(ref.dataobj))
            assert np.allclose(remote.affine, ref.affine)
            assert np.asarray(ref.dataobj).dtype == np.uint8


def test_client_refuses_a_server_with_another_spec(served, tmp_path):
    _, _, volumes, server = served
    from runtime_testutils import tiny_spec

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    other = tmp_path / "other.onnx"
    spec = tiny_spec().replace(threshold=0.4)
    export_onnx(create_model("dunet", base_filters=8).eval(), spec, other)
    c = _infer(other, volumes[:1], tmp_path / "out", "--triton-url",
               f"http://127.0.0.1:{server.http}")
    assert c.wait(timeout=120) == 2
    err = c.stderr.read().strip()
    assert err.startswith("error:") and "another preprocessing spec" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_bad_url_is_one_line_error(served, tmp_path):
    _, model, volumes, _ = served
    c = _infer(model, volumes[:1], tmp_path / "o", "--triton-url", "ftp://127.0.0.1:1")
    assert c.wait(timeout=60) == 2
    assert "expected http://HOST:PORT or grpc://HOST:PORT" in c.stderr.read()
