"""README's "Many machines" recipes, run as written: the Slurm array script, its merge, Ray.

The job script runs under ``bash`` once per array task, with the variables
Slurm sets (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``); the merge is
the command the README hands to ``sbatch --wrap``; the Ray line runs against
the tests' loopback cluster (what its two ``ray start`` lines start) in place
of ``HEAD:6379``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import runtime_testutils as rt

from dunet_deploy.bench.pipeline_bench import pipeline_spec, write_standin_onnx

README = Path(__file__).resolve().parents[2] / "README.md"
BIN = Path(sys.executable).parent


def _blocks() -> list[str]:
    """The ``bash`` blocks of the README's "Many machines" section."""
    section = README.read_text().split("\n## Many machines\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def site(tmp_path):
    """A user's folder: export/model.onnx (the stand-in) and a BIDS-like cohort/ of 6 scans."""
    write_standin_onnx(tmp_path / "export" / "model.onnx", pipeline_spec(rt.SHAPE, 32))
    for i in range(6):
        anat = tmp_path / "cohort" / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        rt.write_volume(anat / f"sub-{i:02d}_T1w.nii.gz", seed=i)
    return tmp_path


def _slurm(site: Path) -> dict:
    script, submit = _blocks()[:2]
    (site / "segment.sbatch").write_text(script)
    count = int(re.search(r"#SBATCH --array=1-(\d+)", script).group(1))
    for task in range(1, count + 1):  # what the array's tasks run, one after the other here
        run = subprocess.run(["bash", "segment.sbatch"], cwd=site, capture_output=True,
                             text=True, timeout=600, env={**_env(), "SLURM_ARRAY_TASK_ID": str(
                                 task), "SLURM_ARRAY_TASK_COUNT": str(count)})
        assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (site / "masks").glob("summary-*.json")) == sorted(
        f"summary-{i}-of-{count}.json" for i in range(1, count + 1))
    merge = shlex.split(re.search(r'--wrap "([^"]+)"', submit).group(1))
    run = subprocess.run(merge, cwd=site, capture_output=True, text=True, timeout=600,
                         env=_env())
    assert run.returncode == 0, run.stderr
    return json.loads((site / "masks" / "summary.json").read_text())


def test_the_slurm_array_script_and_its_merge(site):
    merged = _slurm(site)
    assert (merged["total"], merged["ok"], merged["failed"]) == (6, 6, 0)
    assert merged["missing_cases"] == [] and merged["shards"]["missing"] == []
    assert [Path(c["input"]).name for c in merged["cases"]] == [
        f"sub-{i:02d}_T1w.nii.gz" for i in range(6)]
    assert len(list((site / "masks").glob("*_mask.nii.gz"))) == 6


@pytest.mark.slow
def test_the_ray_recipe(ray_cluster, site):
    _slurm(site)
    lines = [line.split("#")[0].strip() for line in _blocks()[2].splitlines()]
    assert lines[0].startswith("ray start --head") and lines[1].startswith("ray start --address")
    (infer,) = [line for line in lines if line.startswith("dunet-infer")]
    ray_site = site / "ray"
    ray_site.mkdir()
    for name in ("export", "cohort"):
        shutil.copytree(site / name, ray_site / name)
    run = subprocess.run(shlex.split(infer.replace("HEAD:6379", ray_cluster.address)),
                         cwd=ray_site, capture_output=True, text=True, timeout=600, env=_env())
    assert run.returncode == 0, run.stderr
    summary = json.loads((ray_site / "masks" / "summary.json").read_text())
    assert summary["ok"] == 6
    assert (summary["ray"]["layout"], summary["ray"]["actors"]) == ("fused", 2)
    for mask in (site / "masks").glob("*_mask.nii.gz"):  # the same files as the shards'
        assert (ray_site / "masks" / mask.name).read_bytes() == mask.read_bytes()
