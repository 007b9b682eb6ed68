"""dunet-infer --workers (worker processes) and clean stops on SIGINT / SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def _cmd(model: Path, out: Path, *inputs: object, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model),
            *map(str, inputs), "-o", str(out), "--backend", "onnxruntime", "--save-prob", "-q",
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


@pytest.mark.parametrize(("sig", "code", "workers"), [(signal.SIGTERM, 143, "0"),
                                                      (signal.SIGINT, 130, "1")])
def test_a_signal_stops_cleanly_and_keeps_what_is_done(tiny, tmp_path, sig, code, workers):
    model, _ = tiny
    shape = (40, 48, 240)  # many slices: the run is still going when the signal comes
    scans = [rt.write_volume(tmp_path / f"v{i}.nii.gz", seed=i, shape=shape) for i in range(8)]
    out = tmp_path / "out"
    # Its own process group: a terminal's Ctrl-C reaches every process of the group.
    proc = subprocess.Popen(_cmd(model, out, *scans, extra=("--workers", workers)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("*_prob.nii.gz")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as Ctrl-C does: workers get it too, and ignore it
    else:
        proc.send_signal(sig)  # as timeout / docker stop do: the main process only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"error: interrupted ({sig.name})"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == sig.name and summary["total"] == 8
    assert 1 <= summary["done"] < 8 and summary["done"] == len(summary["cases"])
    for case in summary["cases"]:  # every finished case has both of its files
        assert case["status"] == "ok" and Path(case["mask"]).is_file()
        assert Path(case["prob"]).is_file()
    masks = sorted(out.glob("*_mask.nii.gz"))
    assert len(masks) == summary["done"] and len(list(out.glob("*_prob.nii.gz"))) == len(masks)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files
