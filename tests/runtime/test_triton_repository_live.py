"""``dunet-serve --repository`` (a real tritonserver, python backend) and ``--server-side`` clients.

One server per module (fixture) on free loopback ports, always stopped; two more
short-lived servers for the start-up tests. Tiny model (base_filters=8, 32 px slabs,
40×48×24 volumes).
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runtime_testutils import export_tiny_onnx, write_volume
from triton_testutils import Server, free_ports, infer, model_and_volumes, write_repository

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


def header_only(shape: tuple[int, ...]) -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr.set_sform(np.eye(4), code=2)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0\0\0\0"


def write_bomb(path: Path, gib: int = 2) -> Path:
    """A ~1 MB/GiB ``.nii.gz`` (one zeros member repeated) whose header claims 4096²×1024."""
    zeros = gzip.compress(bytes(64 << 20), compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(header_only((4096, 4096, 1024)), mtime=0))
        for _ in range((gib << 30) // (64 << 20)):
            f.write(zeros)
    return path


def mask_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo_live")
    model, volumes = model_and_volumes(root)
    repo = write_repository(root, model)
    server = Server(["--repository", str(repo)], root / "server.log")
    try:
        yield root, model, volumes, server
    finally:
        rc = server.stop()
        out = server.output()
        assert rc == 0, f"server did not stop cleanly (rc={rc}):\n{out[-2000:]}"
        # Quiet by default: our two lines, none of Triton's start-up log.
        assert [ln.split(" ", 1)[0] for ln in out.splitlines()] == ["ready", "stopped"], out


def test_ready_line_lists_every_model(served):
    _, _, _, server = served
    doc = json.loads(server.output().splitlines()[0].removeprefix("ready "))
    assert doc["models"] == ["dunet", "dunet_volume"]
    assert doc["http"] == server.http_url and doc["grpc"] == server.grpc_url


def test_two_server_side_clients_match_local_inference(served):
    root, model, volumes, server = served
    local = infer(model, volumes, root / "local", "--backend", "onnxruntime",
                  "--precision", "fp32", "--threads", "1")
    assert local.wait(timeout=300) == 0, local.stderr.read()
    clients = {
        "http": infer(model, volumes[:2], root / "http", "--triton-url", server.http_url,
                      "--server-side"),
        "grpc": infer(model, volumes[2:], root / "grpc", "--triton-url", server.grpc_url,
                      "--server-side"),
    }
    for c in clients.values():
        assert c.wait(timeout=300) == 0, c.stderr.read()
    for proto, vols in (("http", volumes[:2]), ("grpc", volumes[2:])):
        summary = json.loads((root / proto / "summary.json").read_text())
        assert summary["ok"] == 2 and summary["backend"] == "triton-server-side"
        for v, case in zip(vols, summary["cases"], strict=True):
            name = v.name.removesuffix(".nii.gz")
            remote = nib.load(str(root / proto / f"{name}_mask.nii.gz"))
            ref = nib.load(str(root / "local" / f"{name}_mask.nii.gz"))
            assert np.array_equal(np.asarray(remote.dataobj), np.asarray(ref.dataobj))
            assert remote.get_data_dtype() == np.uint8
            # Marked as ours like a local mask, so a later run never takes it for a scan.
            assert remote.header["descrip"].item() == ref.header["descrip"].item() == \
                b"dunet-deploy mask"
            np.testing.assert_allclose(remote.affine, ref.affine)
            assert case["bytes_sent"] > v.stat().st_size  # the file and its request framing
            assert 0 < case["bytes_received"] < v.stat().st_size
            assert case["server"]["backend"] == "onnxruntime"
            assert case["lesion_voxels"] == int(np.count_nonzero(np.asarray(ref.dataobj)))


def test_server_side_applies_the_runs_options(served, tmp_path):
    """--tta and --batch-size travel with each file; a bad value from any client is refused."""
    import tritonclient.grpc as tg

    _, model, volumes, server = served
    flags = ("--tta", "flip", "--batch-size", "3")
    local = infer(model, volumes[:2], tmp_path / "local", "--backend", "onnxruntime",
                  "--precision", "fp32", "--threads", "1", *flags)
    remote = infer(model, volumes[:2], tmp_path / "remote", "--triton-url", server.grpc_url,
                   "--server-side", *flags)
    assert local.wait(timeout=300) == 0, local.stderr.read()
    assert remote.wait(timeout=300) == 0, remote.stderr.read()
    summary = json.loads((tmp_path / "remote" / "summary.json").read_text())
    for v, case in zip(volumes[:2], summary["cases"], strict=True):
        name = v.name.removesuffix(".nii.gz")
        assert np.array_equal(mask_of(tmp_path / "remote" / f"{name}_mask.nii.gz"),
                              mask_of(tmp_path / "local" / f"{name}_mask.nii.gz"))
        assert case["server"]["inference"]["tta"] == "flip"
        assert case["server"]["inference"]["source"]["tta"] == "argument"
        assert case["server"]["batch_size"] == 3
    assert summary["options"]["tta"] == "flip" and summary["options"]["batch_size"] == 3

    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    data = tg.InferInput("nifti", [1], "BYTES")
    data.set_data_from_numpy(np.array([volumes[0].read_bytes()], dtype=np.object_))
    for sent, message in (('{"tta": "sideways"}', "case.nii: tta 'sideways': choose one of"),
                          ('{"save_prob": true}', "case.nii: save_prob True: not possible "
                                                  "server-side"),
                          ("{oops", "case.nii: request parameter 'dunet_options': not a JSON")):
        with pytest.raises(tg.InferenceServerException) as err:
            client.infer("dunet_volume", [data], request_id="case.nii",
                         parameters={"dunet_options": sent})
        assert message in err.value.message(), err.value.message()


def test_corrupt_file_fails_alone(served, tmp_path):
    root, model, volumes, server = served
    good = volumes[0]
    blob = good.read_bytes()
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "out"
    c = infer(model, [bad, good], out, "--triton-url", server.grpc_url, "--server-side")
    assert c.wait(timeout=300) == 1
    err = c.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: "), err
    assert "truncated or corrupt" in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["case0_mask.nii.gz", "summary.json"]
    assert np.array_equal(mask_of(out / "case0_mask.nii.gz"),
                          mask_of(root / "local" / "case0_mask.nii.gz"))


def test_bomb_and_absurd_header_refused_while_a_good_request_completes(served, tmp_path):
    root, model, volumes, server = served
    bomb = write_bomb(tmp_path / "bomb.nii.gz")
    huge = tmp_path / "huge.nii"
    huge.write_bytes(header_only((10_000, 10_000, 10_000)) + bytes(4096))
    good_client = infer(model, volumes[1:2], tmp_path / "good", "--triton-url", server.http_url,
                        "--server-side")
    bad_client = infer(model, [bomb, huge], tmp_path / "bad", "--triton-url", server.grpc_url,
                       "--server-side")
    assert bad_client.wait(timeout=300) == 1
    assert good_client.wait(timeout=300) == 0, good_client.stderr.read()
    err = bad_client.stderr.read().strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"error: {bomb}: header declares 4096x4096x1024 uint8")
    assert err[1].startswith(f"error: {huge}: header declares 10000x10000x10000")
    assert all("over the limit" in line for line in err)
    assert np.array_equal(mask_of(tmp_path / "good" / "case1_mask.nii.gz"),
                          mask_of(root / "local" / "case1_mask.nii.gz"))
    # The server is still serving.
    with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=5) as r:
        assert r.status == 200


def test_wrong_spec_and_not_a_server_side_model(served, tmp_path):
    _, _, volumes, server = served
    from runtime_testutils import tiny_spec

    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.models import create_model

    other = tmp_path / "other.onnx"
    export_onnx(create_model("dunet", base_filters=8).eval(), tiny_spec().replace(threshold=0.4),
                other)
    c = infer(other, volumes[:1], tmp_path / "o", "--triton-url", server.http_url,
              "--server-side")
    assert c.wait(timeout=120) == 2
    err = c.stderr.read().strip()
    assert err.startswith("error:") and "another preprocessing spec" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


def _serve_repository(repo: Path, ports: list[int],
                      *extra: str) -> subprocess.CompletedProcess[str]:
    http, grpc, metrics = ports
    return subprocess.run(
        [sys.executable, "-m", "dunet_deploy.cli.serve", "--repository", str(repo),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         *extra],
        capture_output=True, text=True, timeout=180,
    )


def test_busy_port_is_an_immediate_one_line_error(tmp_path):
    ports = free_ports(3)
    res = _serve_repository(tmp_path, ports)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"error: {tmp_path}: not a Triton model repository (no */config.pbtxt); write one "
        "with dunet-export --format triton")
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text('name: "m"\nbackend: "python"\n')
    for busy, option in zip(ports, ("--http-port", "--grpc-port", "--metrics-port"),
                            strict=True):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", busy))
            taken.listen()
            t0 = time.monotonic()
            res = _serve_repository(tmp_path, ports)
        assert res.returncode == 2 and time.monotonic() - t0 < 20
        assert res.stderr.strip() == (
            f"error: port {busy} ({option}) on 127.0.0.1 is already in use"), res.stderr
        assert res.stdout == ""


@pytest.mark.parametrize("verbose", [False, True])
def test_model_that_fails_to_load_is_one_line(tmp_path, verbose):
    model = tmp_path / "model.onnx"
    export_tiny_onnx(model)
    repo = write_repository(tmp_path, model, batch_size=32)  # > the network's max batch 16
    res = _serve_repository(repo, free_ports(3), *(["--verbose"] if verbose else []))
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: tritonserver exited with code"), err
    assert "volume.batch_size 32 exceeds the max_batch_size 16" in err[-1]
    triton_log = [ln for ln in (res.stdout + res.stderr).splitlines()
                  if ln[:1] in "IWE" and ln[1:5].isdigit()]
    if verbose:  # Triton's own log, shown as it runs
        assert any("failed to load 'dunet_volume'" in ln for ln in triton_log), res.stdout
    else:
        assert len(err) == 1 and not triton_log and res.stdout == ""


@pytest.mark.parametrize("mode", ["repository", "engine"])
def test_client_started_at_first_ready_succeeds_then_server_killed(mode, tmp_path):
    model = tmp_path / "model.onnx"
    export_tiny_onnx(model, seed=1)
    volumes = [write_volume(tmp_path / f"v{i}.nii.gz", seed=10 + i) for i in range(10)]
    if mode == "repository":
        args, extra = ["--repository", str(write_repository(tmp_path, model))], ["--server-side"]
        models = ["dunet", "dunet_volume"]
    else:
        args = ["--engine", str(model), "--backend", "onnxruntime", "--threads", "1"]
        extra, models = ["--batch-size", "1"], ["dunet", "dunet_spec"]
    server = Server(args, tmp_path / "server.log", wait=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.proc.poll() is None, server.output()
            try:
                with urllib.request.urlopen(f"{server.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.05)
        for name in models:  # the first 200 already means every model is loaded
            with urllib.request.urlopen(f"{server.http_url}/v2/models/{name}/ready",
                                        timeout=2) as r:
                assert r.status == 200
        first = infer(model, volumes[:1], tmp_path / "first", "--triton-url", server.grpc_url,
                      *extra)
        assert first.wait(timeout=300) == 0, first.stderr.read()

        out = tmp_path / "out"
        client = infer(model, volumes, out, "--triton-url", server.grpc_url, *extra)
        deadline = time.monotonic() + 120
        # Kill once the client is known to be mid-run: its first mask exists.
        while time.monotonic() < deadline and not list(out.glob("*_mask.nii.gz")):
            assert client.poll() is None, client.stderr.read()
            time.sleep(0.02)
        server.kill()
        rc = client.wait(timeout=300)
        err = client.stderr.read()
    finally:
        server.stop()
    assert rc == 1, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("error: ") for ln in lines), err
    assert any(f"Triton server {server.grpc_url}" in ln for ln in lines), err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] >= 1
    ok = [c for c in summary["cases"] if c["status"] == "ok"]
    # Only complete outputs: a mask per ok case, no temporary leftovers.
    assert {p.name for p in out.iterdir()} == {"summary.json"} | {Path(c["mask"]).name
                                                                  for c in ok}
