"""A live ``dunet_volume`` (real tritonserver, python backend): hostile headers, wire bytes.

Every file of the battery (tests/malformed_nifti.py) must come back to the client as
one line "<file>: <reason>", while the server goes on serving a good file; the bytes
the server-side client reports are what a loopback proxy saw on the wire.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import malformed_nifti
from triton_testutils import Server, infer, model_and_volumes, write_repository
from wire_proxy import Proxy, grpc_messages, http_bodies

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("volume_live")
    model, volumes = model_and_volumes(root, n=2)
    server = Server(["--repository", str(write_repository(root, model))], root / "server.log")
    try:
        yield model, volumes, server
    finally:
        assert server.stop() == 0, server.output()[-2000:]


def test_every_malformed_header_is_a_named_one_line_error(served, tmp_path: Path) -> None:
    model, volumes, server = served
    cases = malformed_nifti.battery()
    inputs = []
    for case, (blob, _) in sorted(cases.items()):
        inputs.append(tmp_path / "in" / f"{case}.nii")
        inputs[-1].parent.mkdir(exist_ok=True)
        inputs[-1].write_bytes(blob)
    for url in (server.grpc_url, server.http_url):
        out = tmp_path / url.split(":")[0]
        client = infer(model, [*inputs, volumes[0]], out, "--triton-url", url, "--server-side")
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


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bytes_reported_are_the_bytes_on_the_wire(served, tmp_path: Path, protocol: str) -> None:
    """summary.json's bytes_sent/received per case against a proxy that parses the traffic."""
    model, volumes, server = served
    proxy = Proxy(("127.0.0.1", server.http if protocol == "http" else server.grpc))
    try:
        out = tmp_path / "out"
        client = infer(model, volumes, out, "--triton-url", f"{protocol}://127.0.0.1:{proxy.port}",
                       "--server-side")
        assert client.wait(timeout=300) == 0, client.stderr.read()
    finally:
        proxy.close()
    cases = json.loads((out / "summary.json").read_text())["cases"]
    reported = Counter((c["bytes_sent"], c["bytes_received"]) for c in cases)
    seen: Counter[tuple[int, int]] = Counter()
    for up, down in proxy.connections:
        if not up:  # the client's reachability probe connects and closes without a byte
            continue
        if protocol == "http":
            pairs = zip(http_bodies(bytes(up)), http_bodies(bytes(down)), strict=True)
            seen.update((req[1], res[1]) for req, res in pairs
                        if req[0].startswith("POST /v2/models/dunet_volume/infer"))
        else:
            sent, received = grpc_messages(bytes(up), True), grpc_messages(bytes(down), False)
            # the volume requests are the streams carrying a file (the rest are a few bytes)
            seen.update((n, received[sid]) for sid, n in sent.items() if n > 4096)
    assert reported == seen and len(cases) == len(volumes)
    for case, volume in zip(cases, volumes, strict=True):  # the file plus the request's framing
        assert case["bytes_sent"] > volume.stat().st_size
