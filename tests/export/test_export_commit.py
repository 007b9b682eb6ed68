"""The export's final renames: a Ctrl-C in the middle leaves one complete artefact set."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dunet_deploy.models import create_model
from dunet_deploy.spec import PreprocessSpec
from dunet_deploy.training.checkpoint import save_checkpoint

FORMATS = ["--format", "onnx", "--format", "triton", "--triton-backend", "python"]

#: Runs dunet-export in this process; the first rename from the staging folder into
#: the output folder is followed by SIGINT to the whole process group (what Ctrl-C
#: in a terminal sends), so the signal lands between two renames of the commit.
_INTERRUPTED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from dunet_deploy.export.pipeline import STAGING_PREFIX

    real_replace = os.replace
    sent = []

    def replace(src, dst, **kw):
        real_replace(src, dst, **kw)
        if STAGING_PREFIX in str(src) and STAGING_PREFIX not in str(dst) and not sent:
            sent.append(dst)
            os.killpg(os.getpgid(0), signal.SIGINT)

    os.replace = replace
    from dunet_deploy.cli.export import main
    main(sys.argv[1:])
""")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _export(*args: object, script: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m",
                                                          "dunet_deploy.cli.export"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=300,
                          start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory,
                    spec32: PreprocessSpec) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("commit")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = root / f"ckpt{seed}.pt"
        save_checkpoint(path, model=create_model("dunet", base_filters=8), spec=spec32,
                        epoch=seed, metrics={"dice": 0.1 * seed})
        paths.append(path)
    return paths[0], paths[1]


def test_sigint_during_the_commit_leaves_the_complete_new_set(
        two_checkpoints: tuple[Path, Path], tmp_path: Path) -> None:
    old_ckpt, new_ckpt = two_checkpoints
    out, ref = tmp_path / "out", tmp_path / "ref"
    for ckpt, folder in ((old_ckpt, out), (new_ckpt, ref)):
        res = _export(ckpt, "-o", folder, *FORMATS, "--no-verify")
        assert res.returncode == 0, res.stderr
    old, new = _digests(out), _digests(ref)
    assert set(old) == set(new) and len(new) == 7
    changed = {name for name in new if new[name] != old[name]}
    assert {"model.onnx", "model.json", "triton/dunet/config.pbtxt"} <= changed

    res = _export(new_ckpt, "-o", out, *FORMATS, "--no-verify", script=_INTERRUPTED_EXPORT)
    assert res.returncode == 130, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: interrupted (SIGINT)"), res.stderr
    # Every file of the new export, none of the old: the interrupt waited for the last rename.
    assert _digests(out) == new
    assert not [p for p in out.iterdir() if p.name.startswith(".dunet-export-")]
