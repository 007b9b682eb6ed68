"""``dunet-bench``: latency, throughput and % of peak of the model zoo per backend.

Example (the full CPU run is ``benchmarks/cpu.sh``)::

    dunet-bench --models dunet,unet3d,unet2d --backends torch,onnxruntime,openvino \\
        --batch-sizes 1,4,8,16,32 --precision fp32,bf16 --iters 5 --warmup 1 --out bench-out

``dunet-bench --pipeline`` measures the file pipeline instead (synthetic volumes,
a zero-cost stand-in model and the real one; ``--baseline DIR`` for an A/B against
another source tree) and writes ``OUT/pipeline.{json,md}``.

Writes ``OUT/bench.json``, ``OUT/bench.md`` and ``OUT/bench.png``. Combinations
that cannot run on this machine (TensorRT without a GPU, bf16 on a CPU without
native bf16, ...) are listed as skipped with the reason. Until the console
script is installed, run it as ``python -m dunet_deploy.cli.bench``.
"""

from __future__ import annotations

from pathlib import Path

import click

from dunet_deploy.bench.core import BACKENDS, PRECISIONS
from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch
from dunet_deploy.errors import DunetError

DEFAULT_MODELS = "dunet,unet3d,unet2d"
DEFAULT_BATCHES = "1,4,8,16,32"


def _names(option: str, text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise DunetError(f"{option} {text!r}: give a comma-separated list")
    if len(set(items)) != len(items):
        raise DunetError(f"{option} {text!r}: contains duplicates")
    return items


def parse_sizes(text: str, option: str = "--batch-sizes", minimum: int = 1) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)``; ``DunetError`` unless distinct integers >= ``minimum``."""
    items = _names(option, text)
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        raise DunetError(f"{option} {text!r}: expected integers like 1,4,8") from None
    for n in values:
        if n < minimum:
            raise DunetError(f"{option} {text!r}: {n} must be >= {minimum}")
    return values


#: Options only ``--pipeline`` runs read, and those only the end-to-end comparison reads.
PIPELINE_ONLY = frozenset({"pipeline", "volumes", "volume_shape", "workers_list",
                           "pipeline_models", "encodings", "model_path", "pipeline_backend",
                           "save_prob", "tta_modes", "baseline"})
E2E_ONLY = frozenset({"e2e_model", "e2e_batch_size", "e2e_repeats"})


def _command_line(ctx: click.Context) -> str:
    """The run as one explicit ``dunet-bench`` command: every option it uses spelled out,
    none that it ignores (``--pipeline``'s, and the end-to-end ones with ``--no-e2e``)."""
    import shlex

    unused = PIPELINE_ONLY | (frozenset() if ctx.params.get("e2e") else E2E_ONLY)
    words = ["dunet-bench"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None or param.name in unused:
            continue
        value = ctx.params.get(param.name)
        if value is None:
            continue
        if param.is_flag and param.secondary_opts:  # --e2e/--no-e2e
            words.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            if value:
                words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


@click.command(cls=DunetCommand)
@click.option("--models", default=DEFAULT_MODELS, show_default=True,
              help="Comma-separated registry names.")
@click.option("--backends", default=",".join(BACKENDS), show_default=True,
              help="Comma-separated: " + ", ".join(BACKENDS) + ".")
@click.option("--batch-sizes", default=DEFAULT_BATCHES, show_default=True,
              help="Comma-separated slabs per call.")
@click.option("--precision", "precisions", default=",".join(PRECISIONS), show_default=True,
              help="Comma-separated: " + ", ".join(PRECISIONS) + ".")
@click.option("--iters", type=int, default=20, show_default=True,
              help="Timed iterations per record (the most, see --time-budget).")
@click.option("--warmup", type=int, default=3, show_default=True,
              help="Untimed iterations per record.")
@click.option("--time-budget", "time_budget", type=float, default=None,
              help="Seconds per record: no warm-up or timed iteration starts that is expected "
                   "to end later (--min-iters timed ones always run).")
@click.option("--min-iters", type=int, default=None,
              help="Timed iterations that run whatever the budget [default: min(2, --iters)].")
@click.option("--image-size", type=int, default=192, show_default=True,
              help="Network input side S (multiple of 16).")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch / ONNX Runtime / OpenVINO [default: all usable cores].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--base-filters", type=int, default=None,
              help="Override every model's base filters (quick, small runs).")
@click.option("--e2e/--no-e2e", default=True, show_default=True,
              help="Also time the runtime pipeline on one synthetic volume against the model.")
@click.option("--e2e-model", default="dunet", show_default=True,
              help="Model for the end-to-end comparison.")
@click.option("--e2e-batch-size", type=int, default=16, show_default=True,
              help="Batch size of the end-to-end comparison.")
@click.option("--e2e-repeats", type=int, default=2, show_default=True,
              help="Interleaved repeats of the end-to-end comparison (best of each side).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep exported ONNX files and engines here [default: a temporary folder].")
@click.option("--peak-sizes", default=None,
              help="Square matmul sizes for the peak, e.g. 512,1024 [default: "
                   "256,384,512,1024,2048 on the CPU, 4096,8192,16384 on CUDA].")
@click.option("--deadline", "deadline", type=float, default=None,
              help="Seconds for the whole run: what is not measured by then is skipped "
                   "(bench.json is rewritten after every record either way).")
@click.option("--cuda-graph", is_flag=True,
              help="CUDA graphs in the TensorRT and ONNX Runtime (CUDA) sessions.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench-out"), show_default=True, help="Output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.option("--pipeline", is_flag=True,
              help="Instead: the file pipeline's ceiling (dunet-infer's read, preprocess, "
                   "postprocess, write) on synthetic volumes with a zero-cost stand-in model and "
                   "the real one; writes OUT/pipeline.{json,md}.")
@click.option("--volumes", type=int, default=4, show_default=True,
              help="--pipeline: volumes per run.")
@click.option("--volume-shape", default="197,233,189", show_default=True,
              help="--pipeline: X,Y,Z of the synthetic volumes.")
@click.option("--workers", "workers_list", default="0", show_default=True,
              help="--pipeline: comma-separated worker counts (0: one prefetch thread).")
@click.option("--pipeline-models", default="standin,real", show_default=True,
              help="--pipeline: standin (zero-cost model), real (the exported network).")
@click.option("--encodings", default="float32,int16", show_default=True,
              help="--pipeline: how the volumes are stored (float32, int16 + scl_slope).")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="--pipeline: ONNX for 'real' [default: a random-init export of "
                                 "--e2e-model].")
@click.option("--pipeline-backend", type=click.Choice(["auto", "onnxruntime", "openvino"]),
              default="auto", show_default=True, help="--pipeline: backend of the real model.")
@click.option("--save-prob", is_flag=True, help="--pipeline: also write probability maps.")
@click.option("--tta", "tta_modes", default="none", show_default=True,
              help="--pipeline: comma-separated test-time augmentation modes (none, flip): "
                   "flip's cost (a second network call per batch) shows with the real model.")
@click.option("--baseline", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--pipeline: a dunet-deploy source tree (e.g. a git worktree of an older "
                   "commit) run before each current run on the same files: an A/B.")
@handle_errors
def main(models: str, backends: str, batch_sizes: str, precisions: str, iters: int, warmup: int,
         time_budget: float | None, min_iters: int | None, image_size: int, threads: int | None,
         device: str, base_filters: int | None, e2e: bool, e2e_model: str, e2e_batch_size: int,
         e2e_repeats: int,
         cache_dir: Path | None, peak_sizes: str | None, deadline: float | None,
         cuda_graph: bool, seed: int, out_dir: Path, quiet: bool, pipeline: bool,
         volumes: int, volume_shape: str, workers_list: str, pipeline_models: str,
         encodings: str, model_path: Path | None, pipeline_backend: str, save_prob: bool,
         tta_modes: str, baseline: Path | None) -> None:
    """Benchmark models × backends × precisions × batch sizes; write OUT/bench.{json,md,png}."""
    if pipeline:
        from dunet_deploy.bench.pipeline_bench import PipelineConfig, parse_shape, run_to_folder

        pcfg = PipelineConfig(
            volumes=volumes, image_size=image_size,
            workers=parse_sizes(workers_list, "--workers", 0), shape=parse_shape(volume_shape),
            encodings=_names("--encodings", encodings),
            models=_names("--pipeline-models", pipeline_models),
            model_path=None if model_path is None else str(model_path), model_name=e2e_model,
            base_filters=base_filters, backend=pipeline_backend, threads=threads,
            batch_size=e2e_batch_size, save_prob=save_prob, seed=seed,
            tta=_names("--tta", tta_modes),
            baseline=None if baseline is None else str(baseline))
        written = run_to_folder(pcfg, out_dir, cache_dir,
                                log=(lambda s: None) if quiet else click.echo)
        click.echo(f"results in {written[-1]}")
        return
    require_torch("dunet-bench")
    from dunet_deploy.artifacts import check_output_dir
    from dunet_deploy.bench import BenchConfig, run_bench, validate_config

    kw = {} if threads is None else {"threads": threads}
    cfg = BenchConfig(
        models=_names("--models", models),
        backends=_names("--backends", backends),
        precisions=_names("--precision", precisions),
        batch_sizes=parse_sizes(batch_sizes),
        peak_sizes=parse_sizes(peak_sizes, "--peak-sizes", 16) if peak_sizes else None,
        iters=iters, warmup=warmup, time_budget_s=time_budget,
        min_iters=min(2, max(iters, 1)) if min_iters is None else min_iters, image_size=image_size,
        device=device, base_filters=base_filters, e2e=e2e, e2e_model=e2e_model,
        e2e_batch_size=e2e_batch_size, e2e_repeats=e2e_repeats, seed=seed,
        deadline_s=deadline, cuda_graph=cuda_graph,
        cache_dir=str(cache_dir) if cache_dir is not None else None, **kw,
    )
    validate_config(cfg)  # fail before creating OUT
    check_output_dir(out_dir, "--out")  # before any measurement: results are not lost at the end
    doc = run_bench(cfg, out_dir, log=(lambda s: None) if quiet else None,
                    command=_command_line(click.get_current_context()))
    click.echo(f"{len(doc['records'])} record(s), {len(doc['skipped'])} skipped; "
               f"results in {out_dir}/bench.md")


if __name__ == "__main__":
    main()
