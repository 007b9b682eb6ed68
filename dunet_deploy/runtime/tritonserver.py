"""Run a real ``tritonserver`` on a model repository: loopback, quiet, ready means ready.

The binary is the one nvidia-pytriton ships (with Triton's python backend), else a
``tritonserver`` on ``PATH``. :class:`TritonProcess` starts it with

* ``--model-control-mode none`` and ``--strict-readiness true``: every model of the
  repository is loaded before the HTTP/gRPC endpoints open, and a model that fails to
  load stops the server (``--exit-on-error``), so the first ``/v2/health/ready`` that
  answers 200 already means every model is ready; :meth:`TritonProcess.wait_ready`
  additionally checks each model's own readiness before we say so;
* this interpreter's ``libpython`` first on ``LD_LIBRARY_PATH`` and our package and its
  site-packages on ``PYTHONPATH``, so the python backend's stub runs our venv's code;
* its ~60 lines of start-up log in a file (``verbose=True`` shows them); a failure is
  reported as one line taken from that log.

Triton's python backend starts each stub as ``bash -c "<stub> <model.py> <shm> ..."``
with the paths unquoted (a space splits a path and the stub dies on ``stol``), and the
stub's embedded Python runs with an ASCII file-system encoding (a path with ``é``
raises ``UnicodeEncodeError``). A repository at such a path is therefore served
through a mirror under a plain temporary folder: the same folders, every file a
symlink (Triton resolves a symlinked repository root, but not its files).

Ports are checked before starting: a busy one is an immediate one-line error naming it.
Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any

import dunet_deploy
from dunet_deploy.errors import DunetError, one_line

__all__ = ["Endpoints", "TritonDist", "TritonProcess", "check_ports_free", "find_tritonserver",
           "server_env", "stage_repository", "stub_safe", "stub_safe_tempdir"]

STOP_TIMEOUT_S = 15.0
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
#: Path characters that survive the python backend's unquoted ``bash -c`` and its ASCII stub.
_STUB_SAFE = re.compile(r"[A-Za-z0-9_./+@%=:,-]*")


def stub_safe(path: str | os.PathLike[str]) -> bool:
    """Whether the python backend's stub can be handed ``path`` (see the module docstring)."""
    return _STUB_SAFE.fullmatch(os.fspath(path)) is not None


def stub_safe_tempdir(prefix: str) -> Path:
    """A new temporary folder whose path the python backend's stub can use.

    Raises:
        DunetError: when neither ``TMPDIR`` nor ``/tmp`` is such a writable folder.
    """
    for base in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
        if stub_safe(base) and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    raise DunetError(f"TMPDIR {tempfile.gettempdir()!r}: Triton's python backend needs a "
                     "writable temporary folder whose path has no spaces or non-ASCII "
                     "characters; set TMPDIR to one")


def stage_repository(repository: Path, work: Path) -> Path:
    """``repository`` itself when the stub can use its path, else a mirror in ``work``.

    The mirror has the repository's folders and a symlink for every file, so nothing
    is copied and the models read their own files.

    Raises:
        DunetError: a model folder's own name has spaces or non-ASCII characters
            (Triton serves the model under that name: it cannot be renamed here).
    """
    if stub_safe(repository):
        return repository
    mirror = work / "repository"
    for folder, dirs, files in os.walk(repository, followlinks=True):
        rel = Path(folder).relative_to(repository)
        for name in (*dirs, *files):
            if not stub_safe(name):
                raise DunetError(
                    f"{Path(folder) / name}: Triton's python backend cannot load a path with "
                    "spaces or non-ASCII characters inside a model repository; rename it"
                )
        (mirror / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            (mirror / rel / name).symlink_to(Path(folder) / name)
    return mirror


@dataclass(frozen=True)
class Endpoints:
    """Where the server listens.

    Attributes:
        host: address every endpoint binds to (loopback by default).
        http_port: HTTP/REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
    """

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def urls(self) -> dict[str, str]:
        """The clients' URLs (``http``, ``grpc``, ``metrics``)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return {"http": f"http://{host}:{self.http_port}",
                "grpc": f"grpc://{host}:{self.grpc_port}",
                "metrics": f"http://{host}:{self.metrics_port}/metrics"}

    def ports(self) -> dict[str, int]:
        """Option name -> port."""
        return {"--http-port": self.http_port, "--grpc-port": self.grpc_port,
                "--metrics-port": self.metrics_port}


@dataclass(frozen=True)
class TritonDist:
    """A Triton server installation.

    Attributes:
        binary: the ``tritonserver`` executable.
        backends: its backends folder (holding ``python/``).
        stub: the python backend stub built for this interpreter (pytriton ships
            one per Python version; ``None``: the one in ``backends/python``).
        libs: extra shared-library folder the binary needs (pytriton's), or ``None``.
    """

    binary: Path
    backends: Path
    stub: Path | None = None
    libs: Path | None = None


def find_tritonserver() -> TritonDist:
    """The pytriton-shipped server, else ``tritonserver`` on ``PATH``.

    Raises:
        DunetError: when neither is installed.
    """
    spec = find_spec("pytriton")
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        dist = root / "tritonserver"
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if (dist / "bin" / "tritonserver").is_file():
            libs = root.parent / "nvidia_pytriton.libs"
            if not libs.is_dir():
                libs = dist / "external_libs"
            return TritonDist(dist / "bin" / "tritonserver", dist / "backends",
                              stub if stub.is_file() else None, libs if libs.is_dir() else None)
    found = shutil.which("tritonserver")
    if found:
        binary = Path(found).resolve()
        return TritonDist(binary, binary.parent.parent / "backends")
    raise DunetError("no tritonserver found: pip install 'dunet-deploy[serve]' (nvidia-pytriton "
                     "ships one) or put Triton's tritonserver on PATH")


def check_ports_free(endpoints: Endpoints) -> None:
    """Refuse at once when a port is taken (Triton would hang or fail obscurely).

    Raises:
        DunetError: ``port N (--grpc-port) on HOST is already in use``.
    """
    seen: dict[int, str] = {}
    for option, port in endpoints.ports().items():
        if port in seen:
            raise DunetError(f"port {port} is given to both {seen[port]} and {option}")
        seen[port] = option
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # SO_REUSEADDR as Triton does: a port in TIME_WAIT is free, a listener is not.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((endpoints.host, port))
            except OSError as exc:
                why = ("is already in use" if exc.errno == errno.EADDRINUSE
                       else f"cannot be bound ({exc.strerror})")
                raise DunetError(f"port {port} ({option}) on {endpoints.host} {why}") from None


def server_env(base: Mapping[str, str] | None = None, libs: Path | None = None) -> dict[str, str]:
    """The environment the server (and its python stubs) need to run our code.

    * ``LD_LIBRARY_PATH`` starts with this interpreter's ``LIBDIR`` (the stub links
      ``libpython3.x.so``; the system one would otherwise be found), then ``libs``;
    * ``PYTHONPATH`` starts with the folder holding ``dunet_deploy`` and this
      environment's site-packages (the stub's embedded Python does not read our
      venv's ``pyvenv.cfg``);
    * ``PATH`` starts with this interpreter's folder.
    """
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ld = [libdir] if libdir else []
    if libs is not None:
        ld.append(str(libs))
    old_ld = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    env["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys([*ld, *old_ld]))
    paths = sysconfig.get_paths()
    py = [str(Path(dunet_deploy.__file__).resolve().parent.parent), paths["purelib"],
          paths["platlib"]]
    old = [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(dict.fromkeys([*py, *old]))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _backends_dir(dist: TritonDist, work: Path) -> Path:
    """A backends folder with the python backend and the stub for this interpreter."""
    if dist.stub is None:
        if stub_safe(dist.backends):
            return dist.backends
        (work / "backends").symlink_to(dist.backends, target_is_directory=True)
        return work / "backends"
    python = work / "backends" / "python"
    python.mkdir(parents=True)
    for name in _PYTHON_BACKEND_FILES:
        shutil.copy2(dist.backends / "python" / name, python / name)
    shutil.copy2(dist.stub, python / "triton_python_backend_stub")
    return work / "backends"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Let the server get SIGTERM if we are killed (no orphaned tritonserver)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _get(url: str, data: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


class TritonProcess:
    """``tritonserver`` on a repository, as a child process.

    Args:
        repository: the model repository folder.
        endpoints: where to listen.
        verbose: also show the server's log on our stdout (it is always kept in a
            file for error messages, removed at :meth:`stop`).
        log_verbose: Triton's ``--log-verbose`` level.
    """

    def __init__(self, repository: str | os.PathLike[str], endpoints: Endpoints,
                 *, verbose: bool = False, log_verbose: int = 0) -> None:
        self.repository = Path(repository).resolve()
        self.endpoints = endpoints
        self.verbose = verbose
        self.log_verbose = log_verbose
        self.proc: subprocess.Popen[bytes] | None = None
        self._work: Path | None = None
        self._log: IO[bytes] | None = None
        self._tee: threading.Thread | None = None

    @property
    def log_path(self) -> Path | None:
        """The server's log file (while it runs)."""
        return None if self._work is None else self._work / "tritonserver.log"

    def start(self) -> None:
        """Check the ports, then start the server (returns at once; see :meth:`wait_ready`)."""
        check_ports_free(self.endpoints)
        dist = find_tritonserver()
        self._work = stub_safe_tempdir("dunet-tritonserver-")
        try:
            repository = stage_repository(self.repository, self._work)
        except BaseException:
            self.stop()
            raise
        e = self.endpoints
        cmd = [
            str(dist.binary), f"--model-repository={repository}",
            f"--backend-directory={_backends_dir(dist, self._work)}",
            "--model-control-mode=none", "--strict-readiness=true", "--exit-on-error=true",
            f"--http-address={e.host}", f"--http-port={e.http_port}",
            f"--grpc-address={e.host}", f"--grpc-port={e.grpc_port}",
            f"--metrics-address={e.host}", f"--metrics-port={e.metrics_port}",
            "--allow-gpu-metrics=false", f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={int(STOP_TIMEOUT_S)}",
        ]
        self._log = open(self._work / "tritonserver.log", "wb")
        try:
            self.proc = subprocess.Popen(
                cmd, env=server_env(libs=dist.libs), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if self.verbose else self._log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us; we stop the server in order
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self.stop()
            raise DunetError(f"{dist.binary}: cannot start ({exc.strerror})") from None
        if self.verbose:  # show the log as it comes, and keep it for error messages
            self._tee = threading.Thread(target=self._copy_log, args=(self.proc.stdout,),
                                         name="tritonserver-log", daemon=True)
            self._tee.start()

    def _copy_log(self, pipe: IO[bytes]) -> None:
        log = self._log
        for line in iter(pipe.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if log is not None and not log.closed:
                log.write(line)
                log.flush()

    def log_error(self) -> str:
        """The most telling line of the server's log (Triton's ``E`` lines), or ''."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()
        # Without a GPU Triton always logs "CudaDriverHelper has not been initialized": noise.
        errors = [ln for ln in lines if ln[:1] == "E" and ln[1:5].isdigit()
                  and "CudaDriverHelper" not in ln]
        picked = next((ln for ln in errors if any(
            k in ln for k in ("failed to load", "Poll failed", "Address"))),
                      errors[0] if errors else (lines[-1] if lines else ""))
        text = picked.split("] ", 1)[-1] if "] " in picked else picked
        return one_line(text, limit=400)

    def _died(self) -> DunetError:
        assert self.proc is not None
        if self._tee is not None:
            self._tee.join(timeout=5)  # the whole log is in the file
        detail = self.log_error()
        return DunetError(f"tritonserver exited with code {self.proc.returncode}"
                          f"{': ' + detail if detail else ''}")

    def models(self) -> dict[str, str]:
        """Model name -> state, from the repository index."""
        status, body = _get(f"{self.endpoints.urls()['http']}/v2/repository/index", b"{}")
        if status != 200:
            return {}
        return {str(m["name"]): str(m.get("state", "")) for m in json.loads(body or b"[]")}

    def wait_ready(self, timeout_s: float, stop: threading.Event | None = None) -> list[str]:
        """Wait until the server and every model in the repository answer ready.

        Returns:
            The model names.

        Raises:
            DunetError: the server exited, or was not ready within ``timeout_s``.
        """
        assert self.proc is not None
        base = self.endpoints.urls()["http"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            if self.proc.poll() is not None:
                raise self._died()
            with contextlib.suppress(OSError):
                if _get(f"{base}/v2/health/ready")[0] == 200:
                    models = self.models()
                    if models and all(
                        _get(f"{base}/v2/models/{name}/ready")[0] == 200 for name in models
                    ):
                        return sorted(models)
            time.sleep(0.2)
        if stop is not None and stop.is_set():
            return []
        raise DunetError(f"tritonserver was not ready within {timeout_s:.0f} s"
                         f"{': ' + self.log_error() if self.log_error() else ''}")

    def check_alive(self) -> None:
        """Raise the server's one-line error if it has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise self._died()

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL; remove the work folder. Returns the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT_S + 5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=30)
            code = self.proc.returncode
        if self._tee is not None:
            self._tee.join(timeout=5)
            self._tee = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        return code

    def __enter__(self) -> TritonProcess:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
