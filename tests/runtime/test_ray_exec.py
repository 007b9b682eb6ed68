"""Ray Data batch inference: the actor in-process, and runs on a real two-node cluster."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_testutils import SHAPE, write_volume

from dunet_deploy.bench.pipeline_bench import StandInRunner, pipeline_spec, write_standin_onnx
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import InputItem
from dunet_deploy.runtime.ray_exec import (
    CaseActor,
    ClusterOptions,
    InferActor,
    _prepare_row,
    _Stages,
    _write_row,
    actor_pool,
    import_ray,
    segment_on_ray,
)
from dunet_deploy.runtime.segmenter import Segmenter

#: What dunet-infer --save-prob builds, the model's defaults applied (the stand-in has none).
STANDIN = InferenceOptions(save_prob=True, tta="none", min_lesion_mm3=0.0, register="auto")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The stand-in model, 5 scans and a broken file, and dunet-infer's outputs for them."""
    root = tmp_path_factory.mktemp("ray")
    model = write_standin_onnx(root / "standin.onnx", pipeline_spec(SHAPE, 32))
    scans = root / "scans"
    scans.mkdir()
    for i in range(5):
        write_volume(scans / f"case_{i}.nii.gz", seed=i)
    (scans / "broken.nii.gz").write_bytes(b"not a nifti file")
    with Segmenter(model, runner_factory=StandInRunner) as seg:
        summary = seg.predict_files([scans], root / "reference", save_prob=True)
    return model, scans, root / "reference", summary


def _same_files(out: Path, reference: Path) -> None:
    names = sorted(p.name for p in reference.glob("*.nii.gz"))
    assert names and sorted(p.name for p in out.glob("*.nii.gz")) == names
    for name in names:  # byte-identical masks and probability maps
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file


def _rows(summary: dict) -> list[tuple]:
    return [(Path(c["input"]).name, c["status"], c["message"], c["lesion_voxels"],
             c["slabs_run"]) for c in summary["cases"]]


def test_the_actor_runs_in_process_without_ray(cohort, tmp_path):
    model, scans, reference, _ = cohort
    spec = pipeline_spec(SHAPE, 32)
    actor = InferActor(model, STANDIN, StandInRunner)
    try:
        results = []
        stages = _Stages(spec, STANDIN)
        for i, path in enumerate(sorted(scans.iterdir())):
            row = _prepare_row({"index": i, "item": pickle.dumps(InputItem(path))}, stages)
            out = actor({"index": np.array([row["index"]]),
                         "payload": np.array([row["payload"]], dtype=object),
                         "timing": np.array([row["timing"]], dtype=object)})
            assert list(out["index"]) == [i] and len(out["payload"]) == 1
            assert json.loads(out["runner"][0])["backend"] == "standin"
            done = _write_row({k: v[0] for k, v in out.items()}, stages, str(tmp_path))
            results.append(pickle.loads(done["result"]))
            timing = json.loads(done["timing"])  # each stage's cost, measured where it ran
            assert list(timing) == ["prepare", "infer", "write"]
            for wall, cpu, pickled, end in timing.values():
                assert 0 <= pickled <= wall and 0 <= cpu and end <= time.time()
            assert timing["prepare"][3] <= timing["infer"][3] <= timing["write"][3]
    finally:
        actor.close()
    assert [r.status for r in results] == ["error"] + ["ok"] * 5  # broken sorts first
    assert "broken.nii.gz" in results[0].message
    _same_files(tmp_path, reference)


def test_the_whole_case_actor_runs_in_process_without_ray(cohort, tmp_path):
    """Layout ``fused``: the path in, the result out, the files written by the actor."""
    model, scans, reference, _ = cohort
    stages = _Stages(pipeline_spec(SHAPE, 32), STANDIN)
    # a try of case_3 killed mid-write left this; the next try replaces it
    stale = tmp_path / ".case_3_mask.nii.gz.abc123.tmp.nii.gz"
    stale.write_bytes(b"partial")
    actor = CaseActor(model, STANDIN, StandInRunner, stages, out_dir=str(tmp_path))
    try:
        paths = sorted(scans.iterdir())
        out = actor({"index": np.arange(len(paths)),
                     "item": np.array([pickle.dumps(InputItem(p)) for p in paths], dtype=object)})
    finally:
        actor.close()
    assert list(out["index"]) == list(range(len(paths)))
    assert {json.loads(r)["backend"] for r in out["runner"]} == {"standin"}
    results = [pickle.loads(blob) for blob in out["result"]]
    assert [r.status for r in results] == ["error"] + ["ok"] * 5  # broken sorts first
    for blob in out["timing"][1:]:
        timing = json.loads(blob)
        assert list(timing) == ["prepare", "infer", "write"]
        assert timing["prepare"][3] <= timing["infer"][3] <= timing["write"][3]
    assert not stale.exists()
    _same_files(tmp_path, reference)


def test_actor_pool_size_and_layout():
    cluster = ClusterOptions()
    # GPUs: one actor per GPU (or per gpus_per_actor), reads and writes in tasks around them
    assert actor_pool({"CPU": 16.0, "GPU": 4.0}, cluster) == (4, 1.0, "split")
    assert actor_pool({"CPU": 16.0, "GPU": 4.0},
                      ClusterOptions(gpus_per_actor=0.5)) == (8, 0.5, "split")
    assert actor_pool({"CPU": 8.0, "GPU": 2.0}, ClusterOptions(actors=1)) == (1, 1.0, "split")
    # no GPU: one whole-case actor per CPU (per cpus_per_actor)
    assert actor_pool({"CPU": 8.0}, cluster) == (8, 0.0, "fused")
    assert actor_pool({"CPU": 2.0}, cluster) == (2, 0.0, "fused")
    assert actor_pool({"CPU": 8.0}, ClusterOptions(cpus_per_actor=2.0)) == (4, 0.0, "fused")
    assert actor_pool({"CPU": 8.0}, ClusterOptions(cpus_per_actor=0.0)) == (8, 0.0, "fused")
    assert actor_pool({"CPU": 2.0}, ClusterOptions(actors=2)) == (2, 0.0, "fused")
    # asked for: split without GPUs takes half the CPUs, fused with GPUs one per GPU
    assert actor_pool({"CPU": 8.0}, ClusterOptions(layout="split")) == (4, 0.0, "split")
    assert actor_pool({"CPU": 2.0}, ClusterOptions(layout="split")) == (1, 0.0, "split")
    assert actor_pool({"CPU": 16.0, "GPU": 2.0},
                      ClusterOptions(layout="fused")) == (2, 1.0, "fused")
    for resources, asked, says in [
            ({"CPU": 8.0, "GPU": 2.0}, ClusterOptions(actors=3), "need 3 GPUs; the cluster has 2"),
            ({"CPU": 8.0}, ClusterOptions(gpus_per_actor=1.0), "fit no actor"),
            ({"CPU": 2.0}, ClusterOptions(actors=2, layout="split"),
             "leave 0 of the cluster's 2 CPUs"),
            ({"CPU": 2.0}, ClusterOptions(actors=3), "need 3 CPUs; the cluster has 2")]:
        with pytest.raises(DunetError, match=says):
            actor_pool(resources, asked)
    with pytest.raises(DunetError, match="actors must be >= 1"):
        ClusterOptions(actors=0)
    with pytest.raises(DunetError, match="layout must be one of auto, split, fused, got 'x'"):
        ClusterOptions(layout="x")


def test_without_ray_one_line_names_the_extra(monkeypatch, cohort, tmp_path):
    model, scans, _, _ = cohort
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(DunetError) as info:
        import_ray()
    assert "dunet-deploy[ray]" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(DunetError, match=r"dunet-deploy\[ray\]"):
        segment_on_ray(model, [scans], tmp_path / "out", STANDIN, runner_factory=StandInRunner)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


@pytest.mark.slow
@pytest.mark.parametrize("layout, actors", [("auto", 2), ("split", 1)])
def test_ray_gives_the_masks_of_dunet_infer(ray_cluster, cohort, tmp_path, layout, actors):
    model, scans, reference, ref_summary = cohort
    out = tmp_path / "out"
    summary = segment_on_ray(model, [scans], out, STANDIN,
                             ClusterOptions(address=ray_cluster.address, layout=layout),
                             runner_factory=StandInRunner)
    _same_files(out, reference)
    assert _rows(summary) == _rows(ref_summary)  # the bad volume failed alone, in input order
    assert (summary["ok"], summary["failed"], summary["total"]) == (5, 1, 6)
    assert set(ref_summary) <= set(summary)  # dunet-infer's shape, plus "ray"
    assert summary["ray"]["layout"] == ("split" if layout == "split" else "fused")
    assert summary["ray"]["actors"] == actors and summary["ray"]["resources"]["CPU"] == 2.0
    stage_s = summary["ray"]["stage_s"]  # measured in the tasks and the actor
    assert list(stage_s) == ["prepare", "infer", "write"]
    assert all(stage_s[k]["wall"] > stage_s[k]["pickle"] > 0 for k in ("prepare", "write"))
    assert summary["backend"] == "standin"
    assert json.loads((out / "summary.json").read_text()) == summary


def test_ray_reads_dicom_series_and_writes_dicom_seg_like_dunet_infer(ray_cluster, cohort,
                                                                       tmp_path):
    """The read tasks take DICOM series (each 3D series a case), the write tasks the SEG."""
    pytest.importorskip("highdicom")
    import nibabel as nib

    from dunet_deploy.data.synth_dicom import SeriesInfo, write_dicom_series

    model, scans, _, _ = cohort
    study = tmp_path / "study"
    for number in (2, 3):
        img = nib.load(str(scans / f"case_{number}.nii.gz"))
        write_dicom_series(np.asarray(img.dataobj, dtype=np.float32), img.affine, study,
                           prefix=f"s{number}",
                           info=SeriesInfo(series_uid=f"1.2.826.0.1.3680043.8.498.7{number}",
                                           series_number=number, description=f"T1 {number}"))
    with Segmenter(model, runner_factory=StandInRunner) as seg:
        ref = seg.predict_files(study, tmp_path / "reference", STANDIN, dicom_seg=True)
    summary = segment_on_ray(model, [study], tmp_path / "out", STANDIN.replace(dicom_seg=True),
                             ClusterOptions(address=ray_cluster.address),
                             runner_factory=StandInRunner)
    assert (summary["ok"], summary["total"]) == (ref["ok"], ref["total"]) == (2, 2)
    _same_files(tmp_path / "out", tmp_path / "reference")
    for case, want in zip(summary["cases"], ref["cases"], strict=True):
        assert case["source"] == want["source"] and case["input"] == want["input"]
        assert Path(case["dicom_seg"]).parent == tmp_path / "out"
        assert Path(case["dicom_seg"]).name == Path(want["dicom_seg"]).name
        assert Path(case["dicom_seg"]).stat().st_size > 0


class PidStandIn(StandInRunner):
    """The stand-in, slowed down (each case spends ~1 s in the actor at batch size 1)."""

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        time.sleep(0.03)
        return super()._run(slabs)


class RecordPids:
    """A runner factory that records the process each runner is made in (one file per pid)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, model_path: Path, info) -> PidStandIn:
        (self.folder / str(os.getpid())).touch()
        return PidStandIn(model_path, info)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_an_actor_killed_mid_run_loses_no_case(ray_cluster, cohort, tmp_path, layout):
    import ray.cloudpickle

    # Ray's workers cannot import this test module: send its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model, scans, reference, ref_summary = cohort
    pids = tmp_path / "pids"  # the nodes share this machine's files
    pids.mkdir()
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_first_actor() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            found = list(pids.iterdir())
            if found and list(out.glob("*_mask.nii.gz")):  # mid-run: a case is already out
                pid = int(found[0].name)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_actor)
    killer.start()
    try:
        summary = segment_on_ray(model, [scans], out, STANDIN.replace(batch_size=1),
                                 ClusterOptions(address=ray_cluster.address, actors=1,
                                                layout=layout),
                                 runner_factory=RecordPids(pids))
    finally:
        killer.join()
    assert killed, "the run ended before an actor could be killed"
    made_in = {int(p.name) for p in pids.iterdir()}
    assert killed[0] in made_in and len(made_in) >= 2  # a new actor replaced the killed one
    _same_files(out, reference)
    assert _rows(summary) == _rows(ref_summary)  # every case once, the broken one failed
