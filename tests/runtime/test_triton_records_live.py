"""Records say what ran (issue 19.3) and a remote client needs no model (issue 18.5).

One real tritonserver (python backend) on free loopback ports, whose network model runs
``backend auto`` / ``precision auto`` (OpenVINO where installed: bf16 on CPUs with native
BF16, fp32 elsewhere) and which serves ``dunet``, ``dunet_spec`` and ``dunet_volume``, so
client-side and server-side clients ask the same server. What the server really runs is
what a local run with the same settings on this machine resolves to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from triton_testutils import Server, infer, model_and_volumes, write_repository

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("records_live")
    model, volumes = model_and_volumes(root, n=2)
    repo = write_repository(root, model, spec_model=True,
                            runtime={"runtime.backend": "auto", "runtime.precision": "auto",
                                     "runtime.threads": "1"})
    server = Server(["--repository", str(repo)], root / "server.log")
    try:
        yield root, model, volumes, server
    finally:
        assert server.stop() == 0, server.output()[-2000:]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_clients_record_what_the_server_runs(served) -> None:
    root, model, volumes, server = served
    local = infer(model, volumes, root / "local", "--threads", "1")
    assert local.wait(timeout=300) == 0, local.stderr.read()
    ran = _summary(root / "local")  # what backend/precision "auto" resolve to here
    assert ran["backend"] in ("openvino", "onnxruntime") and ran["precision"] != "auto"

    client = infer(model, volumes, root / "client", "--triton-url", server.grpc_url)
    assert client.wait(timeout=300) == 0, client.stderr.read()
    got = _summary(root / "client")
    assert got["backend"] == "triton" and got["precision"] == ran["precision"]
    assert got["backend_details"]["server_backend"] == ran["backend"]
    assert got["model"]["path"] == server.grpc_url  # a URL, not "grpc:/127.0.0.1:N"
    assert got["model"]["model_precision"] == "fp32"
    for case in got["cases"]:  # the serialized gRPC messages: the tensors and their framing
        tensors = case["slabs_run"] * 4 * 32 * 32 * 4
        assert tensors < case["bytes_sent"] < tensors + 1024 * -(-case["slabs_run"] // 8)
        assert case["slabs_run"] * 32 * 32 * 4 < case["bytes_received"]

    # Client-side without a local copy of the model: the server's description stands for it.
    res = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.infer", str(volumes[0]), "-o",
         str(root / "no_engine"), "--quiet", "--triton-url", server.http_url],
        capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = _summary(root / "no_engine")
    assert got["model"]["path"] == server.http_url and got["precision"] == ran["precision"]
    assert got["ok"] == 1 and got["cases"][0]["lesion_voxels"] > 0

    # Server-side over HTTP, without a local copy of the model (--engine left out).
    out = root / "server_side"
    res = subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.infer", *map(str, volumes), "-o", str(out),
         "--quiet", "--triton-url", server.http_url, "--server-side", "--min-lesion-mm3",
         "100000"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = _summary(out)
    assert got["precision"] == ran["precision"]
    assert got["server"]["backend"] == ran["backend"] and got["server"]["precision"] == ran[
        "precision"]
    assert got["model"]["path"] == server.http_url
    for case in got["cases"]:
        assert case["server"]["backend"] == ran["backend"]  # resolved, not "auto"
        # the run's option was applied there: the volume's one large component removed
        assert case["server"]["inference"]["min_lesion_mm3"] == 100000.0
        assert case["server"]["inference"]["source"]["min_lesion_mm3"] == "argument"
        assert case["lesion_voxels"] == 0 and case["server"]["lesions_removed"] == 1
    assert got["options"]["min_lesion_mm3"] == 100000.0 and got["options_fingerprint"]
