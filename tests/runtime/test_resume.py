"""Resumable runs: which cases of an output folder are complete and made by the same run."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from runtime_testutils import SHAPE, write_volume

from dunet_deploy.bench.pipeline_bench import StandInRunner, pipeline_spec, write_standin_onnx
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import CaseResult
from dunet_deploy.runtime.resume import (
    RunFingerprint,
    RunPlan,
    completed_cases,
    model_digest,
    nifti_complete,
)
from dunet_deploy.runtime.segmenter import Segmenter

#: The run's options as predict_files resolves them (the stand-in's defaults: no TTA, keep all).
OPTIONS = InferenceOptions(save_prob=True, prob_dtype="uint16", tta="none", min_lesion_mm3=0.0,
                           register="auto")  # the model's defaults applied


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished run of 4 volumes and a broken file; its summary records its fingerprint."""
    root = tmp_path_factory.mktemp("resume")
    model = write_standin_onnx(root / "standin.onnx", pipeline_spec(SHAPE, 32))
    scans = [write_volume(root / f"case_{i}.nii.gz", seed=i) for i in range(4)]
    (root / "broken.nii.gz").write_bytes(b"not a nifti file")
    out = root / "out"
    with Segmenter(model, runner_factory=StandInRunner) as seg:
        summary = seg.predict_files([*scans, root / "broken.nii.gz"], out, save_prob=True,
                                    prob_dtype="uint16")
    fp = RunFingerprint.of(model, OPTIONS)
    assert summary["fingerprint"] == fp.to_dict()
    assert fp.options == summary["options_fingerprint"] == OPTIONS.fingerprint()
    return model, out, fp


def _copy(out: Path, dest: Path) -> Path:
    dest.mkdir()
    for path in out.iterdir():
        shutil.copy2(path, dest / path.name)  # times kept, as `cp -p` and `rsync -a` keep them
    return dest


def test_digests(done_run, tmp_path):
    model, _, fp = done_run
    assert model_digest(model) == fp.model and fp.model.startswith("sha256:")
    other = tmp_path / "other.onnx"
    other.write_bytes(model.read_bytes() + b"\0")
    assert model_digest(other) != fp.model
    # Speed settings do not enter it; what changes the files does.
    assert RunFingerprint.of(model, OPTIONS.replace(threads=1, batch_size=2, workers=3)) == fp
    assert RunFingerprint.of(model, OPTIONS.replace(tta="flip")).options != fp.options


def test_finished_cases_count_as_done(done_run):
    _, out, fp = done_run
    done = completed_cases(out, fp)
    assert sorted(done) == [f"case_{i}" for i in range(4)]  # not the broken input
    assert all(row["status"] == "ok" for row in done.values())
    assert sorted(completed_cases(out, fp, save_prob=True, prob_dtype="uint16")) == sorted(done)


def test_another_model_or_options_redo_everything(done_run, tmp_path):
    model, out, fp = done_run
    assert completed_cases(out, RunFingerprint.of(model, OPTIONS.replace(tta="flip"))) == {}
    assert completed_cases(out, RunFingerprint("sha256:" + "0" * 64, fp.options)) == {}
    # Probability maps asked for in another type than the ones on disk.
    assert completed_cases(out, fp, save_prob=True, prob_dtype="float32") == {}
    assert completed_cases(tmp_path / "absent", fp) == {}
    with pytest.raises(DunetError, match="prob_dtype 'float16'"):
        completed_cases(out, fp, save_prob=True, prob_dtype="float16")


def test_a_summary_without_its_fingerprint_proves_nothing(done_run, tmp_path):
    _, out, fp = done_run
    dest = _copy(out, tmp_path / "copy")
    doc = json.loads((dest / "summary.json").read_text())
    del doc["fingerprint"]
    (dest / "summary.json").write_text(json.dumps(doc))
    assert completed_cases(dest, fp) == {}
    (dest / "summary.json").unlink()  # a SIGKILLed run: files, no summary
    assert completed_cases(dest, fp) == {}


def test_truncated_corrupted_or_missing_files_are_redone(done_run, tmp_path):
    _, out, fp = done_run
    dest = _copy(out, tmp_path / "copy")
    mask = dest / "case_0_mask.nii.gz"
    mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])  # a copy cut short
    raw = bytearray((dest / "case_1_mask.nii.gz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: the CRC catches it
    (dest / "case_1_mask.nii.gz").write_bytes(bytes(raw))
    (dest / "case_2_prob.nii.gz").unlink()
    assert sorted(completed_cases(dest, fp)) == ["case_2", "case_3"]
    assert sorted(completed_cases(dest, fp, save_prob=True, prob_dtype="uint16")) == ["case_3"]


def test_nifti_complete(done_run, tmp_path):
    _, out, _ = done_run
    mask = out / "case_0_mask.nii.gz"
    assert nifti_complete(mask, np.dtype(np.uint8))
    assert not nifti_complete(mask, np.dtype(np.float32))
    assert nifti_complete(out / "case_0_prob.nii.gz", np.dtype(np.uint16))
    plain = tmp_path / "plain.nii"
    plain.write_bytes(gzip.decompress(mask.read_bytes()))
    assert nifti_complete(plain)
    for cut in (10, 348, plain.stat().st_size - 1):
        short = tmp_path / f"short{cut}.nii"
        short.write_bytes(plain.read_bytes()[:cut])
        assert not nifti_complete(short)
    # A whole gzip stream holding too little data for its header.
    lie = tmp_path / "lie.nii.gz"
    lie.write_bytes(gzip.compress(plain.read_bytes()[:-1]))
    assert not nifti_complete(lie)
    assert not nifti_complete(tmp_path / "absent.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(b"not gzip at all")
    assert not nifti_complete(tmp_path / "text.nii.gz")


def test_files_newer_than_their_summary_are_redone(done_run, tmp_path):
    _, out, fp = done_run
    dest = _copy(out, tmp_path / "copy")
    # A later run with other options replaced case_1's files (and wrote its own summary
    # elsewhere): the first summary's claim no longer holds for them.
    summary = (dest / "summary.json").stat().st_mtime_ns
    os.utime(dest / "case_1_mask.nii.gz", ns=(summary + 10**9, summary + 10**9))
    assert sorted(completed_cases(dest, fp)) == ["case_0", "case_2", "case_3"]


def test_a_journal_is_what_a_sigkilled_run_leaves(done_run, tmp_path):
    _, out, fp = done_run
    dest = _copy(out, tmp_path / "copy")
    (dest / "summary.json").unlink()  # SIGKILLed: no summary
    rows = json.loads((out / "summary.json").read_text())["cases"]
    results = {Path(r["input"]).name: CaseResult(**r) for r in rows}
    plan = RunPlan(items=(), todo=(), fingerprint=fp)
    journal = plan.journal(dest)
    assert journal.path == dest / ".summary.json.done.jsonl"
    for name in ("case_0.nii.gz", "broken.nii.gz", "case_2.nii.gz"):
        journal.record(results[name])  # (a failed case is not recorded)
    with open(journal.path, "a") as f:
        f.write('{"fingerprint": {"model": "sha256:')  # the line the kill cut short
    assert sorted(completed_cases(dest, fp, save_prob=True, prob_dtype="uint16")) == [
        "case_0", "case_2"]
    assert completed_cases(dest, RunFingerprint(fp.model, "0" * 16)) == {}
    (dest / "case_2_prob.nii.gz").write_bytes((dest / "case_3_prob.nii.gz").read_bytes())
    assert sorted(completed_cases(dest, fp)) == ["case_0", "case_2"]  # the mask is unchanged
    assert sorted(completed_cases(dest, fp, save_prob=True, prob_dtype="uint16")) == ["case_0"]
    journal.close()
    assert not journal.path.exists() and completed_cases(dest, fp) == {}
