"""Statistics, derived record fields and ratios of dunet_deploy.bench.core (no models)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from dunet_deploy.bench.core import (
    SLABS_PER_VOLUME,
    RssMonitor,
    Skip,
    compute_ratios,
    cpu_features,
    dunet_vs_unet3d,
    e2e_ratio,
    machine_info,
    make_record,
    percentile,
    slug,
    summarize,
    time_callable,
    vs_torch_eager,
)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 101])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 95, 99, 100])
def test_percentile_matches_numpy_linear(n: int, q: float) -> None:
    values = np.random.default_rng(n).exponential(10.0, n).tolist()
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_known_values_and_order_independence() -> None:
    xs = list(range(1, 101))  # 1..100
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 95) == pytest.approx(95.05)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(list(reversed(xs)), 99) == percentile(xs, 99)
    assert percentile([4.0], 99) == 4.0


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize() -> None:
    st = summarize([3.0, 1.0, 2.0, 10.0])
    assert (st.n, st.min, st.max) == (4, 1.0, 10.0)
    assert st.mean == pytest.approx(4.0)
    assert st.p50 == pytest.approx(2.5)
    assert st.p50 <= st.p95 <= st.p99 <= st.max
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, math.nan])


def _rec(model: str, backend: str, precision: str, batch: int, p50: float, **kw: object):
    return make_record(
        model=model, backend=backend, precision=precision, batch_size=batch, device="cpu",
        image_size=192, in_channels=4, threads=2, warmup=1, latencies_ms=[p50, p50],
        gflop_per_slab=kw.get("gflop", 10.0), peak_gflops=kw.get("peak", 100.0),  # type: ignore[arg-type]
        peak_precision=precision, rss_mb=100.0,
    )


def test_make_record_derived_fields() -> None:
    r = make_record(
        model="dunet", backend="torch", precision="fp32", batch_size=4, device="cpu",
        image_size=192, in_channels=4, threads=2, warmup=1, latencies_ms=[200.0, 100.0, 300.0],
        gflop_per_slab=5.0, peak_gflops=50.0, peak_precision="fp32", rss_mb=1.0,
    )
    assert r.latency_ms_p50 == pytest.approx(200.0)
    assert r.ms_per_slab_p50 == pytest.approx(50.0)
    assert r.slabs_per_s == pytest.approx(1000 * 4 / 200.0)
    assert r.volumes_per_s == pytest.approx(r.slabs_per_s / SLABS_PER_VOLUME)
    assert r.gflops_achieved == pytest.approx(5.0 * 20.0)
    assert r.pct_of_peak == pytest.approx(100.0 * 100.0 / 50.0)
    assert r.iters == 3
    d = r.to_dict()
    assert d["slabs_per_s"] == pytest.approx(20.0) and d["model"] == "dunet"
    r.set_peak(200.0)  # a higher peak measured at the end of the run
    assert r.peak_gflops == 200.0 and r.pct_of_peak == pytest.approx(50.0)


def test_make_record_without_work_figures() -> None:
    r = make_record(
        model="m", backend="torch", precision="fp32", batch_size=1, device="cpu", image_size=32,
        in_channels=1, threads=1, warmup=0, latencies_ms=[1.0], gflop_per_slab=None,
        peak_gflops=None, peak_precision=None, rss_mb=None,
    )
    assert r.gflops_achieved is None and r.pct_of_peak is None
    with pytest.raises(ValueError):
        _rec("m", "torch", "fp32", 0, 1.0)


def test_dunet_vs_unet3d_uses_best_batch_per_model() -> None:
    recs = [
        _rec("dunet", "onnxruntime", "fp32", 1, 10.0),  # 10 ms/slab
        _rec("dunet", "onnxruntime", "fp32", 4, 20.0),  # 5 ms/slab (best)
        _rec("unet3d", "onnxruntime", "fp32", 1, 40.0),  # 40 ms/slab (best)
        _rec("unet3d", "onnxruntime", "fp32", 4, 200.0),  # 50 ms/slab
        _rec("dunet", "openvino", "fp32", 1, 3.0),  # no unet3d on openvino: no ratio
    ]
    (row,) = dunet_vs_unet3d(recs)
    assert (row["backend"], row["precision"]) == ("onnxruntime", "fp32")
    assert row["dunet_batch_size"] == 4 and row["unet3d_batch_size"] == 1
    assert row["ratio"] == pytest.approx(5.0 / 40.0)
    # Works on JSON dicts as well as Record objects.
    assert dunet_vs_unet3d([r.to_dict() for r in recs])[0]["ratio"] == pytest.approx(0.125)


def test_vs_torch_eager_same_model_and_precision() -> None:
    recs = [
        _rec("dunet", "torch", "fp32", 1, 30.0),
        _rec("dunet", "torch", "fp32", 2, 40.0),  # 20 ms/slab (best torch)
        _rec("dunet", "openvino", "fp32", 1, 10.0),
        _rec("dunet", "openvino", "bf16", 1, 5.0),  # no torch bf16: no entry
        _rec("unet3d", "onnxruntime", "fp32", 1, 8.0),  # no torch for unet3d: no entry
    ]
    (row,) = vs_torch_eager(recs)
    assert (row["model"], row["backend"], row["precision"]) == ("dunet", "openvino", "fp32")
    assert row["speedup"] == pytest.approx(20.0 / 10.0)
    assert row["torch_batch_size"] == 2


def test_e2e_ratio_and_compute_ratios() -> None:
    e = e2e_ratio(11.0, 10.0)
    assert e["ratio"] == pytest.approx(1.1) and e["meets_goal"] is True
    assert e2e_ratio(12.0, 10.0)["meets_goal"] is False
    with pytest.raises(ValueError):
        e2e_ratio(0.0, 1.0)
    out = compute_ratios([_rec("dunet", "torch", "fp32", 1, 1.0)], [e])
    assert out == {"dunet_vs_unet3d": [], "vs_torch_eager": [], "e2e": [e]}


def test_time_callable_counts_and_budget() -> None:
    calls: list[int] = []
    res = time_callable(lambda: calls.append(1), warmup=2, iters=5)
    assert len(calls) == 7 and res.warmup_done == 2 and len(res.latencies_ms) == 5
    assert all(v >= 0 for v in res.latencies_ms)
    synced: list[int] = []
    res = time_callable(lambda: time.sleep(0.02), warmup=3, iters=50, time_budget_s=0.01,
                        min_iters=2, sync=lambda: synced.append(1))
    # Budget spent after the first warm-up: one warm-up, min_iters timed calls.
    assert res.warmup_done == 1 and len(res.latencies_ms) == 2 and len(synced) == 3
    assert min(res.latencies_ms) >= 15.0
    # A call expected to overrun the budget: no warm-up at all, only the minimum.
    res = time_callable(lambda: None, warmup=3, iters=5, time_budget_s=1.0, min_iters=3,
                        expected_call_s=5.0)
    assert res.warmup_done == 0 and len(res.latencies_ms) == 5  # instant calls then fit
    with pytest.raises(ValueError):
        time_callable(lambda: None, warmup=0, iters=0)


def test_rss_monitor_and_machine_info() -> None:
    mon = RssMonitor()
    mon.reset()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB touched
    peak = mon.peak_mb()
    assert peak > 64 and block.sum() > 0
    info = machine_info()
    assert info["cores"] >= 1 and info["cpu_model"]
    assert isinstance(cpu_features()["native_bf16"], bool)


def test_slug_and_skip() -> None:
    assert slug("AMD EPYC 9B45 64-Core Processor") == "amd-epyc-9b45"
    assert slug("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz") == "intel-xeon-platinum-8480"
    assert slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert slug("???") == "unknown"
    assert "batch_size" not in Skip("m", "tensorrt", "fp16", "no GPU").to_dict()
    assert Skip("m", "torch", "fp32", "oom", 32).to_dict()["batch_size"] == 32
