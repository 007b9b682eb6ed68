"""A real two-node Ray cluster on loopback for the tests (``ray start`` as a user runs it).

Used through the ``ray_cluster`` fixture of ``tests/conftest.py``: a head node
and one more node process, each with one CPU, on addresses of the loopback range
(127.0.0.2 and 127.0.0.3) and free ports; both are stopped through their process groups (never
``ray stop``, which would end every Ray process on the machine).

``start_cluster(stack, nodes=1)`` starts the head alone, with two CPUs: what a user with
one 2-core machine runs (``benchmarks/ray_overhead.py --nodes 1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

READY = "Ray runtime started"
#: The nodes' addresses: loopback (127.0.0.0/8), one per node as on a real cluster.
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"


@dataclass(frozen=True)
class RayCluster:
    """A running cluster: ``address`` for ``ray.init`` / ``ClusterOptions(address=...)``."""

    address: str
    temp_dir: Path
    logs: tuple[Path, ...]
    #: Each node's process group (= session): the node and every Ray process it started.
    sessions: tuple[int, ...] = ()


_GIVEN: set[int] = set()


def free_port() -> int:
    """A TCP port free on the loopback addresses right now, never one this process got before.

    (The kernel may hand out a just-released port again: two of one node's ports
    would then collide, and ``ray start`` refuses them.)
    """
    while True:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def _ports(*names: str) -> list[str]:
    args = []
    for name in names:
        args += [f"--{name}", str(free_port())]
    return args


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if READY in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"ray start not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group, then SIGKILL what is left after a few seconds."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # `ray start --block` is gone; its services may linger in the group a moment.
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_cluster(stack: ExitStack, timeout: float = 120.0,
                  object_store_mb: int | None = 100, nodes: int = 2,
                  num_cpus: int | None = None) -> RayCluster:
    """Start a head and one more node (or the head alone); ``stack`` stops them on exit.

    (and removes their files).

    ``object_store_mb``: each node's object store; ``None``: Ray's default (30 % of the
    memory). The tests' volumes are small; a full-size volume's slabs and probabilities
    take ~65 MB, which a 100 MB store spills to disk, so the benchmark takes Ray's default.
    ``nodes``: 2 (the head and one more node) or 1 (the head alone); ``num_cpus``: each
    node's CPUs, by default 2 ÷ ``nodes`` (one each on two nodes, two on one).
    """
    if nodes not in (1, 2):
        raise ValueError(f"nodes must be 1 or 2, not {nodes}")
    cpus = num_cpus if num_cpus is not None else 2 // nodes
    ray = str(Path(sys.executable).with_name("ray"))
    # Short: Ray's unix sockets live under it (a socket path holds at most 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="dray", dir="/tmp"))
    stack.callback(shutil.rmtree, temp, True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    common = ["--block", "--num-cpus", str(cpus), "--disable-usage-stats"]
    if object_store_mb is not None:
        common += ["--object-store-memory", str(object_store_mb * 2**20)]

    def ports() -> list[str]:  # each node its own (they would collide on one machine)
        return _ports("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                      "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")

    # `ray start` swaps 127.0.0.1 (and "localhost") for the machine's outside address
    # (services.resolve_ip_for_localhost); other addresses of the loopback range it keeps.
    cmds = [
        [ray, "start", "--head", "--node-ip-address", HEAD_IP, "--port", str(port),
         "--include-dashboard", "false", "--temp-dir", str(temp),
         *_ports("ray-client-server-port"), *ports(), *common],
    ]
    if nodes == 2:
        cmds.append([ray, "start", "--address", f"{HEAD_IP}:{port}", "--node-ip-address",
                     NODE_IP, *ports(), *common])
    logs, sessions = [], []
    for i, cmd in enumerate(cmds):
        log = temp / f"node{i}.log"
        with open(log, "wb") as out:
            # Its own process group: the fixture stops the node and every service it started.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        stack.callback(_stop, proc)
        _wait_ready(proc, log, timeout)
        logs.append(log)
        sessions.append(proc.pid)
    return RayCluster(f"{HEAD_IP}:{port}", temp, tuple(logs), tuple(sessions))
