"""Issue 13 item 3: SIGINT / SIGTERM to a real dunet-train, dunet-eval, dunet-bench process.

Each run is interrupted in the middle of its work; it must exit 130 (SIGINT) or
143 (SIGTERM) with one ``error: interrupted`` line, keep what was complete and
leave no temporary file (in its output or in ``$TMPDIR``).
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")

SIGNALS = [pytest.param(signal.SIGINT, 130, id="SIGINT"),
           pytest.param(signal.SIGTERM, 143, id="SIGTERM")]


def _env(tmp: Path) -> dict[str, str]:
    (tmp / "tmpdir").mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp / "tmpdir"), "OMP_NUM_THREADS": "1"}


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {proc.returncode}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("never got to the point of interruption")
        time.sleep(0.05)


def _temporaries(out: Path, tmpdir: Path) -> list[Path]:
    """Our temporary names left in ``out`` (``.x.tmp``) or in ``$TMPDIR`` (``dunet-*``)."""
    left = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    # Libraries keep their own files in $TMPDIR (OpenVINO a session id): only ours count.
    return left + [p for p in tmpdir.rglob("*") if "dunet" in p.name or ".tmp" in p.name]


def _interrupted_line(stderr: str, sig: int) -> None:
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert stderr.strip().splitlines()[-1] == f"error: interrupted ({name})", stderr
    assert "Traceback" not in stderr


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(("sig", "code"), SIGNALS)
def test_train_keeps_the_last_complete_epoch(tiny_run, tmp_path, sig, code):
    from dunet_deploy.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dunet_deploy.cli.train", "--data", str(tiny_run.data),
         "--out", str(out), "--epochs", "40", "--image-size", "32", "--base-filters", "16",
         "--batch-size", "8", "--device", "cpu", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    _wait_for(proc, lambda: len(_lines(out / "metrics.jsonl")) >= 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    _interrupted_line(stderr, sig)
    epochs = [json.loads(line)["epoch"] for line in _lines(out / "metrics.jsonl")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 40
    assert load_checkpoint(out / "last.pt")["epoch"] == epochs[-1]
    assert load_checkpoint(out / "best.pt")["epoch"] <= epochs[-1]
    assert _temporaries(out, tmp_path / "tmpdir") == []


@pytest.mark.parametrize(("sig", "code"), SIGNALS)
def test_eval_writes_all_of_the_report_or_nothing(tiny_run, tmp_path, sig, code):
    from dunet_deploy.data.synth import write_dataset

    data = tmp_path / "data"
    write_dataset(data, cases=10, shape=(32, 40, 16), seed=11)
    out = tmp_path / "eval"
    master, slave = pty.openpty()  # progress goes to a terminal: the cue to interrupt
    proc = subprocess.Popen(
        [sys.executable, "-m", "dunet_deploy.cli.eval", "--checkpoint", str(tiny_run.checkpoint),
         "--data", str(data), "--out", str(out), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(tmp_path))
    os.close(slave)
    seen = b""

    def first_case_done() -> bool:
        nonlocal seen
        seen += os.read(master, 4096)
        return b"evaluating 1/10" in seen

    _wait_for(proc, first_case_done)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.returncode == code, seen
    _interrupted_line(seen.decode().replace("\r", "\n"), sig)
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written in ([], ["cases.csv", "dsc_boxplot.png", "summary.json", "summary.md"])
    assert _temporaries(out, tmp_path / "tmpdir") == []


@pytest.mark.parametrize(("sig", "code"), SIGNALS)
def test_bench_keeps_the_records_measured_so_far(tmp_path, sig, code):
    out = tmp_path / "bench"

    def records() -> int:
        try:
            return len(json.loads((out / "bench.json").read_text())["records"])
        except (OSError, ValueError):
            return 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "dunet_deploy.cli.bench", "--models", "unet2d,dunet",
         "--backends", "torch,onnxruntime", "--batch-sizes", "1,2,4", "--precision", "fp32",
         "--iters", "3", "--warmup", "1", "--image-size", "32", "--base-filters", "16",
         "--no-e2e", "--peak-sizes", "64", "--threads", "1", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    _wait_for(proc, lambda: records() >= 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    _interrupted_line(stderr, sig)
    doc = json.loads((out / "bench.json").read_text())
    assert doc["complete"] is False and 1 <= len(doc["records"]) < 12
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]
    assert _temporaries(out, tmp_path / "tmpdir") == []
