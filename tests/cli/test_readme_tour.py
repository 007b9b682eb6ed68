"""README's "CLI tour", run as written, in order, in an empty folder (issue 13 item 10).

The commands are read from README.md. Only sizes are made tiny (the
substitutions below: fewer, smaller cases, one epoch of a narrower model, a
one-record-per-combination benchmark) and ports are free ones; everything else
runs as a user types it. ``dunet-serve`` runs until stopped: it is started in
the background, the next line runs once it prints ``ready``, then it is
stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent
TINY = [  # (pattern, replacement) applied to each command line
    (r"--cases 10\b", "--cases 5"),
    (r"--shape 64,80,48", "--shape 32,40,16"),
    (r"--image-size 64", "--image-size 32"),
    (r"--epochs 8", "--epochs 1 --base-filters 16"),
    (r"--out bench$", "--out bench --image-size 32 --base-filters 16 --batch-sizes 1 --iters 1 "
                      "--warmup 0 --precision fp32 --no-e2e --peak-sizes 64 --threads 1 -q"),
]


def tour_commands(text: str) -> list[str]:
    """The command lines of the first ``bash`` block after ``## CLI tour``, comments removed."""
    section = text.split("## CLI tour", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / words[0]), *words[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def _start_server(words: list[str], cwd: Path) -> subprocess.Popen[str]:
    log = open(cwd / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / words[0]), *words[1:]], cwd=cwd, stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if any(x.startswith("ready ") for x in (cwd / "serve.log").read_text().splitlines()):
            return proc
        time.sleep(0.5)
    _stop(proc)
    raise AssertionError(f"dunet-serve never ready:\n{(cwd / 'serve.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[str]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode


def python_blocks(text: str) -> list[str]:
    """Every ``python`` block of the README, in order."""
    return re.findall(r"```python\n(.*?)```", text, re.S)


def serving_commands(text: str) -> list[str]:
    """The command lines of the "Serving the whole pipeline" block (continuations joined)."""
    section = text.split("### Serving the whole pipeline", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def _tiny(line: str) -> str:
    for pattern, repl in TINY:
        line = re.sub(pattern, repl, line)
    return line


def test_python_examples_run_as_written_on_the_tours_data(tiny_run, tmp_path):
    """README's Python blocks, run as written after the tour's data steps (issue 19 item 4).

    The tour's ``dunet-synth scans`` line makes ``scans/`` (``imagesTr/`` +
    ``labelsTr/``); the exported model of the tour is stood in for by the
    shared tiny run's (same data generator and sizes).
    """
    lines = tour_commands(README.read_text())
    [synth_scans] = [line for line in lines if line.startswith("dunet-synth scans")]
    _run(shlex.split(_tiny(synth_scans)), tmp_path)
    (tmp_path / "export").mkdir()
    shutil.copy(tiny_run.onnx, tmp_path / "export" / "model.onnx")
    template = tiny_run.onnx.parent / "template.nii.gz"  # dunet-export writes it beside
    if template.is_file():
        shutil.copy(template, tmp_path / "export" / template.name)
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and "Segmenter" in blocks[-1]
    for code in blocks:
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, f"{code}\n{run.stderr[-3000:]}"
    assert "uint8 float32" in run.stdout
    assert "2/2 segmented" in run.stdout and ", 2 skipped" in run.stdout, run.stdout
    out = tmp_path / "masks_api"
    summary = json.loads((out / "summary.json").read_text())
    assert all("imagesTr" in c["input"] for c in summary["cases"])
    assert all("labelsTr" in s["path"] for s in summary["skipped"])
    assert sorted(p.name for p in out.iterdir()) == [
        "case_000_mask.nii.gz", "case_000_prob.nii.gz", "case_001_mask.nii.gz", "summary.json"]


def test_tour_lines_are_found():
    lines = tour_commands(README.read_text())
    assert [line.split()[0] for line in lines][:3] == ["dunet-synth", "dunet-synth", "dunet-train"]
    assert all(line.startswith("dunet-") for line in lines)
    assert any("--triton-url" in line for line in lines)
    serving = serving_commands(README.read_text())
    assert [line.split()[0] for line in serving] == ["dunet-export", "dunet-serve", "dunet-infer"]
    assert "--server-side" in serving[2]


def run_serving_block(cwd: Path, ports: dict[str, str]) -> None:
    """The "Serving the whole pipeline" lines in ``cwd``, the server on free ``ports``."""
    server = None
    try:
        for line in serving_commands(README.read_text()):
            line = re.sub(r"127\.0\.0\.1:8001\b", f"127.0.0.1:{ports['8001']}", _tiny(line))
            words = shlex.split(line)
            if words[0] == "dunet-serve":
                words += ["--http-port", ports["8000"], "--grpc-port", ports["8001"],
                          "--metrics-port", ports["8002"]]
                server = _start_server(words, cwd)
                continue
            _run(words, cwd)
    finally:
        if server is not None:
            assert _stop(server) == 0


@pytest.mark.slow
def test_readme_tour_runs_in_order(tmp_path):
    pytest.importorskip("pytriton")
    ports = {p: str(_free_port()) for p in ("8000", "8001", "8002")}
    server = None
    try:
        for line in tour_commands(README.read_text()):
            for pattern, repl in TINY:
                line = re.sub(pattern, repl, line)
            for old, new in ports.items():
                line = re.sub(rf"(--\w+-port |127\.0\.0\.1:){old}\b", rf"\g<1>{new}", line)
            words = shlex.split(line)
            if words[0] == "dunet-serve":
                server = _start_server(words, tmp_path)
                continue
            _run(words, tmp_path)
            if "--triton-url" in line and server is not None:
                assert _stop(server) == 0
                server = None
    finally:
        if server is not None:
            _stop(server)
    run_serving_block(tmp_path, {p: str(_free_port()) for p in ports})

    # One validation case (5 cases, 80/20): its spread is undefined, printed n/a.
    assert "±n/a" in (tmp_path / "eval_val" / "summary.md").read_text()
    # What the tour promises: the engine evaluates to the checkpoint's numbers (fp32) ...
    ckpt = json.loads((tmp_path / "eval" / "summary.json").read_text())
    onnx = json.loads((tmp_path / "eval_onnx" / "summary.json").read_text())
    for key in ("dsc_mean", "dsc_global", "recall_mean", "precision_mean"):
        assert abs(ckpt[key] - onnx[key]) < 1e-3, key
    # ... the scans are segmented (masks skipped), locally and through Triton, with previews.
    for out in ("masks", "masks_triton", "masks_server"):
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert summary["ok"] == summary["total"] == 2, out
        assert all("imagesTr" in c["input"] for c in summary["cases"])
    assert len(list((tmp_path / "masks").glob("*_preview.png"))) == 2
    assert len(list((tmp_path / "masks").glob("*_prob.nii.gz"))) == 2
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["complete"] is True
