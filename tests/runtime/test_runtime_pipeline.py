"""Volume pipeline pieces: input expansion, prefetching, slab skipping, torch-freedom."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import runtime_testutils as rt

from dunet_deploy.artifacts import ArtifactInfo
from dunet_deploy.data.preprocess import slices_to_slabs
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.core import predict_grid
from dunet_deploy.runtime.inprocess import Prefetcher
from dunet_deploy.runtime.pipeline import (
    InputItem,
    expand_inputs,
    output_stem,
    prepare_volume,
)

REPO = Path(__file__).resolve().parents[2]


class RecordingRunner(Runner):
    """A numpy 'model' (fake_engine_fn) that records the batches it gets."""

    backend = "fake"

    def __init__(self, max_batch: int | None = None) -> None:
        spec = rt.tiny_spec()
        super().__init__("fake.onnx", ArtifactInfo(spec=spec, model_name="dunet",
                                                   model_args={}, params=0))
        self._max_batch = max_batch
        self.batches: list[int] = []

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        return (None, 4, 32, 32)

    @property
    def max_batch(self) -> int | None:
        return self._max_batch

    @property
    def precision(self) -> str:
        return "fp32"

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        self.batches.append(slabs.shape[0])
        return rt.fake_engine_fn(slabs)


def test_output_stem():
    assert output_stem("/a/sub-1_T1w.nii.gz") == "sub-1_T1w"
    assert output_stem("x.NII") == "x"
    assert output_stem("scan.v2.nii") == "scan.v2"


def test_expand_inputs(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    for name in ("b.nii.gz", "a.nii", "notes.txt", "sub/c.nii.gz"):
        (d / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.nii.gz").write_bytes(b"")
    items = expand_inputs([d, str(d / "*.nii.gz"), str(tmp_path / "missing.nii.gz"),
                           str(tmp_path / "empty"), str(tmp_path / "nomatch*.nii"),
                           str(d / "**" / "c.nii.gz"), other / "a.nii.gz"])
    got = [(p.path.name, p.error is not None) for p in items]
    assert got == [("a.nii", False), ("b.nii.gz", False),  # dir: sorted, not recursive
                   ("missing.nii.gz", False),  # fails when read
                   ("empty", True), ("nomatch*.nii", True),
                   ("c.nii.gz", False),  # ** recurses; b.nii.gz via the glob is a duplicate
                   ("a.nii.gz", True)]  # same output name as d/a.nii
    assert "already used by" in items[-1].error and "no file matches" in items[4].error


def test_prefetcher_order_bound_and_early_stop(tmp_path, monkeypatch):
    from dunet_deploy.runtime import inprocess

    spec = rt.tiny_spec()
    paths = [rt.write_volume(tmp_path / f"v{i}.nii.gz", seed=i) for i in range(4)]
    started: list[str] = []
    real = inprocess.prepare_volume

    def slow_prepare(item, spec, resample="auto", reader=None, register=None):
        started.append(item.path.name)
        return real(item, spec, resample)

    monkeypatch.setattr(inprocess, "prepare_volume", slow_prepare)
    with Prefetcher([InputItem(p) for p in paths], spec, depth=1) as pre:
        it = iter(pre)
        first = next(it)
        time.sleep(0.3)
        # One volume handed out, one waiting in the queue, one being prepared at most.
        assert len(started) <= 3
    assert first.item.path == paths[0] and first.result.ok
    assert not any(t.name == "dunet-prefetch" for t in threading.enumerate())
    with Prefetcher([InputItem(p) for p in paths], spec, depth=2) as pre:
        assert [p.item.path for p in pre] == paths


def test_prepare_volume_skips_empty_slabs(tmp_path):
    spec = rt.tiny_spec()
    data = np.zeros(rt.SHAPE, np.float32)
    data[10:30, 10:40, 8:12] = 100.0  # tissue only in slices 8..11
    path = rt.write_volume(tmp_path / "v.nii.gz", data=data)
    prep = prepare_volume(InputItem(path), spec)
    # Slab z stacks z-2..z+1: slabs 7..13 see a non-empty slice.
    assert prep.indices.tolist() == list(range(7, 14))
    assert prep.result.slabs_run == 7 and prep.result.slabs_skipped == rt.SHAPE[2] - 7
    runner = RecordingRunner(max_batch=3)
    probs = predict_grid(prep.net, spec, runner, batch_size=16)
    assert runner.batches == [3, 3, 1]  # batch size capped at max_batch
    assert probs.shape == (rt.SHAPE[2], 1, 32, 32)
    skipped = np.setdiff1d(np.arange(rt.SHAPE[2]), prep.indices)
    assert not probs[skipped].any()
    expected = rt.fake_engine_fn(slices_to_slabs(prep.slices, spec, prep.indices))
    np.testing.assert_array_equal(probs[prep.indices], expected)
    empty = rt.write_volume(tmp_path / "e.nii.gz", data=np.zeros(rt.SHAPE, np.float32))
    prep = prepare_volume(InputItem(empty), spec)
    assert prep.result.ok and prep.indices.size == 0 and prep.slices is None
    grid = predict_grid(prep.net, spec, runner, batch_size=16)
    assert grid.shape == (rt.SHAPE[2], 1, 32, 32) and not grid.any()


def test_runtime_and_dunet_infer_never_import_torch(tmp_path):
    model = tmp_path / "model.onnx"
    rt.export_tiny_onnx(model)
    vol = rt.write_volume(tmp_path / "v.nii.gz")
    out = tmp_path / "out"
    code = f"""
import runpy, sys
import dunet_deploy.runtime, dunet_deploy.runtime.ort, dunet_deploy.runtime.openvino_runner
import dunet_deploy.runtime.tensorrt_runner, dunet_deploy.runtime.pipeline, dunet_deploy.cli.infer
assert 'torch' not in sys.modules, 'torch imported by the runtime modules'
import importlib.util
if importlib.util.find_spec('dunet_deploy.training.evaluate') is not None:
    import dunet_deploy.training.evaluate  # what dunet-eval --engine adds to the runtime
    assert 'torch' not in sys.modules, 'torch imported by dunet_deploy.training.evaluate'
for backend in ('onnxruntime', 'openvino'):
    sys.argv = ['dunet-infer', '--engine', {str(model)!r}, {str(vol)!r}, '-o',
                {str(out)!r} + backend, '--backend', backend, '--quiet']
    try:
        runpy.run_module('dunet_deploy.cli.infer', run_name='__main__')
    except SystemExit as e:
        assert e.code in (0, None), e.code
bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))
assert not bad, bad
print('torch-free')
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "torch-free"
    assert (tmp_path / "outopenvino" / "v_mask.nii.gz").is_file()
    assert (tmp_path / "outonnxruntime" / "v_mask.nii.gz").is_file()


def test_help_works_without_any_backend():
    code = ("import sys\n"
            "for m in ('onnxruntime', 'openvino', 'tensorrt', 'torch', 'tqdm'):\n"
            "    sys.modules[m] = None\n"
            "from dunet_deploy.cli.infer import main\n"
            "import os\n"
            "assert 'numpy' not in sys.modules  # so OPENBLAS_NUM_THREADS still takes effect\n"
            "assert os.environ['OPENBLAS_NUM_THREADS']\n"
            "main(['--help'])\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--engine" in proc.stdout and "--save-prob" in proc.stdout


def _imports(path: Path) -> set[str]:
    """Every ``dunet_deploy`` module a source file imports (at any depth, lazily or not)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {name for name in found if name.startswith("dunet_deploy")}


#: Each runtime module and the runtime modules it must never import: core <- stages
#: (pipeline) <- executors (inprocess, workers) <- segmenter <- CLI.
FORBIDDEN = {
    "core": {"pipeline", "inprocess", "workers", "segmenter", "options"},
    "options": {"core", "pipeline", "inprocess", "workers", "segmenter"},
    "pipeline": {"inprocess", "workers", "segmenter"},
    "inprocess": {"workers", "segmenter"},
    "workers": {"inprocess", "segmenter"},
}


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_runtime_imports_point_one_way(module):
    imported = _imports(REPO / "dunet_deploy" / "runtime" / f"{module}.py")
    bad = {name for name in imported
           for other in FORBIDDEN[module] if name.startswith(f"dunet_deploy.runtime.{other}")}
    assert not bad, f"runtime/{module}.py imports {sorted(bad)}"
    assert not any(name.startswith("dunet_deploy.cli") for name in imported)


def test_import_direction_check_sees_a_lazy_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dunet_deploy.runtime.segmenter import Segmenter\n")
    assert "dunet_deploy.runtime.segmenter" in _imports(source)


def test_prefetcher_forwards_bugs(tmp_path, monkeypatch):
    from dunet_deploy.runtime import inprocess

    def broken(item, spec, resample="auto", reader=None, register=None):
        raise RuntimeError("bug")

    monkeypatch.setattr(inprocess, "prepare_volume", broken)
    with Prefetcher([InputItem(tmp_path / "x.nii.gz")], rt.tiny_spec()) as pre, \
            pytest.raises(RuntimeError, match="bug"):
        list(pre)
