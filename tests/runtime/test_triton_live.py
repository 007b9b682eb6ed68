"""A real Triton server (dunet-serve via PyTriton) on loopback, driven by dunet-infer clients.

Every server is started on free ports with a bounded wait and always stopped;
the clients' requests are bounded by the volumes they segment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_testutils import export_tiny_onnx, write_volume

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 120


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Server:
    """``dunet-serve`` in a subprocess, waited for until it prints its ready line."""

    def __init__(self, model: Path, log: Path, extra: list[str] | None = None) -> None:
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dunet_deploy.cli.serve", "--engine", str(model),
             "--backend", "onnxruntime", "--threads", "1",
             "--http-port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(self.metrics), *(extra or [])],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if any(line.startswith("ready ") for line in log.read_text().splitlines()):
                return
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"dunet-serve did not become ready:\n{log.read_text()[-3000:]}")

    def kill(self) -> None:
        """Kill the server and its tritonserver child at once (a crash, not a shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()
        return self.proc.returncode


def _infer(model: Path, inputs: list[Path], out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model),
         *map(str, inputs), "-o", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    model = root / "model.onnx"
    export_tiny_onnx(model)
    volumes = [write_volume(root / f"case{i}.nii.gz", seed=i) for i in range(4)]
    server = Server(model, root / "server.log")
    try:
        yield root, model, volumes, server
    finally:
        rc = server.stop()
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


def test_server_killed_mid_run(tmp_path):
    model = tmp_path / "model.onnx"
    export_tiny_onnx(model, seed=1)
    volumes = [write_volume(tmp_path / f"v{i}.nii.gz", seed=10 + i) for i in range(12)]
    server = Server(model, tmp_path / "server.log", extra=["--max-queue-delay-us", "0"])
    try:
        out = tmp_path / "out"
        client = _infer(model, volumes, out, "--triton-url", f"grpc://127.0.0.1:{server.grpc}",
                        "--batch-size", "1")
        deadline = time.monotonic() + 120
        # Kill once the client is known to be mid-run: its first mask exists.
        while time.monotonic() < deadline and not list(out.glob("*_mask.nii.gz")):
            assert client.poll() is None, client.stderr.read()
            time.sleep(0.05)
        server.kill()
        rc = client.wait(timeout=300)
        err = client.stderr.read()
    finally:
        server.stop()
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("error: ") for ln in lines), err
    assert any("Triton server grpc://127.0.0.1" in ln for ln in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] >= 1
    written = {p.name for p in out.iterdir()}
    # Only complete outputs: a mask per ok case, no temporary leftovers.
    ok = [c for c in summary["cases"] if c["status"] == "ok"]
    assert written == {"summary.json"} | {Path(c["mask"]).name for c in ok}
