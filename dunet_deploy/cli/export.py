"""``dunet-export``: checkpoint -> verified ONNX / FP16 ONNX / TensorRT engine / Triton repo.

Examples::

    dunet-export runs/best.pt -o export                      # model.onnx + model.json
    dunet-export runs/best.pt -o export --format onnx --format onnx-fp16
    dunet-export runs/best.pt -o export --format trt --batch-range 1,8,32
    dunet-export runs/best.pt -o export --format trt --format triton --triton-backend trt
    dunet-export runs/best.pt -o export --format onnx-int8 --calibration data
    dunet-export runs/best.pt -o export --format onnx-int8 --calibration data --format trt \
        --trt-precision int8
    dunet-export runs/best.pt -o export --tta flip --min-lesion-mm3 10   # shipped defaults

Everything is written into a staging folder inside ``OUT_DIR`` and moved into
place only when every requested artefact was built and verified: a failed
export leaves no file behind. Errors are one line on stderr, exit status 2.
The rules between options live in :meth:`ExportRequest.checked`; this module
only parses.
"""

from __future__ import annotations

from pathlib import Path

import click

from dunet_deploy.artifacts import check_output_dir
from dunet_deploy.choices import REGISTER_MODES, TTA_MODES
from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch
from dunet_deploy.errors import DunetError
from dunet_deploy.export.pipeline import (
    FORMATS,
    TRITON_BACKENDS,
    TRT_PRECISIONS,
    ExportRequest,
    run_export,
)
from dunet_deploy.spec import InferenceDefaults


# -------------------------------------------------------------------- options
def _batch_range(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int, int]:
    from dunet_deploy.export.tensorrt_build import parse_batch_range

    try:
        return parse_batch_range(value)
    except DunetError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


@click.command(cls=DunetCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=ExportRequest.out_dir,
    show_default=True,
    help="Output folder.",
)
@click.option(
    "--format",
    "formats",
    type=click.Choice(FORMATS),
    multiple=True,
    help="Artefact to build (repeatable; default: onnx). onnx: model.onnx + "
    "model.json; onnx-fp16: model_fp16.onnx + model_fp16.json; trt: model.plan "
    "+ model.plan.json; onnx-int8: model_int8.onnx + model_int8.json (needs "
    "--calibration); triton: triton/ model repository (dunet + dunet_volume).",
)
@click.option(
    "--batch-range",
    default=",".join(map(str, ExportRequest.batch_range)),
    show_default=True,
    callback=_batch_range,
    help="MIN,OPT,MAX batch sizes: TensorRT profile; MAX is Triton's max_batch_size.",
)
@click.option(
    "--opset", type=int, default=ExportRequest.opset, show_default=True,
    help="ONNX opset (>= 17).",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the numerical verification (ONNX Runtime/OpenVINO vs PyTorch).",
)
@click.option(
    "--triton-backend",
    type=click.Choice(TRITON_BACKENDS),
    default=ExportRequest.triton_backend,
    show_default=True,
    help="Network model served by Triton (trt needs --format trt; python runs model.onnx "
    "through our runtime, OpenVINO / ONNX Runtime, for CPU servers). dunet_volume, the "
    "whole pipeline on NIfTI bytes, is written beside it.",
)
@click.option(
    "--trt-precision",
    type=click.Choice(TRT_PRECISIONS),
    default=ExportRequest.trt_precision,
    show_default=True,
    help="TensorRT engine precision, built strongly typed from model_fp16.onnx (fp16) or from "
    "the gated QDQ model_int8.onnx (int8, needs --format onnx-int8).",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TensorRT timing cache, loaded if present and saved after the build "
    "[default: OUT_DIR/timing.cache].",
)
@click.option(
    "--workspace-mb", type=click.IntRange(min=1), help="TensorRT workspace memory pool limit (MiB)."
)
@click.option(
    "--opt-level",
    type=click.IntRange(0, 5),
    help="TensorRT builder optimisation level (default 3).",
)
@click.option(
    "--verify-slabs",
    type=click.IntRange(min=1),
    default=ExportRequest.verify_slabs,
    show_default=True,
    help="Most non-empty synthetic slabs used for verification.",
)
@click.option(
    "--seed", type=int, default=ExportRequest.seed, show_default=True,
    help="Seed of the verification inputs and of the calibration sampling.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path, file_okay=False),
    help="onnx-int8: dataset (any layout) whose slabs calibrate the int8 ranges; when it is "
    "the checkpoint's training set, its validation split is the gate's held-out set.",
)
@click.option(
    "--calibration-slabs", type=click.IntRange(min=1), default=ExportRequest.calibration_slabs,
    show_default=True, help="onnx-int8: number of calibration slabs (lesion slabs favoured).",
)
@click.option(
    "--calibration-cases", type=click.IntRange(min=1),
    help="onnx-int8: use at most this many calibration cases [default: all].",
)
@click.option(
    "--gate-data",
    type=click.Path(path_type=Path, file_okay=False),
    help="onnx-int8: held-out cases of the accuracy gate (needed when --calibration is not "
    "the checkpoint's training set).",
)
@click.option(
    "--gate-max-dsc-drop", type=float, default=ExportRequest.gate_max_dsc_drop, show_default=True,
    help="onnx-int8 gate: largest accepted drop of the mean per-case DSC vs fp32.",
)
@click.option(
    "--gate-min-lesion-dsc", type=click.FloatRange(0.0, 1.0),
    default=ExportRequest.gate_min_lesion_dsc, show_default=True,
    help="onnx-int8 gate: smallest accepted DSC of each held-out case's int8 mask against its "
    "fp32 mask (cases where fp32 finds >= 100 voxels).",
)
@click.option(
    "--gate-min-agreement", type=click.FloatRange(0.0, 1.0),
    default=ExportRequest.gate_min_agreement, show_default=True,
    help="onnx-int8 gate: smallest accepted fraction, per case, of the voxels of both masks "
    "and the truth where the int8 and fp32 masks agree.",
)
@click.option(
    "--tta",
    type=click.Choice(TTA_MODES),
    default="none",
    show_default=True,
    help="Default test-time augmentation stored in the artefacts (flip: mean with the "
    "left-right mirror); dunet-infer --tta overrides it.",
)
@click.option(
    "--min-lesion-mm3",
    type=float,
    default=0.0,
    show_default=True,
    help="Default smallest lesion (mm3) kept in masks, stored in the artefacts (0 = keep all).",
)
@click.option(
    "--template",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Registration template (a T1 NIfTI in the model's world, e.g. your MNI152 copy) "
    "written beside the models, for checkpoints trained without one.",
)
@click.option(
    "--register",
    type=click.Choice(REGISTER_MODES),
    default="auto",
    show_default=True,
    help="Default registration to the template stored in the artefacts (auto: scans that do "
    "not look registered are registered); dunet-infer --register overrides it.",
)
@handle_errors
def main(
    checkpoint: Path,
    out_dir: Path,
    formats: tuple[str, ...],
    batch_range: tuple[int, int, int],
    opset: int,
    no_verify: bool,
    triton_backend: str,
    trt_precision: str,
    timing_cache: Path | None,
    workspace_mb: int | None,
    opt_level: int | None,
    verify_slabs: int,
    seed: int,
    calibration: Path | None,
    calibration_slabs: int,
    calibration_cases: int | None,
    gate_data: Path | None,
    gate_max_dsc_drop: float,
    gate_min_lesion_dsc: float,
    gate_min_agreement: float,
    tta: str,
    min_lesion_mm3: float,
    template: Path | None,
    register: str,
) -> None:
    """Export a dunet-deploy CHECKPOINT for deployment (ONNX, FP16/INT8 ONNX, TensorRT, Triton)."""
    require_torch("dunet-export")
    check_output_dir(out_dir, "-o/--out")  # before the export and its verification
    req = ExportRequest(
        checkpoint=checkpoint,
        out_dir=out_dir,
        formats=formats,
        batch_range=batch_range,
        opset=opset,
        verify=not no_verify,
        triton_backend=triton_backend,
        trt_precision=trt_precision,
        timing_cache=timing_cache,
        workspace_mb=workspace_mb,
        opt_level=opt_level,
        verify_slabs=verify_slabs,
        seed=seed,
        calibration=calibration,
        calibration_slabs=calibration_slabs,
        calibration_cases=calibration_cases,
        gate_data=gate_data,
        gate_max_dsc_drop=gate_max_dsc_drop,
        gate_min_lesion_dsc=gate_min_lesion_dsc,
        gate_min_agreement=gate_min_agreement,
        inference=InferenceDefaults(tta=tta, min_lesion_mm3=min_lesion_mm3, register=register),
        template=template,
    )
    written = run_export(req, log=click.echo)
    for rel in written:
        click.echo(f"wrote {out_dir / rel}")


if __name__ == "__main__":  # pragma: no cover
    main()
