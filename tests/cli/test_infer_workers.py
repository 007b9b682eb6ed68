"""dunet-infer --workers (worker processes) and clean stops on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.data.nifti import load_nifti

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    model = root / "model.onnx"
    rt.export_tiny_onnx(model, seed=2)
    scans = [rt.write_volume(root / f"case_{i}.nii.gz", seed=i) for i in range(4)]
    return model, scans


def _cmd(model: Path, out: Path, *inputs: object, extra: tuple[str, ...] = (),
         backend: str = "onnxruntime") -> list[str]:
    return [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model),
            *map(str, inputs), "-o", str(out), "--backend", backend, "--save-prob", "-q",
            *extra]


def test_workers_give_byte_identical_masks_in_order(tiny, tmp_path):
    model, scans = tiny
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    inputs = [scans[0], bad, *scans[1:]]
    outs = {}
    for n in (0, 1, 2):
        out = tmp_path / f"w{n}"
        run = subprocess.run(_cmd(model, out, *inputs, extra=("--workers", str(n))),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 1, run.stderr  # the bad file fails alone
        assert run.stderr.count("error: ") == 1 and "bad.nii.gz" in run.stderr
        outs[n] = out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["workers"] == n and (summary["ok"], summary["failed"]) == (4, 1)
        assert [Path(c["input"]).name for c in summary["cases"]] == [p.name for p in inputs]
    for scan in scans:
        name = scan.name.replace(".nii.gz", "")
        ref = (outs[1] / f"{name}_mask.nii.gz").read_bytes()
        assert (outs[2] / f"{name}_mask.nii.gz").read_bytes() == ref
        np.testing.assert_array_equal(load_nifti(outs[0] / f"{name}_mask.nii.gz").data,
                                      load_nifti(outs[1] / f"{name}_mask.nii.gz").data)
        np.testing.assert_array_equal(load_nifti(outs[0] / f"{name}_prob.nii.gz").data,
                                      load_nifti(outs[2] / f"{name}_prob.nii.gz").data)


@pytest.mark.parametrize("workers", ["0", "1", "2"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_cleanly_and_keeps_what_is_done(tiny, tmp_path, sig, code, workers):
    model, _ = tiny
    shape = (40, 48, 240)  # many slices: the run is still going when the signal comes
    scans = [rt.write_volume(tmp_path / f"v{i}.nii.gz", seed=i, shape=shape) for i in range(8)]
    out = tmp_path / "out"
    # Its own process group, signalled whole: a terminal's Ctrl-C, GNU timeout, systemd,
    # Slurm and Kubernetes all signal every process of the group, workers included.
    proc = subprocess.Popen(_cmd(model, out, *scans, extra=("--workers", workers)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*_prob.nii.gz")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: interrupted ({sig.name})"
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == sig.name and summary["total"] == 8
    assert 1 <= summary["done"] < 8 and summary["done"] == len(summary["cases"])
    for case in summary["cases"]:  # every finished case has both of its files
        assert case["status"] == "ok" and Path(case["mask"]).is_file()
        assert Path(case["prob"]).is_file()
    masks = sorted(out.glob("*_mask.nii.gz"))
    assert len(masks) == summary["done"] and len(list(out.glob("*_prob.nii.gz"))) == len(masks)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


#: Loaded into ``dunet-infer`` (a ``sitecustomize`` on its ``PYTHONPATH``): when the main
#: process starts running the backend's C extension module (pybind11's initialisation),
#: another process sends SIGTERM to the group a few ms later, a real signal landing inside
#: it (a thread here could not: the initialisation holds the GIL).
_SIGTERM_DURING_IMPORT = """
import importlib.machinery, os, subprocess, sys

_NAME = os.environ["DUNET_TEST_EXTENSION"]
_PARENT = int(os.environ["DUNET_TEST_PARENT"])


class _Loader(importlib.machinery.ExtensionFileLoader):
    def exec_module(self, module):
        if os.getppid() == _PARENT:  # the main process, not a worker
            group = os.getpgid(0)
            subprocess.Popen(["/bin/sh", "-c", f"sleep 0.003; exec /bin/kill -TERM -- -{group}"])
        return super().exec_module(module)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != _NAME:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            spec.loader = _Loader(spec.loader.name, spec.loader.path)
        return spec


sys.meta_path.insert(0, _Finder())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(("backend", "extension"), [
    ("onnxruntime", "onnxruntime.capi.onnxruntime_pybind11_state"),
    ("openvino", "openvino._pyopenvino"),
    # onnx reads the model's description before any work: the run stops with nothing written.
    # (An audit once saw exit 134 here, an abort inside onnx's C++ initialisation; this hook
    # does not reproduce it, so it checks the clean stop only.)
    ("onnxruntime", "onnx.onnx_cpp2py_export"),
])
def test_sigterm_while_the_backend_imports_stops_as_sigterm(tiny, tmp_path, backend, extension):
    # A signal handler that runs inside a pybind11 module's initialisation makes the import
    # fail ("ImportError: initialization failed"): the run used to end as "onnxruntime is
    # not importable", exit 2, no summary.json (5 runs of 5 for each backend here).
    pytest.importorskip(backend)
    model, scans = tiny
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SIGTERM_DURING_IMPORT)
    path = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "DUNET_TEST_EXTENSION": extension, "DUNET_TEST_PARENT": str(os.getpid()),
           "PYTHONPATH": os.pathsep.join(path)}
    out = tmp_path / "out"
    run = subprocess.run(_cmd(model, out, *scans, extra=("--workers", "2"), backend=backend),
                         capture_output=True, text=True, timeout=300, env=env,
                         start_new_session=True)
    assert run.returncode == 143, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "error: interrupted (SIGTERM)"
    assert "Traceback" not in run.stderr
    if extension.startswith("onnx."):
        assert not out.exists()
        return
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["total"] == len(scans)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text() if (task / "children").exists() else ""
        found.extend(int(n) for n in text.split())
    return found


def _descendants(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        try:
            kids = _children(todo.pop())
        except OSError:  # gone meanwhile
            continue
        seen.extend(kids)
        todo.extend(kids)
    return seen


def _holding(pids: list[int], path: Path) -> int | None:
    """The process among ``pids`` that has ``path`` open, if one has."""
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
            if any(os.readlink(fd) == str(path) for fd in fds):
                return pid
        except OSError:
            continue
    return None


def _kill_a_worker_holding(cmd: list[str], files: Callable[[], Iterable[Path]],
                           doing: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session, SIGKILL the first worker caught with one of ``files()``
    open (what the out-of-memory killer does), and let the run finish."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, victim = time.monotonic() + 300, None
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        for path in files():
            victim = _holding(_descendants(proc.pid), path)
            if victim is not None:
                break
        time.sleep(0.005)
    assert victim is not None, f"never caught a worker {doing}"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_worker_killed_mid_run_fails_only_its_case(tiny, tmp_path):
    model, scans = tiny
    # A big volume keeps its worker busy reading long enough to be caught at it.
    big = rt.write_volume(tmp_path / "big.nii.gz", seed=9, shape=(256, 256, 200))
    inputs = [scans[0], big, *scans[1:]]
    out = tmp_path / "out"
    proc = _kill_a_worker_holding(_cmd(model, out, *inputs, extra=("--workers", "1")),
                                  lambda: [big], "reading the big volume")
    err = proc.stderr
    assert proc.returncode == 1, err  # some inputs failed
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {big}: worker process died (signal 9, e.g. the out-of-memory killer)"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["done"], summary["ok"], summary["failed"]) == (5, 5, 4, 1)
    assert [Path(c["input"]).name for c in summary["cases"]] == [p.name for p in inputs]
    for case in summary["cases"]:
        if case["input"] == str(big):
            assert "worker process died (signal 9" in case["message"]
        else:  # a new worker took over: every other case is complete
            assert case["status"] == "ok" and Path(case["mask"]).is_file()
            assert Path(case["prob"]).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_worker_killed_while_writing_leaves_none_of_its_files(tiny, tmp_path):
    model, scans = tiny
    # A long volume's probability map takes long enough to compress (0.3 s) to be caught
    # at it, after its mask is already in place: the case must not keep the mask alone.
    big = rt.write_volume(tmp_path / "big.nii.gz", seed=9, shape=(40, 48, 2000))
    inputs = [scans[0], big, *scans[1:]]
    out = tmp_path / "out"
    proc = _kill_a_worker_holding(_cmd(model, out, *inputs, extra=("--workers", "2")),
                                  lambda: out.glob(".big_prob.nii.gz.*.tmp.nii.gz"),
                                  "writing the big volume")
    err = proc.stderr
    assert proc.returncode == 1, err  # some inputs failed
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: {big}: worker process died (signal 9, e.g. the out-of-memory killer)"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total"], summary["done"], summary["ok"], summary["failed"]) == (5, 5, 4, 1)
    assert [Path(c["input"]).name for c in summary["cases"]] == [p.name for p in inputs]
    for case in summary["cases"]:
        if case["input"] != str(big):
            assert case["status"] == "ok" and Path(case["mask"]).is_file()
            assert Path(case["prob"]).is_file()
    assert not list(out.glob("big_*"))  # a failed case leaves none of its outputs
    assert len(list(out.glob("*_mask.nii.gz"))) == len(list(out.glob("*_prob.nii.gz"))) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_ctrl_c_while_the_workers_start_is_one_line(tiny, tmp_path):
    model, scans = tiny
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(model, out, *scans, extra=("--workers", "2")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline, started = time.monotonic() + 120, False
    while not started and proc.poll() is None and time.monotonic() < deadline:
        kids = _descendants(proc.pid)  # the fork server appears first, still importing numpy
        started = any(b"forkserver" in _cmdline(k) for k in kids)
        time.sleep(0.002)
    assert started, "never saw the fork server start"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # The main process is still starting its fork server (signals held until it runs) or
    # past it: either way the Ctrl-C stops the run (it used to be lost now and then: exit 0).
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted (SIGINT)"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def _signal_masks(status: str) -> dict[str, int]:
    """``SigBlk``/``SigIgn`` of a /proc/PID/status text (lines joined by ``;``), as bit masks."""
    fields = (line.partition(":\t") for line in status.split(";"))
    return {k: int(v, 16) for k, _, v in fields if k in ("SigBlk", "SigIgn")}


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_fork_server_starts_is_not_lost(sig):
    # The signal comes while the fork server starts (a 1-8 ms window, here sent from
    # inside it): it must be handled once the server runs, not dropped (the run used to
    # finish with exit 0), and the workers must still ignore both signals.
    code = (
        "import os, signal\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from multiprocessing import forkserver\n"
        "from dunet_deploy.runtime import workers\n"
        "real = forkserver.ensure_running\n"
        "def ensure_running():\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "    real()\n"
        "forkserver.ensure_running = ensure_running\n"
        "got = []\n"
        f"signal.signal({int(sig)}, lambda signum, frame: got.append(signum))\n"
        "ctx = workers._context()\n"
        "print('handled', got)\n"
        "with ProcessPoolExecutor(1, mp_context=ctx, initializer=workers._init_worker,\n"
        "                         initargs=(None,)) as pool:\n"
        "    worker = pool.submit(os.getpid).result()\n"
        "    print('worker', open(f'/proc/{worker}/status').read().replace('\\n', ';'))\n"
        "print('server', open(f'/proc/{forkserver._forkserver._forkserver_pid}/status')\n"
        "      .read().replace('\\n', ';'))\n"
        "print('caller', signal.pthread_sigmask(signal.SIG_BLOCK, []))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines["handled"] == f"[{int(sig)}]"  # once, after the window
    assert lines["caller"] == "set()"  # the caller's mask is as it was
    bits = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    for process in ("server", "worker"):  # the fork server and its workers ignore both
        masks = _signal_masks(lines[process])
        assert masks["SigIgn"] & bits == bits and masks["SigBlk"] & bits == 0, process


def test_library_workers_run_single_threaded_blas(tmp_path):
    # A library caller (not dunet-infer, which sets the variable before numpy loads):
    # the fork server must start with the thread variables, not the workers' initializer.
    code = (
        "import os\n"
        "for name in ('OPENBLAS_NUM_THREADS', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS'):\n"
        "    os.environ.pop(name, None)\n"
        "import numpy\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from dunet_deploy.runtime import workers\n"
        "with ProcessPoolExecutor(1, mp_context=workers._context(),\n"
        "                         initializer=workers._init_worker, initargs=(None,)) as pool:\n"
        "    print('worker', pool.submit(workers.blas_threads).result())\n"
        "print('caller', os.environ.get('OPENBLAS_NUM_THREADS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "worker 1" in run.stdout.splitlines()
    assert "caller None" in run.stdout.splitlines()  # the caller's environment is untouched
