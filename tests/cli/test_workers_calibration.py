"""The default --workers: a calibration measured and cached per machine, else the core rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.bench.pipeline_bench import pipeline_spec, write_standin_onnx
from dunet_deploy.bench.workers_calibration import calibrate_workers
from dunet_deploy.runtime.workers import (
    calibrated_workers,
    calibration_path,
    default_workers,
    machine_key,
    save_calibration,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dunet-deploy" / "workers.json"


def test_without_a_calibration_the_core_rule_decides(cache):
    assert calibration_path() == cache and calibrated_workers() is None
    assert [default_workers(n) for n in (1, 2, 3, 4, 8, 64)] == [0, 0, 1, 2, 4, 4]
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    assert calibrated_workers() is None  # unreadable: the rule, no error
    cache.write_text(json.dumps({"another-host|...": {"workers": 3}}))
    assert calibrated_workers() is None  # another machine's entry


def test_a_calibration_is_measured_saved_and_becomes_the_default(cache, tmp_path):
    lines: list[str] = []
    done = calibrate_workers(volumes=2, repeat=1, candidates=(0, 1), shape=rt.SHAPE,
                             work=tmp_path / "work", log=lines.append)
    assert len(lines) == 2 and set(done["median"]) == {0, 1}
    assert all(v > 0 for v in done["median"].values())
    assert done["workers"] in (0, 1) and done["path"] == str(cache)
    entry = json.loads(cache.read_text())[machine_key()]
    assert entry["workers"] == done["workers"] and len(entry["measured"]["runs"]) == 2
    assert default_workers() == done["workers"] == calibrated_workers()
    assert default_workers(2) == 0  # a core count asked for: the rule alone
    save_calibration(3, {"by": "hand"})  # a later calibration replaces this machine's entry
    assert default_workers() == 3 and len(json.loads(cache.read_text())) == 1


def test_dunet_infer_takes_the_calibrated_default(cache, tmp_path):
    save_calibration(1, {"by": "hand"})
    model = write_standin_onnx(tmp_path / "standin.onnx", pipeline_spec(rt.SHAPE, 32))
    scan = rt.write_volume(tmp_path / "case.nii.gz")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for extra, workers in (((), 1), (("--workers", "0"), 0)):
        out = tmp_path / f"out{workers}"
        run = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--engine",
                              str(model), str(scan), "-o", str(out), "-q", *extra],
                             capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stderr
        assert json.loads((out / "summary.json").read_text())["workers"] == workers


@pytest.mark.slow
def test_calibrate_workers_from_the_command_line(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--calibrate-workers"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("volumes/s") == 8  # 4 counts x 2 interleaved repeats
    cache = tmp_path / "cache" / "dunet-deploy" / "workers.json"
    (entry,) = json.loads(cache.read_text()).values()
    assert run.stdout.startswith(f"default --workers on this machine: {entry['workers']} ")
    assert str(cache) in run.stdout


def test_a_cohort_without_a_calibration_points_at_it_once(cache, tmp_path):
    """Issue 22.6: the rule's count is a guess on some CPUs; a cohort run says how to measure it
    (once), and says nothing once a calibration is on record, a count is given, or -q."""
    from click.testing import CliRunner

    from dunet_deploy.cli import infer as infer_cli

    model = write_standin_onnx(tmp_path / "standin.onnx", pipeline_spec(rt.SHAPE, 32))
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(8):
        rt.write_volume(scans / f"case_{i}.nii.gz", seed=i)

    def notes(*extra: str) -> list[str]:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        res = CliRunner().invoke(infer_cli.main, ["--engine", str(model), str(scans), "-o",
                                                  str(out), *extra])
        assert res.exit_code == 0, res.output
        return [line for line in res.stderr.splitlines() if "--calibrate-workers" in line]

    [line] = notes()
    assert line.startswith(f"note: --workers {default_workers()} by the core-count rule, not "
                           "measured on this machine")
    assert notes("--workers", "0") == [] and notes("-q") == []
    save_calibration(0, {"by": "hand"})
    assert notes() == []
