"""Bytes on the wire and wall time: ``dunet-infer --server-side`` vs client-side slabs.

Usage::

    .venv/bin/python benchmarks/server_side.py [--volumes 3] [--base-filters 8] [--out DIR]

Synthesizes full-size ATLAS-geometry volumes (197×233×189, int16 + slope, .nii.gz), exports a
D-UNet (``--base-filters``; the default 8 is a small stand-in: the bytes do not depend on the
width, the times do), and segments the volumes through a real ``tritonserver`` on loopback
twice: ``dunet-serve --repository`` (python-backend ``dunet`` + ``dunet_volume``) with
``--server-side``, and ``dunet-serve --engine`` with client-side slabs; both with ONNX Runtime
fp32 on the server. Reports per volume: file size, bytes sent and received (from
``summary.json``: the serialized gRPC request and response messages of each inference, for
server-side the file, for client-side the slab and probability tensors and their framing),
sent / file size, and wall seconds per volume. Writes
``server_side.json`` and ``server_side.md`` to ``--out`` (default
``benchmarks/results/<date>-<cpu-slug>-<cores>c/``). Goal (issue 14): server-side bytes sent
<= 1.1x the file size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "runtime"))


def _run_client(model: Path, volumes: list[Path], out: Path, url: str, *extra: str) -> dict:
    from triton_testutils import infer

    proc = infer(model, volumes, out, "--triton-url", url, *extra)
    if proc.wait(timeout=3600) != 0:
        raise SystemExit(f"dunet-infer failed: {proc.stderr.read()}")
    return json.loads((out / "summary.json").read_text())


def _rows(summary: dict, mode: str) -> list[dict]:
    rows = []
    for case in summary["cases"]:
        size = Path(case["input"]).stat().st_size
        rows.append({"mode": mode, "input": Path(case["input"]).name, "file_bytes": size,
                     "bytes_sent": case["bytes_sent"], "bytes_received": case["bytes_received"],
                     "sent_over_file": round(case["bytes_sent"] / size, 4)})
    return rows


def main() -> None:
    import torch
    from runtime_testutils import write_volume
    from triton_testutils import Server, write_repository

    from dunet_deploy.bench.core import slug
    from dunet_deploy.data.synth import synthesize_case
    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.machine import cpu_features
    from dunet_deploy.models import create_model
    from dunet_deploy.spec import PreprocessSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--base-filters", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cpu = cpu_features()
    cores = os.cpu_count() or 1
    out_dir = args.out or (ROOT / "benchmarks" / "results" /
                           f"{datetime.date.today():%Y-%m-%d}-{slug(cpu['model'])}-{cores}c")
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="dunet-bench-server-side-") as tmp:
        work = Path(tmp)
        spec = PreprocessSpec()  # ATLAS R1.1: 197×233×189 at 192×192
        torch.manual_seed(0)
        model = work / "model.onnx"
        export_onnx(create_model("dunet", base_filters=args.base_filters).eval(), spec, model)
        volumes = [write_volume(work / f"vol{i}.nii.gz", seed=i, shape=spec.volume_shape,
                                data=synthesize_case(spec.volume_shape, seed=i)[0])
                   for i in range(args.volumes)]
        results = []
        server = Server(["--repository", str(write_repository(work, model))], work / "a.log")
        try:
            s = _run_client(model, volumes, work / "server_side", server.grpc_url,
                            "--server-side")
        finally:
            server.stop()
        results.append(("server-side (dunet_volume)", s))
        server = Server(["--engine", str(model), "--backend", "onnxruntime"], work / "b.log")
        try:
            c = _run_client(model, volumes, work / "client_side", server.grpc_url)
        finally:
            server.stop()
        results.append(("client-side slabs (dunet)", c))
        rows = [r for mode, summ in results for r in _rows(summ, mode)]
    doc = {
        "cpu": cpu, "cores": cores, "base_filters": args.base_filters,
        "volume_shape": list(spec.volume_shape), "image_size": spec.image_size,
        "server": "dunet-serve, python backend, onnxruntime fp32, grpc on loopback",
        "wall_s_per_volume": {mode: round(summ["wall_s"] / summ["total"], 3)
                              for mode, summ in results},
        "rows": rows,
    }
    (out_dir / "server_side.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        f"# Server-side vs client-side Triton inference ({cpu['model']}, {cores} cores, "
        f"flags: {', '.join(f for f in cpu['flags'] if f.startswith(('amx', 'avx')))})",
        "",
        f"{args.volumes} synthetic {'x'.join(map(str, spec.volume_shape))} int16 .nii.gz volumes, "
        f"D-UNet base_filters={args.base_filters} at {spec.image_size} px (a stand-in: bytes do "
        "not depend on it, times do), ONNX Runtime fp32 in the server, gRPC on loopback. "
        "Server-side bytes are the serialized gRPC messages (request: the file, its name and "
        "the tensor header; response: mask and summary); client-side bytes are the serialized "
        "gRPC messages of the slab requests (tensors and their headers).",
        "",
        "| mode | input | file bytes | bytes sent | bytes received | sent / file |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {r['mode']} | {r['input']} | {r['file_bytes']:,} | {r['bytes_sent']:,} | "
          f"{r['bytes_received']:,} | {r['sent_over_file']:.3f} |" for r in rows],
        "",
        "Wall seconds per volume (whole dunet-infer run / volumes): " + ", ".join(
            f"{m} {v:.2f} s" for m, v in doc["wall_s_per_volume"].items())
        + " (client and server share the same cores; times from one run, noisy).",
        "",
    ]
    (out_dir / "server_side.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out_dir / 'server_side.json'} and server_side.md")


if __name__ == "__main__":
    main()
