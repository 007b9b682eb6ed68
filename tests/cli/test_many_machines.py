"""dunet-infer past one process: --shard + --merge, --skip-existing after a kill, --ray.

Every run is a real ``dunet-infer`` process on the stand-in ONNX model (ONNX
Runtime; no torch), and every kill a real SIGTERM sent to the run's process
group, as a batch scheduler sends it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.bench.pipeline_bench import pipeline_spec, write_standin_onnx

#: Big enough that a run lasts ~1 s after its first mask (the kill lands mid-run).
SHAPE = (112, 128, 80)
VOLUMES = 20


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The stand-in model, 20 scans and a broken file, and one whole run's outputs."""
    root = tmp_path_factory.mktemp("many")
    model = write_standin_onnx(root / "standin.onnx", pipeline_spec(SHAPE, 64))
    scans = root / "scans"
    scans.mkdir()
    for i in range(VOLUMES):
        rt.write_volume(scans / f"case_{i:02d}.nii.gz", seed=i, shape=SHAPE)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    whole = root / "whole"
    run = _infer(model, scans, whole)
    assert run.returncode == 1, run.stderr  # the broken file fails alone
    return model, scans, whole, json.loads((whole / "summary.json").read_text())


def _cmd(model: Path, scans: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(model), str(scans),
            "-o", str(out), "--backend", "onnxruntime", "--save-prob", "-q", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _infer(model: Path, scans: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(model, scans, out, *extra), capture_output=True, text=True,
                          timeout=600, env=_env())


def _rows(summary: dict) -> list[tuple]:
    return [(Path(c["input"]).name, c["status"], c["message"], c["lesion_voxels"], c["shape"],
             c["slabs_run"], Path(c["mask"] or "-").name, Path(c["prob"] or "-").name)
            for c in summary["cases"]]


def _same_outputs(out: Path, whole: Path) -> None:
    names = sorted(p.name for p in whole.glob("*.nii.gz"))
    assert len(names) == 2 * VOLUMES and sorted(p.name for p in out.glob("*.nii.gz")) == names
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    """Each output's inode and mtime: a file written again (renamed into place) changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.nii.gz")}


def _recorded(summary: dict, out: Path) -> dict[str, tuple[int, int]]:
    """The stamps of the files of the cases ``summary`` lists as finished (all on disk)."""
    stamps = _stamps(out)
    names = [Path(c[k]).name for c in summary["cases"] if c["status"] == "ok"
             for k in ("mask", "prob")]
    assert set(names) <= set(stamps)
    return {n: stamps[n] for n in names}


def test_two_shards_in_two_processes_then_merge_give_one_run(cohort, tmp_path):
    model, scans, whole, reference = cohort
    out = tmp_path / "out"
    shard1 = subprocess.Popen(_cmd(model, scans, out, "--shard", "1/2"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard2 = subprocess.Popen(_cmd(model, scans, out, "--shard", "2/2"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    codes = [shard1.wait(timeout=600), shard2.wait(timeout=600)]
    assert sorted(codes) == [0, 1]  # the shard with the broken file exits 1
    assert not (out / "summary.json").exists()
    parts = [json.loads((out / f"summary-{i}-of-2.json").read_text()) for i in (1, 2)]
    assert all(p["total"] for p in parts) and sum(p["total"] for p in parts) == VOLUMES + 1

    # Merging while one shard's summary is missing names its cases and fails.
    kept = (out / "summary-2-of-2.json").read_text()
    (out / "summary-2-of-2.json").unlink()
    merge = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--merge", str(out),
                            str(scans)], capture_output=True, text=True, timeout=600)
    assert merge.returncode == 1
    missing = sorted(line.removeprefix("missing: ") for line in merge.stderr.splitlines()
                     if line.startswith("missing: "))
    assert missing == sorted(c["input"] for c in parts[1]["cases"])
    assert "merged 1 of 2 shard summaries" in merge.stdout
    assert "shard(s) 2 wrote no summary" in merge.stdout

    (out / "summary-2-of-2.json").write_text(kept)
    merge = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--merge", str(out)],
                           capture_output=True, text=True, timeout=600)
    assert merge.returncode == 1, merge.stderr  # the broken file failed
    assert merge.stderr.strip() == f"failed: {scans / 'broken.nii.gz'}"
    merged = json.loads((out / "summary.json").read_text())
    _same_outputs(out, whole)
    assert _rows(merged) == _rows(reference)
    assert (merged["total"], merged["done"], merged["ok"], merged["failed"]) == (
        VOLUMES + 1, VOLUMES + 1, VOLUMES, 1)
    assert merged["missing_cases"] == [] and merged["fingerprint"] == reference["fingerprint"]


def _kill_mid_run(cmd: list[str], out: Path, cases: int = 2,
                  sig: int = signal.SIGTERM) -> subprocess.CompletedProcess:
    """Start ``cmd`` in its own process group; SIGTERM the group once ``cases`` cases are out.

    A case's probability map is written after its mask, and the next case's after the
    first one is recorded: two maps out, at least one case is finished and recorded.
    """
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*_prob.nii.gz"))) < cases:
        assert proc.poll() is None, f"ended before a mask was out: {proc.communicate()}"
        assert time.monotonic() < deadline, "no mask in 300 s"
        time.sleep(0.01)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _journal(path: Path) -> dict:
    """What a SIGKILLed run leaves: its journal's finished cases, as a summary's "cases"."""
    cases = [json.loads(line)["case"] for line in path.read_text().splitlines()]
    return {"cases": cases, "ok": len(cases)}


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "sig"), [
    ((), signal.SIGTERM), (("--workers", "1"), signal.SIGTERM),
    (("--shard", "1/2"), signal.SIGTERM),
    ((), signal.SIGKILL), (("--workers", "1"), signal.SIGKILL)],
    ids=["in-process", "workers", "shard", "in-process-SIGKILL", "workers-SIGKILL"])
def test_a_killed_run_restarted_redoes_only_the_missing_cases(cohort, tmp_path, extra, sig):
    model, scans, whole, reference = cohort
    out = tmp_path / "out"
    name = f"summary-{extra[1].replace('/', '-of-')}.json" if extra[:1] == ("--shard",) \
        else "summary.json"
    killed = _kill_mid_run(_cmd(model, scans, out, *extra), out, sig=sig)
    if sig == signal.SIGKILL:  # no summary: the journal of finished cases
        assert killed.returncode == -signal.SIGKILL and not (out / name).exists()
        first = _journal(out / f".{name}.done.jsonl")
        assert 0 < first["ok"] < VOLUMES, first["ok"]
    else:
        assert killed.returncode == 143, killed.stderr
        assert killed.stderr.strip().splitlines()[-1] == "error: interrupted (SIGTERM)"
        first = json.loads((out / name).read_text())
        assert first["interrupted"] == "SIGTERM" and 0 < first["ok"] < first["total"]
        assert not list(out.glob(".*"))  # the journal is gone once the summary is written
    done_first = _recorded(first, out)

    again = _infer(model, scans, out, *extra, "--skip-existing")
    resumed = json.loads((out / name).read_text())
    # The broken file (when this shard has it) is tried again, and fails again.
    assert again.returncode == (1 if resumed["failed"] else 0), again.stderr
    assert resumed["done"] == resumed["total"] == first.get("total", VOLUMES + 1)
    assert resumed["skipped_existing"] == first["ok"] and resumed["interrupted"] is None
    after = _stamps(out)
    assert {n: after[n] for n in done_first} == done_first  # not one finished case redone
    if extra[:1] == ("--shard",):
        assert _infer(model, scans, out, "--shard", "2/2").returncode in (0, 1)
        merge = subprocess.run([sys.executable, "-m", "dunet_deploy.cli.infer", "--merge",
                                str(out)], capture_output=True, text=True, timeout=600)
        assert merge.returncode == 1 and merge.stderr.startswith("failed: "), merge.stderr
        resumed = json.loads((out / "summary.json").read_text())
    _same_outputs(out, whole)
    assert _rows(resumed) == _rows(reference)
    # A third run finds everything done but the broken file, and writes nothing again.
    settled = _stamps(out)
    third = _infer(model, scans, out, *extra, "--skip-existing")
    doc = json.loads((out / name).read_text())
    assert third.returncode == (1 if doc["failed"] else 0) and _stamps(out) == settled
    assert doc["skipped_existing"] == sum(c["status"] == "ok" for c in doc["cases"]) > 0


def test_skip_existing_redoes_cases_made_with_other_options(cohort, tmp_path):
    model, scans, _, _ = cohort
    out = tmp_path / "out"
    assert _infer(model, scans, out).returncode == 1
    before = _stamps(out)
    again = _infer(model, scans, out, "--skip-existing", "--min-lesion-mm3", "5")
    summary = json.loads((out / "summary.json").read_text())
    assert again.returncode == 1 and summary["skipped_existing"] == 0
    assert not set(_stamps(out).items()) & set(before.items())  # every file written again
    # Speed settings change nothing that is written: the cases are kept.
    again = _infer(model, scans, out, "--skip-existing", "--min-lesion-mm3", "5",
                   "--batch-size", "3", "--threads", "1")
    assert json.loads((out / "summary.json").read_text())["skipped_existing"] == VOLUMES


def test_without_ray_one_line_names_the_extra(cohort, tmp_path):
    model, scans, _, _ = cohort
    blocker = tmp_path / "no_ray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get(
        "PYTHONPATH", "")])}
    out = tmp_path / "out"
    run = subprocess.run(_cmd(model, scans, out, "--ray"), capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "pip install 'dunet-deploy[ray]'" in run.stderr
    assert not out.exists()


@pytest.mark.slow
def test_ray_gives_the_files_of_dunet_infer_and_resumes(ray_cluster, cohort, tmp_path):
    model, scans, whole, reference = cohort
    out = tmp_path / "out"
    address = f"--ray={ray_cluster.address}"
    # Ray's tasks write the files; their results reach the driver a little later.
    killed = _kill_mid_run(_cmd(model, scans, out, address), out, cases=VOLUMES // 2)
    assert killed.returncode == 143, killed.stderr
    first = json.loads((out / "summary.json").read_text())
    assert first["interrupted"] == "SIGTERM" and 0 < first["ok"] < VOLUMES
    done_first = _recorded(first, out)

    again = _infer(model, scans, out, address, "--skip-existing")
    assert again.returncode == 1, again.stderr
    assert again.stderr.count("error: ") == 1 and "broken.nii.gz" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_existing"] == first["ok"]
    after = _stamps(out)
    assert {n: after[n] for n in done_first} == done_first
    _same_outputs(out, whole)
    assert _rows(summary) == _rows(reference)
    assert set(reference) <= set(summary)
    # no GPU: one whole-case actor per CPU
    assert (summary["ray"]["layout"], summary["ray"]["actors"]) == ("fused", 2)
    assert summary["fingerprint"] == reference["fingerprint"]


@pytest.mark.slow
def test_ray_with_a_trained_model_gives_the_bytes_of_dunet_infer(ray_cluster, tiny_run,
                                                                 tmp_path):
    """A trained model (``tiny_run``'s ONNX export), not the stand-in, run by ONNX Runtime in
    the actor: with and without ``--ray`` the same files byte for byte and the same rows."""
    from dunet_deploy.data.layouts import discover_cases

    scans = [str(case.image) for case in discover_cases(tiny_run.data)[1]]
    assert len(scans) == 4

    def infer(out: Path, *extra: str) -> dict:
        cmd = [sys.executable, "-m", "dunet_deploy.cli.infer", "--engine", str(tiny_run.onnx),
               *scans, "-o", str(out), "--backend", "onnxruntime", "--save-prob", "-q", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
        assert run.returncode == 0, run.stderr
        return json.loads((out / "summary.json").read_text())

    local = infer(tmp_path / "local")
    on_ray = infer(tmp_path / "ray", f"--ray={ray_cluster.address}")
    names = sorted(p.name for p in (tmp_path / "local").glob("*.nii.gz"))
    assert len(names) == 2 * len(scans)  # a mask and a probability map per scan
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.nii.gz")) == names
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert _rows(on_ray) == _rows(local)
    assert on_ray["backend"] == local["backend"] == "onnxruntime"
    assert (on_ray["ray"]["layout"], on_ray["ray"]["actors"]) == ("fused", 2)
    assert on_ray["fingerprint"] == local["fingerprint"]
