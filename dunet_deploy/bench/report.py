"""``bench.md`` tables and ``bench.png`` plots from a ``bench.json`` document.

Both are pure functions of the JSON document, so a committed ``bench.json``
can be re-rendered later (:func:`write_report`) without re-running anything.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import atomic_write_bytes, write_json
from dunet_deploy.bench.core import BACKENDS, PRECISIONS, SLABS_PER_VOLUME

#: The paper's in-plane crop of an ATLAS slice: the only slab size whose volumes/s is real.
ATLAS_IMAGE_SIZE = 192

__all__ = ["render_markdown", "render_png", "write_outputs", "write_report"]

_PREC_ORDER = {p: i for i, p in enumerate(PRECISIONS)}
_BACK_ORDER = {b: i for i, b in enumerate(BACKENDS)}


def _fmt(x: Any, digits: int = 3) -> str:
    """Numbers with ``digits`` significant digits (no exponent below 1e6), '–' for None."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        mag = math.floor(math.log10(abs(x)))
        decimals = max(0, digits - 1 - mag)
        return f"{x:,.{decimals}f}"
    return str(x).replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A GitHub markdown table; ``align`` has one of l/r per column (default: l then r)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _sort_key(r: Mapping[str, Any]) -> tuple[Any, ...]:
    return (_BACK_ORDER.get(r["backend"], 99), _PREC_ORDER.get(r["precision"], 99),
            r["batch_size"])


def _models(doc: Mapping[str, Any]) -> list[str]:
    seen: list[str] = list(doc.get("config", {}).get("models", []))
    for r in doc.get("records", []):
        if r["model"] not in seen:
            seen.append(r["model"])
    return seen


def _machine_line(doc: Mapping[str, Any]) -> str:
    m = doc.get("machine", {})
    cfg = doc.get("config", {})
    parts = [f"CPU {m.get('cpu_model', '?')}"]
    if m.get("cpu_family") is not None:
        parts[-1] += f" (family {m.get('cpu_family')}, model {m.get('cpu_model_id')})"
    parts.append(f"{m.get('cores', '?')} cores")
    if m.get("gpu"):
        parts.append(f"GPU {m['gpu'].get('name')}")
    parts.append(f"device {cfg.get('device', '?')}, threads {cfg.get('threads', '?')}")
    return ", ".join(parts)


def _header_md(doc: Mapping[str, Any]) -> list[str]:
    """Machine, software, load, run settings and the definitions used in the tables."""
    m = doc.get("machine", {})
    cfg = doc.get("config", {})
    out: list[str] = ["# dunet-bench results", ""]
    out.append(f"**Machine:** {_machine_line(doc)}.  ")
    vers = ", ".join(f"{k} {v}" for k, v in sorted(m.get("versions", {}).items()))
    out.append(f"**Software:** {vers}.  ")
    native = [p for p, k in (("bf16", "cpu_native_bf16"), ("fp16", "cpu_native_fp16")) if m.get(k)]
    out.append(f"**CPU low precision:** {', '.join(native) or 'none native'} "
               f"(flags: {', '.join(m.get('cpu_flags', [])) or '–'}).  ")
    load = m.get("loadavg_start"), m.get("loadavg_end")
    if load[0] is not None:
        out.append(f"**Load average** (1/5/15 min) at start {_fmt_load(load[0])}, "
                   f"at end {_fmt_load(load[1])}.  ")
    out.append(f"**Run:** {doc.get('started', '?')}, {doc.get('wall_s', 0):.0f} s; image "
               f"{cfg.get('image_size')}×{cfg.get('image_size')}, warm-up {cfg.get('warmup')}, "
               f"up to {cfg.get('iters')} timed iterations"
               + (f" or {cfg['time_budget_s']} s per record" if cfg.get("time_budget_s") else "")
               + (f", base filters overridden to {cfg['base_filters']}"
                  if cfg.get("base_filters") else "")
               + ".  ")
    out.append(f"**Command:** `{doc.get('command', '')}`")
    volumes = (f"volumes/s = slabs/s ÷ {SLABS_PER_VOLUME} (the axial slices of an ATLAS "
               "volume); " if _atlas_slabs(doc) else
               f"no volumes/s: {cfg.get('image_size')}×{cfg.get('image_size')} slabs are not "
               f"an ATLAS volume's {ATLAS_IMAGE_SIZE}×{ATLAS_IMAGE_SIZE}; ")
    out += ["", "Latency is the wall time of one call on a batch (host slabs in, host "
            f"probabilities out); slabs/s = 1000·batch/p50; {volumes}% peak = achieved "
            "GFLOP/s (Conv + MatMul FLOPs of the ONNX graph) ÷ the matmul peak measured in "
            "this run at the same precision.", ""]
    return out


def _atlas_slabs(doc: Mapping[str, Any]) -> bool:
    """Whether the run's slabs are an ATLAS volume's, so slabs/s ÷ 189 is volumes/s."""
    return doc.get("config", {}).get("image_size") == ATLAS_IMAGE_SIZE


def _peak_md(doc: Mapping[str, Any]) -> list[str]:
    """The matmul peak table."""
    out = ["## Matrix-multiply peak (same run)", ""]
    peaks = doc.get("peak", {})
    out += _table(["precision", "device", "peak GFLOP/s", "library", "best n",
                   "by library (GFLOP/s)", "at start", "at end"],
                  [[p, v.get("device"), v.get("gflops"), v.get("library", "torch"),
                    v.get("best_size"),
                    ", ".join(f"{k}: {_fmt(g)}" for k, g in v.get("by_library", {}).items()),
                    v.get("gflops_at_start"), v.get("gflops_at_end")]
                   for p, v in peaks.items()], align="llrlrlrr")
    out += ["", "The peak is the best n×n matmul of the libraries the backends use, measured "
            "at the start and at the end of the run; % of peak uses the higher one. A large "
            "gap between the two means the machine was not quiet.", ""]
    return out


def _records_md(doc: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[str]:
    """One table of every record per model."""
    out: list[str] = []
    gpu_cols = any(r.get("gpu_mem_mb") is not None for r in records)
    for model in _models(doc):
        rows = [r for r in records if r["model"] == model]
        if not rows:
            continue
        g = rows[0].get("gflop_per_slab")
        out += [f"## {model} ({_fmt(g)} GFLOP per slab, {rows[0].get('in_channels')} input "
                "slices)", ""]
        volumes = _atlas_slabs(doc)
        headers = ["backend", "precision", "batch", "p50 ms", "p95 ms", "p99 ms", "ms/slab",
                   "slabs/s", *(["volumes/s"] if volumes else []), "GFLOP/s", "% peak",
                   "RSS MB"]
        if gpu_cols:
            headers.append("GPU MB")
        headers.append("iters")
        table = []
        for r in rows:
            row = [r["backend"], r["precision"], r["batch_size"], r["latency_ms_p50"],
                   r["latency_ms_p95"], r["latency_ms_p99"], r["ms_per_slab_p50"],
                   r["slabs_per_s"], *([r["volumes_per_s"]] if volumes else []),
                   r["gflops_achieved"], r["pct_of_peak"], r["rss_mb"]]
            if gpu_cols:
                row.append(r.get("gpu_mem_mb"))
            row.append(r["iters"])
            table.append(row)
        out += [*_table(headers, table, align="llr" + "r" * (len(headers) - 3)), ""]
    return out


def _best_md(records: Sequence[Mapping[str, Any]], volumes: bool = True) -> list[str]:
    """The best batch of each model × backend × precision (``volumes``: with volumes/s)."""
    out = ["## Best batch per model × backend × precision", ""]
    best: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for r in records:
        k = (r["model"], r["backend"], r["precision"])
        if k not in best or r["ms_per_slab_p50"] < best[k]["ms_per_slab_p50"]:
            best[k] = r
    vol = ["volumes/s"] if volumes else []
    out += _table(["model", "backend", "precision", "best batch", "ms/slab", "slabs/s",
                   *vol, "GFLOP/s", "% peak"],
                  [[r["model"], r["backend"], r["precision"], r["batch_size"],
                    r["ms_per_slab_p50"], r["slabs_per_s"],
                    *([r["volumes_per_s"]] if volumes else []),
                    r["gflops_achieved"], r["pct_of_peak"]]
                   for r in sorted(best.values(), key=lambda r: (r["model"], *_sort_key(r)))],
                  align="lllrrr" + "r" * (len(vol) + 2))
    out.append("")
    return out


def _ratios_md(ratios: Mapping[str, Any]) -> list[str]:
    """D-UNet / 3D UNet and backends / torch eager."""
    out = ["## Ratios (same run)", "",
           "### D-UNet / 3D UNet per-slab latency, best batch of each (target ≤ 0.25)", ""]
    rows_r = ratios.get("dunet_vs_unet3d", [])
    out += (_table(["backend", "precision", "dunet ms/slab", "unet3d ms/slab", "ratio",
                    "≤ 0.25"],
                   [[e["backend"], e["precision"], e["dunet_ms_per_slab"],
                     e["unet3d_ms_per_slab"], e["ratio"], e["ratio"] <= 0.25] for e in rows_r],
                   align="llrrrl")
            if rows_r else ["(needs dunet and unet3d on the same backend and precision)"])
    out += ["", "### Backends against torch eager (same model and precision, best batches)", "",
            "speedup = torch ms/slab ÷ backend ms/slab (> 1: faster than torch eager).", ""]
    rows_t = ratios.get("vs_torch_eager", [])
    out += (_table(["model", "backend", "precision", "backend ms/slab", "torch ms/slab",
                    "speedup"],
                   [[e["model"], e["backend"], e["precision"], e["backend_ms_per_slab"],
                     e["torch_ms_per_slab"], e["speedup"]] for e in rows_t], align="lllrrr")
            if rows_t else ["(needs torch and another backend at the same precision)"])
    return out


def _e2e_md(rows_e: Sequence[Mapping[str, Any]]) -> list[str]:
    """The whole pipeline on one volume against pure model time."""
    out = ["", "### End-to-end `dunet-infer` volume time against pure model time "
           "(goal ≤ 1.15)", ""]
    if not rows_e:
        return [*out, "(not measured in this run)"]
    out.append("pipeline = in-process `segment_files` wall time minus model load (read, "
               "preprocess, infer, post-process, write one NIfTI volume); model = "
               "`runner.infer` over the same non-empty slabs in the same batches (torch: the "
               "torch model behind the same pipeline); best of interleaved repeats for each.")
    out.append("")
    out += _table(["model", "backend", "precision", "volume", "slabs run", "batch",
                   "pipeline s", "volumes/s", "model s", "ratio", "≤ 1.15", "incl. load"],
                  [[e["model"], e["backend"], e["precision"],
                    "×".join(str(n) for n in e["volume_shape"]), e["slabs_run"],
                    e["batch_size"], e["pipeline_s"], e.get("volumes_per_s"), e["model_s"],
                    e["ratio"], e["meets_goal"], e.get("ratio_with_load")] for e in rows_e],
                  align="llllrrrrrrlr")
    return out


def _skipped_md(doc: Mapping[str, Any]) -> list[str]:
    out = ["", "## Skipped", ""]
    skipped = doc.get("skipped", [])
    out += (_table(["model", "backend", "precision", "batch", "reason"],
                   [[s["model"], s["backend"], s["precision"], s.get("batch_size", "all"),
                     s["reason"]] for s in skipped], align="lllll")
            if skipped else ["(nothing)"])
    if doc.get("plot_error"):
        out += ["", f"bench.png was not written: {doc['plot_error']}"]
    return out


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The ``bench.md`` text of a ``bench.json`` document."""
    records = sorted(doc.get("records", []), key=_sort_key)
    ratios = doc.get("ratios", {})
    out = [*_header_md(doc), *_peak_md(doc), *_records_md(doc, records),
           *_best_md(records, _atlas_slabs(doc)), *_ratios_md(ratios),
           *_e2e_md(ratios.get("e2e", [])), *_skipped_md(doc)]
    return "\n".join(out) + "\n"


def _fmt_load(load: Sequence[float] | None) -> str:
    return "–" if not load else "/".join(f"{x:.2f}" for x in load)


def _scale_axis(ax: Any, axis: str, values: Sequence[float]) -> None:
    """Log scale with plain 1-2-5 ticks over a decade or more, else linear (readable ticks).

    A log axis over a small range (5.1 to 5.9 ms) gets no labelled major tick
    and scientific minor labels; a linear axis reads better there.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) < 10:
        return
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    target.set_minor_formatter(NullFormatter())


def _png_title(doc: Mapping[str, Any]) -> str:
    """Title naming what was measured: slab size, model width, machine."""
    cfg = doc.get("config", {})
    size = cfg.get("image_size")
    filters = cfg.get("base_filters")
    what = f"{size}×{size} slabs" if size else "slabs"
    width = f"base filters {filters}" if filters else "paper widths (base filters 32)"
    reduced = (filters is not None and filters != 32) or (size is not None and size != 192)
    note = "  (reduced settings: not the paper-scale figures)" if reduced else ""
    return f"dunet-bench: {what}, {width}{note}\n{_machine_line(doc)}"


def render_png(doc: Mapping[str, Any]) -> bytes:
    """``bench.png``: ms/slab against batch per backend (one panel per model) and
    best throughput per model as grouped bars, one legend below the panels.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    records = sorted(doc.get("records", []), key=_sort_key)
    models = [m for m in _models(doc) if any(r["model"] == m for r in records)] or ["(none)"]
    series = sorted({(r["backend"], r["precision"]) for r in records},
                    key=lambda k: (_BACK_ORDER.get(k[0], 99), _PREC_ORDER.get(k[1], 99)))
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(series)}
    fig = plt.figure(figsize=(4.2 * max(len(models), 2), 8.6), dpi=110)
    grid = fig.add_gridspec(2, max(len(models), 1))
    for i, model in enumerate(models):
        ax = fig.add_subplot(grid[0, i])
        mine = [r for r in records if r["model"] == model]
        for key in series:
            pts = [(r["batch_size"], r["ms_per_slab_p50"]) for r in mine
                   if (r["backend"], r["precision"]) == key]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", color=colors[key])
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for r in mine})
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
        _scale_axis(ax, "y", [r["ms_per_slab_p50"] for r in mine])
        ax.set_title(model)
        ax.set_xlabel("batch size")
        if i == 0:
            ax.set_ylabel("ms per slab (p50)")
        ax.grid(True, which="major", alpha=0.3)
    ax = fig.add_subplot(grid[1, :])
    width = 0.8 / max(len(series), 1)
    best: list[float] = []
    for j, key in enumerate(series):
        vals = []
        for model in models:
            rs = [r["slabs_per_s"] for r in records
                  if r["model"] == model and (r["backend"], r["precision"]) == key]
            vals.append(max(rs) if rs else 0.0)
        best += vals
        pos = [i + (j - (len(series) - 1) / 2) * width for i in range(len(models))]
        ax.bar(pos, vals, width=width, color=colors[key], label=f"{key[0]} {key[1]}")
    ax.set_xticks(range(len(models)), models)
    ax.set_ylabel("slabs/s (best batch)")
    _scale_axis(ax, "y", best)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    if series:  # one legend for every panel, outside the data
        fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=8,
                   ncol=min(len(series), 5), frameon=False)
    fig.suptitle(_png_title(doc), fontsize=9)
    rows = 1 + (len(series) - 1) // 5 if series else 0
    fig.tight_layout(rect=(0, 0.03 + 0.025 * rows, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_outputs(out_dir: str | os.PathLike[str], doc: dict[str, Any]) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.png`` and ``bench.md`` into ``out_dir``, each atomically.

    A missing matplotlib is not fatal: ``bench.md`` says why there is no plot.

    Returns:
        The paths written, by kind.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "md": out / "bench.md"}
    try:
        atomic_write_bytes(out / "bench.png", render_png(doc))
        paths["png"] = out / "bench.png"
        doc.pop("plot_error", None)
    except ImportError as exc:
        doc["plot_error"] = f"matplotlib is not installed ({exc})"
    write_json(paths["json"], doc)
    atomic_write_bytes(paths["md"], render_markdown(doc).encode())
    return paths


def write_report(json_path: str | Path) -> dict[str, Path]:
    """Re-render ``bench.md`` and ``bench.png`` beside an existing ``bench.json``."""
    import json

    path = Path(json_path)
    doc = json.loads(path.read_text())
    return write_outputs(path.parent, doc)
