"""bench.png: title says what was measured, readable ticks on small ranges (issue 13 item 12)."""

from __future__ import annotations

import pytest

from dunet_deploy.bench.report import _png_title, _scale_axis

plt = pytest.importorskip("matplotlib.pyplot")


def test_title_names_slab_size_and_width_and_flags_reduced_runs():
    doc = {"config": {"image_size": 32, "base_filters": 16}, "machine": {}}
    title = _png_title(doc)
    assert title.startswith("dunet-bench: 32×32 slabs, base filters 16")
    assert "reduced settings" in title
    full = _png_title({"config": {"image_size": 192, "base_filters": None}, "machine": {}})
    assert full.startswith("dunet-bench: 192×192 slabs, paper widths") and "reduced" not in full


def test_small_ranges_stay_linear_and_wide_ones_get_plain_log_ticks():
    fig, (a, b) = plt.subplots(1, 2)
    try:
        a.plot([1, 2, 3], [5.1, 5.5, 5.9])
        _scale_axis(a, "y", [5.1, 5.5, 5.9])
        assert a.get_yscale() == "linear"
        b.plot([1, 2, 3], [0.5, 20.0, 300.0])
        _scale_axis(b, "y", [0.5, 20.0, 300.0])
        assert b.get_yscale() == "log"
        fig.canvas.draw()
        labels = [t.get_text() for t in b.get_yticklabels() if t.get_text()]
        assert {"1", "10", "100"} <= set(labels) and not any("^" in x for x in labels)
    finally:
        plt.close(fig)
