"""Sharded runs: the partition of the inputs, and merging the shards' summaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_testutils import SHAPE, write_volume

from dunet_deploy.bench.pipeline_bench import StandInRunner, pipeline_spec, write_standin_onnx
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import expand_inputs
from dunet_deploy.runtime.resume import RunFingerprint
from dunet_deploy.runtime.segmenter import Segmenter
from dunet_deploy.runtime.shards import (
    Shard,
    ShardPlan,
    input_root,
    merge_summaries,
    parse_shard,
    plan_shard,
    shard_key,
    shard_of,
)


@pytest.mark.parametrize(("text", "index", "count"), [("1/4", 1, 4), ("4/4", 4, 4),
                                                       (" 2 / 3 ", 2, 3), ("1/1", 1, 1)])
def test_parse_shard(text, index, count):
    shard = parse_shard(text)
    assert (shard.index, shard.count) == (index, count)
    assert shard.summary_name == f"summary-{index}-of-{count}.json"
    assert str(shard) == f"{index}/{count}"


@pytest.mark.parametrize(("text", "says"), [("0/4", "between 1 and 4"), ("5/4", "between 1 and 4"),
                                            ("1/0", "N must be >= 1"), ("1", "expected I/N"),
                                            ("a/b", "expected I/N"), ("-1/4", "expected I/N"),
                                            ("1/4/2", "expected I/N")])
def test_parse_shard_refuses_with_one_line(text, says):
    with pytest.raises(DunetError, match=says) as info:
        parse_shard(text)
    assert "\n" not in str(info.value) and text.strip() in str(info.value)


def test_shard_of_is_the_same_in_every_process():
    keys = [f"sub-{i:03d}/anat/sub-{i:03d}_T1w.nii.gz" for i in range(50)]
    code = ("import json, sys\nfrom dunet_deploy.runtime.shards import shard_of\n"
            "print(json.dumps([shard_of(k, 7) for k in json.loads(sys.argv[1])]))")
    seen = []
    for seed in ("1", "2"):  # str hashes are salted per process; shard_of must not be
        run = subprocess.run([sys.executable, "-c", code, json.dumps(keys)], capture_output=True,
                             text=True, check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        seen.append(json.loads(run.stdout))
    assert seen[0] == seen[1] == [shard_of(k, 7) for k in keys]
    assert set(seen[0]) == set(range(1, 8))  # 50 keys reach all 7 shards


def _cohort(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # expansion only looks at names
        paths.append(path)
    return paths


def test_input_roots_and_keys(tmp_path):
    assert input_root(tmp_path) == tmp_path
    assert input_root(f"{tmp_path}/sub-*/anat/*.nii.gz") == tmp_path
    assert input_root("*.nii.gz") == Path(".")
    assert input_root(tmp_path / "a.nii.gz") == tmp_path
    assert shard_key(tmp_path / "sub-1" / "a.nii.gz", tmp_path) == "sub-1/a.nii.gz"
    _cohort(tmp_path, ["data/sub-1/anat/x.nii.gz"])
    plan = plan_shard([str(tmp_path / "data")], Shard(1, 1), recursive=True)
    assert plan.keys == ("sub-1/anat/x.nii.gz",)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_partition_the_inputs(tmp_path, count):
    names = [f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz" for i in range(23)]
    _cohort(tmp_path / "data", names)
    inputs = [str(tmp_path / "data"), str(tmp_path / "nothing" / "*.nii.gz")]
    everything = expand_inputs(inputs, recursive=True)
    plans = [plan_shard(inputs, Shard(i, count), recursive=True) for i in range(1, count + 1)]
    positions = sorted(p for plan in plans for p in plan.positions)
    assert positions == list(range(len(everything)))  # each input in exactly one shard
    for plan in plans:
        assert plan.total == len(everything)
        assert [everything[p] for p in plan.positions] == list(plan.items)
    # The pattern that matches nothing is reported by one shard only.
    assert sum(any(it.matched_nothing for it in plan.items) for plan in plans) == 1


def test_shards_are_stable_when_files_are_added_or_the_data_moves(tmp_path):
    names = [f"sub-{i:02d}_T1w.nii.gz" for i in range(30)]
    _cohort(tmp_path / "a", names)

    def owners(folder: Path) -> dict[str, int]:
        found = {}
        for i in (1, 2, 3):
            plan: ShardPlan = plan_shard([str(folder)], Shard(i, 3))
            found.update({it.path.name: i for it in plan.items})
        return found

    before = owners(tmp_path / "a")
    _cohort(tmp_path / "a", [f"new-{i:02d}_T1w.nii.gz" for i in range(12)])  # sorts first
    after = owners(tmp_path / "a")
    assert len(after) == 42 and {n: after[n] for n in names} == before
    _cohort(tmp_path / "mounted" / "elsewhere", names)  # same cohort, another folder
    assert owners(tmp_path / "mounted" / "elsewhere") == before


# ----------------------------------------------------------------- merging
@pytest.fixture
def cohort(tmp_path):
    spec = pipeline_spec(SHAPE, 32)
    model = write_standin_onnx(tmp_path / "standin.onnx", spec)
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(7):
        write_volume(scans / f"case_{i}.nii.gz", seed=i)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    return model, scans


def _run_shard(model: Path, inputs: list[str], out: Path, shard: Shard,
               options: InferenceOptions | None = None) -> ShardPlan:
    """One shard, as ``dunet-infer --shard`` runs it: summary-I-of-N.json, never summary.json."""
    with Segmenter(model, options, runner_factory=StandInRunner) as seg:
        summary = seg.predict_files(inputs, out, shard=shard)
    plan = plan_shard(inputs, shard)
    assert summary["shard"] == plan.to_dict()
    assert summary["fingerprint"] == seg.fingerprint().to_dict()
    assert json.loads((out / shard.summary_name).read_text()) == summary
    return plan


def _rows(doc: dict) -> list[tuple]:
    return [(c["input"], c["status"], c["lesion_voxels"], c["shape"], c["slabs_run"])
            for c in doc["cases"]]


def test_merged_shards_give_the_rows_of_one_run(cohort, tmp_path):
    model, scans = cohort
    fp = RunFingerprint.of(model, InferenceOptions(tta="none", min_lesion_mm3=0.0, register="auto"))
    with Segmenter(model, runner_factory=StandInRunner) as seg:
        whole = seg.predict_files([str(scans)], tmp_path / "whole")
    out = tmp_path / "out"
    plans = [_run_shard(model, [str(scans)], out, Shard(i, 3))
             for i in (1, 2, 3)]
    assert all(plan.items for plan in plans)  # 8 inputs: every shard has work here
    assert not (out / "summary.json").exists()  # only the shards' summaries
    merged = merge_summaries(out)
    assert json.loads((out / "summary.json").read_text()) == merged
    assert _rows(merged) == _rows(whole)
    assert (merged["total"], merged["done"], merged["ok"], merged["failed"]) == (8, 8, 7, 1)
    assert merged["failed_cases"] == [str(scans / "broken.nii.gz")]
    assert merged["missing_cases"] == [] and merged["shards"]["missing"] == []
    assert merged["fingerprint"] == fp.to_dict()


def test_merge_sums_what_each_shard_kept(cohort, tmp_path):
    """``skipped_existing`` counts the kept cases of every shard, not of the first one only."""
    model, scans = cohort
    out = tmp_path / "out"
    for i in (1, 2):
        _run_shard(model, [str(scans)], out, Shard(i, 2))
    kept = {i: json.loads((out / Shard(i, 2).summary_name).read_text())["ok"] for i in (1, 2)}
    assert kept[1] > 0 and kept[2] > 0  # 7 good scans: both shards have some
    again = InferenceOptions(skip_existing=True)
    for i in (1, 2):  # rerun each shard: it keeps what it made
        _run_shard(model, [str(scans)], out, Shard(i, 2), again)
        doc = json.loads((out / Shard(i, 2).summary_name).read_text())
        assert doc["skipped_existing"] == kept[i]
    merged = merge_summaries(out)
    assert merged["skipped_existing"] == kept[1] + kept[2] == 7
    assert (merged["ok"], merged["failed"]) == (7, 1)


def test_merge_lists_what_is_missing(cohort, tmp_path):
    model, scans = cohort
    out = tmp_path / "out"
    plan1 = _run_shard(model, [str(scans)], out, Shard(1, 3))
    plan3 = _run_shard(model, [str(scans)], out, Shard(3, 3))
    # Shard 3 was cut off after its first case.
    doc = json.loads((out / "summary-3-of-3.json").read_text())
    cut = doc["cases"][1:]
    doc["cases"], doc["interrupted"] = doc["cases"][:1], "SIGTERM"
    (out / "summary-3-of-3.json").write_text(json.dumps(doc))
    plan2 = plan_shard([str(scans)], Shard(2, 3))
    assert plan2.items and len(plan3.items) >= 2
    merged = merge_summaries(out)
    assert merged["shards"]["missing"] == [2] and merged["interrupted"] == "3/3: SIGTERM"
    assert merged["missing_cases"] == [c["input"] for c in cut]
    assert merged["unlisted_cases"] == len(plan2.items)
    assert merged["done"] == len(plan1.items) + 1
    named = merge_summaries(out, [str(scans)])  # with the inputs, shard 2's cases are named
    assert sorted(named["missing_cases"]) == sorted(
        [c["input"] for c in cut] + [str(it.path) for it in plan2.items])
    assert named["unlisted_cases"] == 0


def test_merge_refuses_mixed_or_overlapping_shards(cohort, tmp_path):
    model, scans = cohort
    out = tmp_path / "out"
    with pytest.raises(DunetError, match="no shard summaries"):
        merge_summaries(tmp_path)
    _run_shard(model, [str(scans)], out, Shard(1, 2))
    _run_shard(model, [str(scans)], out, Shard(2, 2), InferenceOptions(tta="flip"))
    with pytest.raises(DunetError, match="different models or options"):
        merge_summaries(out)
    _run_shard(model, [str(scans)], out, Shard(2, 2))
    merge_summaries(out)
    _run_shard(model, [str(scans)], out, Shard(1, 3))
    with pytest.raises(DunetError, match="different shard counts"):
        merge_summaries(out)
    (out / "summary-1-of-3.json").unlink()
    doc = json.loads((out / "summary-2-of-2.json").read_text())
    first = json.loads((out / "summary-1-of-2.json").read_text())
    doc["cases"].append(first["cases"][0])
    (out / "summary-2-of-2.json").write_text(json.dumps(doc))
    with pytest.raises(DunetError, match="overlapping shards") as info:
        merge_summaries(out)
    assert "\n" not in str(info.value)
