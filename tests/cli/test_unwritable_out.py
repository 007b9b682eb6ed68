"""Issue 13 item 9: an output folder that cannot be written is refused before any work."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

pytest.importorskip("torch")


def _args(name: str, tiny_run, out: str) -> list[str]:
    return {
        "train": ["--data", str(tiny_run.data), "--out", out, "--image-size", "32",
                  "--base-filters", "16", "--epochs", "1", "--device", "cpu"],
        "eval": ["--checkpoint", str(tiny_run.checkpoint), "--data", str(tiny_run.data),
                 "--out", out, "--device", "cpu"],
        "bench": ["--models", "dunet", "--backends", "torch", "--batch-sizes", "1",
                  "--image-size", "32", "--base-filters", "16", "--out", out],
        "export": [str(tiny_run.checkpoint), "-o", out],
    }[name]


OPTION = {"train": "--out", "eval": "--out", "bench": "--out", "export": "-o/--out"}


@pytest.mark.parametrize("name", ["train", "eval", "bench", "export"])
@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_refused_at_once_naming_the_users_path(tiny_run, tmp_path, name, where):
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        needle = f"{OPTION[name]} {out}: cannot be created ({tmp_path / 'file'} is not a folder)"
    else:  # /sys refuses new files even to root
        out = tmp_path.root + "sys/dunet-out"
        needle = f"{OPTION[name]} {out}: not writable (in /sys): "
        try:
            with open("/sys/dunet-probe", "w"):
                pytest.skip("/sys is writable here")
        except OSError:
            pass
    module = __import__(f"dunet_deploy.cli.{name}", fromlist=["main"])
    res = CliRunner().invoke(module.main, _args(name, tiny_run, str(out)))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {needle}"), res.stderr
    assert ".tmp" not in lines[0] and res.stdout == ""  # refused before any work had output
