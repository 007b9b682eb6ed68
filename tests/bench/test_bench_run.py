"""The bench run loop on tiny CPU settings: bench.json after every record, the deadline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from dunet_deploy.bench import measure
from dunet_deploy.bench.config import BenchConfig
from dunet_deploy.bench.measure import Deadline
from dunet_deploy.bench.run import run_bench

TINY = BenchConfig(models=("dunet",), backends=("torch",), precisions=("fp32",),
                   batch_sizes=(1, 2, 3), iters=1, warmup=0, min_iters=1, image_size=32,
                   threads=1, base_filters=8, e2e=False, peak_sizes=(64,))


def test_bench_json_after_every_record_survives_a_crash(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = measure._time_batch
    seen: list[int] = []

    def crash_on_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        if len(seen) == 2:
            # What the disk holds just before the crash: both records, run not complete.
            doc = json.loads((tmp_path / "bench.json").read_text())
            assert doc["complete"] is False and len(doc["records"]) == 2
            raise KeyboardInterrupt  # a kill, an unhandled device error
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "_time_batch", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_bench(TINY, tmp_path, log=lambda s: None)
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch_size"] for r in doc["records"]] == [1, 2]
    assert doc["complete"] is False and not (tmp_path / "bench.md").exists()
    assert not list(tmp_path.glob(".bench.json.*"))  # atomic rewrites leave no temp file


def test_deadline_skips_what_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    real = measure._time_batch

    def ten_seconds_each(*args, **kwargs):  # type: ignore[no-untyped-def]
        now[0] += 10.0
        return real(*args, **kwargs)

    monkeypatch.setattr(measure, "_time_batch", ten_seconds_each)
    monkeypatch.setattr("dunet_deploy.bench.run.Deadline",
                        lambda s: Deadline(s, clock=lambda: now[0]))
    cfg = BenchConfig(**{**TINY.__dict__, "deadline_s": 15.0, "e2e": True})
    doc = run_bench(cfg, tmp_path, log=lambda s: None)
    assert [r["batch_size"] for r in doc["records"]] == [1, 2]  # started at t=0 and t=10
    skips = [(s.get("batch_size"), s["reason"]) for s in doc["skipped"]]
    assert (3, "deadline of 15 s reached before this was measured") in skips
    assert any(s["backend"] == "(e2e)" and "deadline" in s["reason"] for s in doc["skipped"])
    assert doc["complete"] is True
    assert json.loads((tmp_path / "bench.json").read_text())["complete"] is True


def test_deadline_caps_the_record_budget() -> None:
    now = [0.0]
    d = Deadline(30.0, clock=lambda: now[0])
    cfg = BenchConfig(**{**TINY.__dict__, "time_budget_s": 20.0})
    assert measure._budget(cfg, d) == 20.0
    now[0] = 25.0
    assert measure._budget(cfg, d) == 5.0 and not d.passed()
    now[0] = 31.0
    assert d.passed() and d.left() == 0.0
    assert measure._budget(cfg, Deadline(None)) == 20.0


def test_torch_compile_is_skipped_on_cpu_with_a_reason() -> None:
    from dunet_deploy.bench.backends import backend_unavailable

    assert "measured on CUDA only" in str(backend_unavailable("torch-compile", "fp32", "cpu"))


def test_importing_the_bench_package_is_cheap() -> None:
    code = ("import sys, dunet_deploy.bench as b; "
            "print(sorted(m for m in ('torch', 'numpy', 'onnx', 'dunet_deploy.bench.run') "
            "if m in sys.modules)); print(b.BenchConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["[]", "BenchConfig"]
