"""Checkpoint -> verified ONNX / FP16 ONNX / TensorRT engine / Triton repository.

:func:`run_export` is what ``dunet-export`` runs. Everything is written into a
temporary folder beside ``out_dir`` and moved into place only when every
requested artefact was built and verified: a failed export leaves no file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, sidecar_path, write_json
from dunet_deploy.errors import DunetError

FORMATS = ("onnx", "onnx-fp16", "trt", "triton")
TRITON_BACKENDS = ("onnx", "trt", "python")


@dataclass(frozen=True)
class ExportRequest:
    """Validated command-line options."""

    checkpoint: Path
    out_dir: Path
    formats: tuple[str, ...]
    batch_range: tuple[int, int, int]
    opset: int
    verify: bool
    triton_backend: str
    timing_cache: Path | None
    workspace_mb: int | None
    opt_level: int | None
    verify_slabs: int
    seed: int


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _staging_dir(out_dir: Path) -> Path:
    """A temporary folder on the same file system as ``out_dir`` (renames stay atomic)."""
    parent = out_dir.absolute().parent
    while not parent.is_dir():
        parent = parent.parent
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.dunet-export-", dir=parent))


def _onnx_io(spec: Any) -> dict[str, Any]:
    s = spec.image_size
    return {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": ["N", spec.in_channels, s, s]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", 1, s, s]},
    }


def run_export(req: ExportRequest, log: Callable[[str], None] = print) -> list[Path]:
    """Build, verify and write every requested artefact.

    Returns:
        The written paths, relative to ``req.out_dir``.

    Raises:
        DunetError: on any user-facing failure (nothing is written then).
    """
    from dunet_deploy.export import fp16 as fp16_mod
    from dunet_deploy.export import verify as ver
    from dunet_deploy.export.onnx_export import artifact_info, export_onnx, set_metadata
    from dunet_deploy.export.tensorrt_build import (
        EngineOptions,
        build_engine,
        check_tensorrt_available,
        probe_gpu,
        uses_strong_typing,
    )
    from dunet_deploy.flops import count_flops
    from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint

    formats = set(req.formats)
    trt_version = None
    if "trt" in formats:  # fail fast, before minutes of export work
        trt_version = check_tensorrt_available()
        probe_gpu()
    need_fp16 = "onnx-fp16" in formats or (
        trt_version is not None and uses_strong_typing(trt_version)
    )

    doc = load_checkpoint(req.checkpoint)
    model = model_from_checkpoint(doc, source=str(req.checkpoint))
    spec = doc["spec_obj"]
    source = {
        "checkpoint": req.checkpoint.name,
        "sha256": _sha256(req.checkpoint),
        "epoch": doc.get("epoch"),
        "best_metrics": doc.get("best_metrics", {}),
    }
    base_info = artifact_info(model, spec, metrics=doc.get("metrics") or {})
    chw = (spec.in_channels, spec.image_size, spec.image_size)

    stage = _staging_dir(req.out_dir)
    try:
        written: list[str] = []
        # ---------------------------------------------------------------- FP32
        onnx32 = stage / "model.onnx"
        proto = export_onnx(model, spec, onnx32, info=base_info, opset=req.opset)
        flops = count_flops(proto, (1, *chw))["per_sample"]
        inputs = (
            ver.verification_inputs(spec, seed=req.seed, max_synthetic_slabs=req.verify_slabs)
            if req.verify
            else {}
        )
        verification: dict[str, Any] = {"skipped": True}
        if req.verify:
            try:
                verification = ver.verify_fp32(model, onnx32, spec, inputs=inputs, log=log)
            except DunetError as e:
                raise DunetError(f"{e}; nothing written") from None
        extra32 = {
            "source": source,
            "onnx": {"file": "model.onnx", "opset": req.opset, **_onnx_io(spec)},
            "flops_per_slab": flops,
            "verification": verification,
        }
        write_json(stage / "model.json", replace(base_info, extra=extra32).to_json_dict())
        if "onnx" in formats:
            written += ["model.onnx", "model.json"]

        # ---------------------------------------------------------------- FP16
        onnx16 = stage / "model_fp16.onnx"
        fp16_verification: dict[str, Any] = {"skipped": True}
        if need_fp16:
            info16 = replace(base_info, precision="fp16")
            proto16, report = fp16_mod.convert_to_mixed_fp16(proto)
            set_metadata(proto16, info16)
            onnx16.write_bytes(proto16.SerializeToString())
            if req.verify:
                try:
                    fp16_verification = ver.verify_fp16(
                        onnx32, onnx16, spec, inputs=inputs, log=log
                    )
                except DunetError as e:
                    raise DunetError(f"{e}; nothing written") from None
            extra16 = {
                "source": source,
                "onnx": {"file": "model_fp16.onnx", "opset": req.opset, **_onnx_io(spec)},
                "flops_per_slab": flops,
                "fp16": {
                    "policy": fp16_mod.DEFAULT_POLICY.to_dict(),
                    "conversion": report.to_dict(),
                },
                "verification": fp16_verification,
            }
            write_json(stage / "model_fp16.json", replace(info16, extra=extra16).to_json_dict())
            if "onnx-fp16" in formats:
                written += ["model_fp16.onnx", "model_fp16.json"]

        # ------------------------------------------------------------ TensorRT
        plan = stage / "model.plan"
        cache_target = req.timing_cache or (req.out_dir / "timing.cache")
        if "trt" in formats:
            opts = EngineOptions(
                batch_range=req.batch_range,
                workspace_mb=req.workspace_mb,
                opt_level=req.opt_level,
                timing_cache=cache_target,
                timing_cache_out=stage / "timing.cache",
            )
            plan_bytes, trt_fields = build_engine(onnx32, onnx16 if need_fp16 else None, chw, opts)
            plan.write_bytes(plan_bytes)
            side = replace(
                base_info,
                precision="fp16",
                extra={
                    "source": source,
                    **trt_fields,
                    "flops_per_slab": flops,
                    "verification": fp16_verification,
                },
            )
            write_json(sidecar_path(plan), side.to_json_dict())
            written += ["model.plan", "model.plan.json"]

        # -------------------------------------------------------------- Triton
        if "triton" in formats:
            from dunet_deploy.export.triton_repo import write_triton_repo, write_volume_model

            backend = req.triton_backend
            triton_info = replace(base_info, precision="fp16") if backend == "trt" else base_info
            _lo, opt, hi = req.batch_range
            model_dir = write_triton_repo(
                stage / "triton",
                plan if backend == "trt" else onnx32,
                triton_info,
                backend=backend,
                max_batch_size=hi,
                preferred_batch_sizes=(opt, hi),
            )
            volume_dir = write_volume_model(stage / "triton", triton_info, batch_size=hi)
            written += [
                str(p.relative_to(stage))
                for d in (model_dir, volume_dir) for p in sorted(d.rglob("*")) if p.is_file()
            ]

        # --------------------------------------------------------------- commit
        req.out_dir.mkdir(parents=True, exist_ok=True)
        for rel in written:
            dst = req.out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dst)
        paths = [Path(p) for p in written]
        if "trt" in formats and (stage / "timing.cache").is_file():
            cache_target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(stage / "timing.cache"), str(cache_target))
        return paths
    finally:
        shutil.rmtree(stage, ignore_errors=True)
