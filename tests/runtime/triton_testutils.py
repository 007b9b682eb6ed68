"""``dunet-serve`` in a subprocess on free loopback ports, and ``dunet-infer`` clients.

Every server is waited for with a bounded loop and always stopped (the callers use
fixtures with ``finally``); the whole process group is killed if SIGTERM is not enough.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 120


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
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
    """``dunet-serve ARGS`` with free ports; ``wait=True`` waits for its ``ready`` line."""

    def __init__(self, args: list[str], log: Path, wait: bool = True,
                 ports: list[int] | None = None) -> None:
        self.http, self.grpc, self.metrics = ports or free_ports(3)
        self.log_path = log
        self._log = open(log, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dunet_deploy.cli.serve", *args,
             "--http-port", str(self.http), "--grpc-port", str(self.grpc),
             "--metrics-port", str(self.metrics)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if wait:
            self.wait_ready()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(line.startswith("ready ") for line in self.output().splitlines()):
                return
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"dunet-serve did not become ready:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """Kill the server and its tritonserver child at once (a crash, not a shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop with ``sig`` (SIGTERM or SIGINT, as docker stop / Ctrl-C do); its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        else:  # make sure no tritonserver of this group outlives the test
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def infer(model: Path, inputs: list[Path], out: Path, *extra: str) -> subprocess.Popen[str]:
    """``dunet-infer --engine MODEL INPUTS -o OUT --quiet EXTRA`` in a subprocess."""
    return subprocess.Popen(
        [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model),
         *map(str, inputs), "-o", str(out), "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def write_repository(root: Path, model: Path, *, batch_size: int = 8,
                     runtime: dict[str, str] | None = None, spec_model: bool = False) -> Path:
    """What ``dunet-export --format triton --triton-backend python`` writes, from a model.

    ``runtime`` replaces the network's runtime parameters (default: ONNX Runtime, one
    thread); ``spec_model`` adds ``dunet_spec`` (what ``dunet-serve --engine`` serves), so
    one server takes client-side and server-side clients.
    """
    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.triton_repo import (
        write_spec_model,
        write_triton_repo,
        write_volume_model,
    )

    info = read_artifact_info(model)
    repo = root / "repo"
    write_triton_repo(repo, model, info, backend="python", max_batch_size=16,
                      preferred_batch_sizes=(8, 16),
                      runtime=runtime or {"runtime.backend": "onnxruntime",
                                          "runtime.threads": "1"})
    write_volume_model(repo, info, batch_size=batch_size)
    if spec_model:
        write_spec_model(repo, info, "dunet_spec")
    return repo


def model_and_volumes(root: Path, n: int = 4, seed: int = 0) -> tuple[Path, list[Path]]:
    """A tiny ONNX model and ``n`` synthetic volumes under ``root``."""
    from runtime_testutils import export_tiny_onnx, write_volume

    model = root / "model.onnx"
    export_tiny_onnx(model, seed=seed)
    return model, [write_volume(root / f"case{i}.nii.gz", seed=seed * 10 + i) for i in range(n)]
