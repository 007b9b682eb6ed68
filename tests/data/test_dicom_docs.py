"""docs/dicom.md's complete example runs as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("highdicom")

DOC = Path(__file__).resolve().parents[2] / "docs" / "dicom.md"


def test_complete_example_runs(tmp_path: Path) -> None:
    section = DOC.read_text().split("## A complete example", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "5760 voxels in block_seg.dcm"
    assert not proc.stderr
