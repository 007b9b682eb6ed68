"""The tritonserver launcher and the clients' checks that need no running server."""

from __future__ import annotations

import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.tritonserver import Endpoints, check_ports_free, server_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_busy_and_duplicate_ports() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        http, grpc = _free_port(), _free_port()
        with pytest.raises(DunetError, match=rf"^port {busy} \(--metrics-port\) on 127.0.0.1 "
                                             r"is already in use$"):
            check_ports_free(Endpoints("127.0.0.1", http, grpc, busy))
    with pytest.raises(DunetError, match="given to both --http-port and --grpc-port"):
        check_ports_free(Endpoints("127.0.0.1", http, http, busy))


def test_server_env_lets_the_base_interpreter_import_our_package(tmp_path: Path) -> None:
    """The python stub embeds the *base* libpython, not our venv: PYTHONPATH must do it."""
    env = server_env({"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": "/opt/x"}, libs=tmp_path)
    libdir = sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].split(":") == [libdir, str(tmp_path), "/opt/x"]
    base = getattr(sys, "_base_executable", sys.executable)
    code = "import dunet_deploy.serving.volume_model, nibabel, numpy; print('ok')"
    res = subprocess.run([base, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_clients_with_nothing_listening_fail_at_once() -> None:
    """Issue 19.8: a closed port is "connection refused" now, not a 60 s model-ready wait."""
    pytest.importorskip("tritonclient.http")
    from dunet_deploy.runtime.triton_client import ServerSideClient, TritonRunner

    port = _free_port()  # nothing listens there
    for cls, url in ((ServerSideClient, f"http://127.0.0.1:{port}"),
                     (TritonRunner, f"grpc://127.0.0.1:{port}")):
        t0 = time.monotonic()
        with pytest.raises(DunetError, match=rf"^Triton server {url}: connection refused on "
                                             rf"127.0.0.1:{port} \(is dunet-serve running"):
            cls(url)  # the default model-ready wait is 60 s
        assert time.monotonic() - t0 < 20


def test_infer_with_nothing_listening_is_one_line_at_once(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("tritonclient.grpc")
    sys.path.insert(0, str(Path(__file__).parent))
    from runtime_testutils import export_tiny_onnx, write_volume

    model = tmp_path / "model.onnx"
    export_tiny_onnx(model)
    scan = write_volume(tmp_path / "scan é.nii.gz")
    port = _free_port()
    for extra in ([], ["--server-side"]):
        url = f"grpc://127.0.0.1:{port}"
        t0 = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model), str(scan),
             "-o", str(tmp_path / "out"), "--triton-url", url, "--quiet", *extra],
            capture_output=True, text=True, timeout=120)
        assert time.monotonic() - t0 < 20 + 10  # + the interpreter's start-up
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"error: Triton server {url}: connection refused on 127.0.0.1:{port} (is "
            "dunet-serve running there? check --triton-url)"]


def test_server_side_needs_a_url(tmp_path: Path) -> None:
    from dunet_deploy.cli import infer

    res = CliRunner().invoke(infer.main, ["--engine", str(tmp_path / "m.onnx"),
                                          str(tmp_path / "a.nii.gz"), "-o", str(tmp_path / "o"),
                                          "--server-side"])
    assert res.exit_code == 2
    assert res.output.strip() == ("error: --server-side needs --triton-url URL (the dunet-serve "
                                  "server that runs the pipeline)")
    assert not (tmp_path / "o").exists()


def test_serve_needs_exactly_one_source(tmp_path: Path) -> None:
    from dunet_deploy.cli import serve

    for args in ([], ["--engine", "m.onnx", "--repository", str(tmp_path)]):
        res = CliRunner().invoke(serve.main, args)
        assert res.exit_code == 2
        assert res.output.strip() == (
            "error: give exactly one of --engine MODEL and --repository DIR")
    res = CliRunner().invoke(serve.main, ["--repository", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no such model repository folder" in res.output


def test_serving_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import dunet_deploy.serving.volume_model, dunet_deploy.serving.network_model\n"
        "import dunet_deploy.serving.spec_model, dunet_deploy.runtime.serve\n"
        "import dunet_deploy.runtime.tritonserver, dunet_deploy.runtime.triton_client\n"
        "import dunet_deploy.cli.serve, dunet_deploy.export.triton_repo\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
        "print('torch-free')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "torch-free", res.stderr
