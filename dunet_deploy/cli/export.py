"""``dunet-export``: checkpoint -> verified ONNX / FP16 ONNX / TensorRT engine / Triton repo.

Examples::

    dunet-export runs/best.pt -o export                      # model.onnx + model.json
    dunet-export runs/best.pt -o export --format onnx --format onnx-fp16
    dunet-export runs/best.pt -o export --format trt --batch-range 1,8,32
    dunet-export runs/best.pt -o export --format trt --format triton --triton-backend trt

Everything is written into a temporary folder beside ``OUT_DIR`` and moved into
place only when every requested artefact was built and verified: a failed
export leaves no file behind. Errors are one line on stderr, exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from dunet_deploy.artifacts import check_output_dir
from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch
from dunet_deploy.errors import DunetError
from dunet_deploy.export.pipeline import FORMATS, TRITON_BACKENDS, ExportRequest, run_export


# -------------------------------------------------------------------- options
def _batch_range(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int, int]:
    from dunet_deploy.export.tensorrt_build import parse_batch_range

    try:
        return parse_batch_range(value)
    except DunetError as e:
        raise click.BadParameter(str(e).split(": ", 1)[-1]) from None


def _opset(ctx: click.Context, param: click.Parameter, value: int) -> int:
    from dunet_deploy.export.onnx_export import MIN_OPSET

    if value < MIN_OPSET:
        raise click.BadParameter(f"{value} is too old; dunet-deploy exports opset >= {MIN_OPSET}")
    return value


@click.command(cls=DunetCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("export"),
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
    "+ model.plan.json; triton: triton/dunet/ model repository.",
)
@click.option(
    "--batch-range",
    default="1,8,32",
    show_default=True,
    callback=_batch_range,
    help="MIN,OPT,MAX batch sizes: TensorRT profile; MAX is Triton's max_batch_size.",
)
@click.option(
    "--opset", type=int, default=17, show_default=True, callback=_opset, help="ONNX opset (>= 17)."
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the numerical verification (ONNX Runtime/OpenVINO vs PyTorch).",
)
@click.option(
    "--triton-backend",
    type=click.Choice(TRITON_BACKENDS),
    default="onnx",
    show_default=True,
    help="Model file served by Triton (trt needs --format trt).",
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
    default=16,
    show_default=True,
    help="Most non-empty synthetic slabs used for verification.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the verification inputs."
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
    timing_cache: Path | None,
    workspace_mb: int | None,
    opt_level: int | None,
    verify_slabs: int,
    seed: int,
) -> None:
    """Export a dunet-deploy CHECKPOINT for deployment (ONNX, FP16 ONNX, TensorRT, Triton)."""
    require_torch("dunet-export")
    check_output_dir(out_dir, "-o/--out")  # before the export and its verification
    fmts = tuple(dict.fromkeys(formats or ("onnx",)))
    if "triton" in fmts and triton_backend == "trt":
        if "trt" not in fmts:
            raise DunetError("--triton-backend trt needs --format trt (the engine to serve)")
        if batch_range[0] != 1:
            raise DunetError(
                f"--triton-backend trt needs a batch range starting at 1 (Triton sends single "
                f"requests), got {','.join(map(str, batch_range))}"
            )
    req = ExportRequest(
        checkpoint=checkpoint,
        out_dir=out_dir,
        formats=fmts,
        batch_range=batch_range,
        opset=opset,
        verify=not no_verify,
        triton_backend=triton_backend,
        timing_cache=timing_cache,
        workspace_mb=workspace_mb,
        opt_level=opt_level,
        verify_slabs=verify_slabs,
        seed=seed,
    )
    written = run_export(req, log=click.echo)
    for rel in written:
        click.echo(f"wrote {out_dir / rel}")


if __name__ == "__main__":  # pragma: no cover
    main()
