"""``dunet-infer``: segment T1 NIfTI volumes with an exported model (no torch needed).

Example::

    dunet-infer --engine runs/export/model.onnx scans/ extra/*.nii.gz -o out/

writes ``out/<name>_mask.nii.gz`` (uint8, the input's geometry) per volume,
``out/<name>_prob.nii.gz`` with ``--save-prob``, and ``out/summary.json``. A
folder holding a DICOM series (or a ``.zip`` of one) is an input too (one per
3D series; ``--series UID`` picks one); ``--dicom-seg`` also writes
``out/<name>_seg.dcm``, a DICOM SEG of the source series (docs/dicom.md).

Many machines (docs/many-machines.md)::

    dunet-infer --engine model.onnx scans/ -o out/ --shard 3/8 --skip-existing  # one of 8 jobs
    dunet-infer --merge out/ scans/               # summary-*-of-8.json -> out/summary.json
    dunet-infer --engine model.onnx scans/ -o out/ --ray 10.0.0.1:6379      # a Ray cluster

Exit codes: 0 all volumes segmented; 1 some inputs failed, a missing or
truncated one included, even when it is the only one (each reported as
``error: <input>: <reason>`` on stderr and in summary.json, the others still
processed), or ``--merge`` found failed or missing cases; 2 usage or model
error, or a folder or pattern that gives no scan (nothing segmented, no output
folder left behind).
"""

from __future__ import annotations

import os

# numpy's OpenBLAS must be single-threaded here, and this has to happen before
# numpy is imported: the model backend already uses every core, and the
# preprocessing matmuls run beside it on the prefetch thread, where a
# multi-threaded OpenBLAS busy-waits against the backend's threads (a 0.3 s
# resize measured up to 7 s that way). Set OPENBLAS_NUM_THREADS to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys
from pathlib import Path
from typing import Any

import click

from dunet_deploy.choices import (
    BACKENDS,
    DEVICES,
    PRECISIONS,
    PROB_DTYPES,
    RAY_LAYOUTS,
    REGISTER_MODES,
    RESAMPLE_MODES,
    TTA_MODES,
)
from dunet_deploy.cli._common import DunetCommand, fail, handle_errors, one_line
from dunet_deploy.errors import DunetError

EXIT_SOME_FAILED = 1

#: Parameters of ``main`` that are not :class:`~dunet_deploy.runtime.options.InferenceOptions`
#: fields: what the command itself does with them (every other parameter is a field;
#: tests/cli/test_infer_cli.py::test_every_parameter_is_an_option_or_cli_only checks it).
CLI_ONLY = frozenset({"model_path", "inputs", "out_dir", "triton_url", "server_side", "preview",
                      "quiet",
                      # many machines: which shard, merging shards, a Ray cluster
                      "shard", "merge", "ray_address", "ray_actors", "ray_gpus_per_actor",
                      "ray_cpus_per_actor", "ray_layout",
                      "calibrate_workers"})
#: Flags spelled otherwise than ``--<field-name>`` (for messages about an option).
FLAGS = {"model": "--engine", "inputs": "INPUTS", "url": "--triton-url"}


class _Progress:
    """A tqdm bar over the volumes on stderr, or nothing (not a tty, --quiet, no tqdm)."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start(self, total: int) -> None:
        if not self._enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="vol", file=sys.stderr, dynamic_ncols=True)

    def error(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)  # keeps the bar intact
        else:
            click.echo(text, err=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _expand(inputs: tuple[str, ...], options: Any, out_dir: Path) -> list[str]:
    """The volumes to segment; what is not a scan is left out with a note on stderr.

    Raises:
        DunetError: when a folder or pattern matches no scan, or ``--dicom-seg``
            is given a NIfTI input (before anything is created).
    """
    from dunet_deploy.runtime.dicom_io import ScanReader, refuse_non_dicom
    from dunet_deploy.runtime.pipeline import expand_inputs

    skipped: list[tuple[Path, str]] = []
    items = expand_inputs(inputs, recursive=options.recursive, skipped=skipped,
                          reader=ScanReader(options.series), out_dir=out_dir)
    if options.dicom_seg:
        try:
            refuse_non_dicom(items)
        except DunetError as exc:
            raise DunetError(exc.for_command(FLAGS)) from None
    for path, why in skipped:
        click.echo(f"note: {path}: skipped, {why}", err=True)
    for item in items:
        if item.matched_nothing:
            raise DunetError(str(item.error))
    return [str(item.path) for item in items]


# Below this many volumes the calibration's minute would not pay for itself.
_HINT_MIN_VOLUMES = 8


def _hint_calibration(volumes: int) -> None:
    """Say once per run that the worker count is a guess on this machine (issue 22.6).

    The core-count rule's choice is the best on some CPUs and not on others (2 cores:
    0 on an Intel Xeon and an AMD Zen 3, 3 on an AMD Zen 4), so a run of a cohort
    without a calibration on record points at ``--calibrate-workers``.
    """
    from dunet_deploy.runtime.workers import calibrated_workers, default_workers

    if volumes < _HINT_MIN_VOLUMES or calibrated_workers() is not None:
        return
    click.echo(f"note: --workers {default_workers()} by the core-count rule, not measured on "
               "this machine; `dunet-infer --calibrate-workers` measures the best count once "
               "(about a minute) and makes it the default (2 cores: 0 is best on an Intel Xeon "
               "and an AMD Zen 3, 3 on an AMD Zen 4)", err=True)


def build_options(params: dict[str, Any]) -> Any:
    """The run's :class:`~dunet_deploy.runtime.options.InferenceOptions` from ``main``'s parameters.

    ``workers`` left out becomes :func:`~dunet_deploy.runtime.workers.default_workers`.

    Raises:
        DunetError: for an invalid combination (with the flag named).
    """
    from dunet_deploy.runtime.options import InferenceOptions
    from dunet_deploy.runtime.workers import default_workers

    fields = {k: v for k, v in params.items() if k not in CLI_ONLY}
    if fields.get("workers") is None:
        fields["workers"] = default_workers()
    try:
        return InferenceOptions(**fields)
    except DunetError as exc:
        raise DunetError(exc.for_command(FLAGS)) from None


def _check_remote(options: Any, model_path: Path | None, triton_url: str | None,
                  server_side: bool) -> None:
    """Refuse, before any work, what a run on a Triton server cannot do (one line each).

    Raises:
        DunetError: --server-side without --triton-url, no --engine without
            --triton-url, a bad URL, or an option the server would not apply.
    """
    from dunet_deploy.runtime.triton_client import check_remote, check_server_side, check_url

    if server_side and not triton_url:
        raise DunetError("--server-side needs --triton-url URL (the dunet-serve server that "
                         "runs the pipeline)")
    if model_path is None and not triton_url:
        raise DunetError("missing option --engine MODEL (only a run on a Triton server, "
                         "--triton-url, can do without a local copy of the model)")
    try:
        if triton_url is not None:
            check_url(triton_url)
        if server_side:
            check_server_side(options)
        elif triton_url:
            check_remote(options)
    except DunetError as exc:
        raise DunetError(exc.for_command(FLAGS)) from None


@click.command(cls=DunetCommand)
@click.option("--engine", "model_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Model: .onnx (ONNX Runtime / OpenVINO) or a TensorRT .plan with its "
                   ".plan.json sidecar. Optional with --triton-url (the server holds the "
                   "model; when given, the server's spec must match it).  [required, except "
                   "with --triton-url, --merge or --calibrate-workers]")
@click.argument("inputs", nargs=-1, metavar="INPUTS...")
@click.option("-o", "--out", "out_dir",
              type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created if missing).  [required, except with --merge]")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="auto: .plan/.engine -> tensorrt; .onnx -> openvino if installed "
                   "(bf16 on CPUs that have it: the fastest CPU path), else onnxruntime.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(list(DEVICES)),
              help="onnxruntime execution provider (auto: CUDA when available, else CPU).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Slabs per model call (capped at an engine's maximum batch).")
@click.option("--save-prob", is_flag=True,
              help="Also write <name>_prob.nii.gz (float32 probabilities).")
@click.option("--prob-dtype", type=click.Choice(PROB_DTYPES), default="float32", show_default=True,
              help="Type of --save-prob maps: float32, or uint16 (p x 65535 with scl_slope: half "
                   "the size; NIfTI has no float16).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Backend CPU threads (default: the backend's choice, all cores).")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(list(PRECISIONS)),
              help="auto: openvino bf16 where the CPU has it, else the model's precision.")
@click.option("--triton-url", default=None, metavar="URL",
              help="Run the model on a dunet-serve Triton server (http://HOST:PORT or "
                   "grpc://HOST:PORT) instead of locally; --engine, when given, names the "
                   "model whose spec the server must match. --backend/--device/--threads/"
                   "--precision are the server's (dunet-serve) and refused here.")
@click.option("--tta", type=click.Choice(TTA_MODES), default=None,
              help="Test-time augmentation: flip = mean with the left-right mirror.  "
                   "[default: the model's, set at export; else none]")
@click.option("--min-lesion-mm3", type=click.FloatRange(min=0), default=None,
              help="Remove connected lesions smaller than this (mm3).  [default: the model's, "
                   "set at export; else 0 = keep all]")
@click.option("--resample", type=click.Choice(RESAMPLE_MODES), default="auto", show_default=True,
              help="auto: scans with another spacing or grid are resampled onto the model's "
                   "training grid (and the mask back); never: refuse them.")
@click.option("--cuda-graph", is_flag=True,
              help="TensorRT / ONNX Runtime CUDA: capture and replay a CUDA graph per batch size.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Worker processes that read/preprocess and post-process/write while this "
                   "process keeps the model busy; 0 = all in this process.  [default: the "
                   "count --calibrate-workers measured on this machine; else 0 on 1-2 cores, "
                   "else half the cores, at most 4]")
@click.option("--server-side", is_flag=True,
              help="With --triton-url: send each file's bytes to the server's dunet_volume "
                   "model (dunet-serve --repository), which runs the whole pipeline with "
                   "this run's --tta, --min-lesion-mm3, --resample, --register, --bias-correct "
                   "and --batch-size; options "
                   "it cannot apply (--save-prob, --workers, --backend, ...) are refused.")
@click.option("--preview", is_flag=True,
              help="Also write OUT/<name>_preview.png: slices over the lesion with the "
                   "prediction's outline (and the reference mask's when the layout has one), "
                   "lesion volume and DSC; and for registered scans OUT/<name>_registration.png "
                   "(the template's brain outline over the registered scan). Needs matplotlib.")
@click.option("-r", "--recursive", is_flag=True,
              help="Folders: also segment the scans in their sub-folders.")
@click.option("--series", default=None, metavar="UID",
              help="DICOM inputs: segment only the series with this Series Instance UID "
                   "(default: every 3D series of a folder, each named "
                   "<folder>_s<number>_<description>).")
@click.option("--dicom-seg", is_flag=True,
              help="Also write OUT/<name>_seg.dcm: the mask as a DICOM Segmentation of the "
                   "source series (DICOM inputs only).")
@click.option("--register", type=click.Choice(REGISTER_MODES), default=None,
              help="Registration to the model's template (template.nii.gz beside it): auto = "
                   "scans that do not look registered are registered (12-parameter affine), "
                   "segmented there and the mask brought back onto the scan's grid; always; "
                   "never = warn when a scan does not look registered.  [default: the "
                   "model's, set at export; else auto]")
@click.option("--bias-correct", is_flag=True,
              help="N4 bias-field correction of each scan before normalisation (SimpleITK; "
                   "a few seconds per scan).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no final summary line.")
# -- many machines (docs/many-machines.md) --
@click.option("--skip-existing", is_flag=True,
              help="Do not redo inputs whose outputs in OUT are complete and were made by the "
                   "same model and output-affecting options (recorded in OUT's summaries): "
                   "resumes a cut-off or pre-empted run.")
@click.option("--shard", metavar="I/N", default=None,
              help="Segment only part I of N of the inputs (by a hash of each path relative "
                   "to its input: stable when files are added) and write "
                   "OUT/summary-I-of-N.json; for job arrays (Slurm --array=1-N).")
@click.option("--merge", type=click.Path(file_okay=False, path_type=Path), default=None,
              metavar="OUT",
              help="Combine the shards' OUT/summary-I-of-N.json into OUT/summary.json, listing "
                   "missing and failed cases (give the INPUTS to name the cases of shards that "
                   "wrote nothing); needs no model.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              metavar="[ADDRESS]",
              help="Run on a Ray cluster (extra 'ray'): a pool of model actors, with reading "
                   "and writing in CPU tasks around them (GPUs) or in the actors (see "
                   "--ray-layout). ADDRESS: host:port of a running cluster or 'auto'; "
                   "none: $RAY_ADDRESS, else a local cluster. OUT, the model and the inputs "
                   "must be at the same paths on every node.")
@click.option("--ray-actors", type=click.IntRange(min=1), default=None,
              help="With --ray: model actors.  [default: one per GPU; without GPUs one per CPU "
                   "(fused), half the CPUs (split)]")
@click.option("--ray-gpus-per-actor", type=click.FloatRange(min=0), default=None,
              help="With --ray: GPUs each actor holds.  [default: 1 if the cluster has GPUs, "
                   "else 0]")
@click.option("--ray-cpus-per-actor", type=click.FloatRange(min=0), default=None,
              help="With --ray: CPUs each actor holds; its backend gets as many threads (unless "
                   "--threads).  [default: 1]")
@click.option("--ray-layout", type=click.Choice(RAY_LAYOUTS), default=None,
              help="With --ray: split = read and write in CPU tasks around the model actors "
                   "(a GPU never waits for a read); fused = each actor runs whole cases (only "
                   "paths and results move through Ray).  [default: auto: split when the "
                   "actors hold GPUs, else fused]")
@click.option("--calibrate-workers", is_flag=True,
              help="Measure which --workers count is fastest on this machine (about a minute, "
                   "stand-in model on synthetic full-size scans) and make it the default here; "
                   "needs no model.")
@handle_errors
def main(model_path: Path | None, inputs: tuple[str, ...], out_dir: Path, backend: str, device: str,
         batch_size: int, save_prob: bool, prob_dtype: str, threads: int | None, precision: str,
         triton_url: str | None, tta: str | None, min_lesion_mm3: float | None, resample: str,
         cuda_graph: bool, workers: int | None, server_side: bool, preview: bool,
         recursive: bool, series: str | None, dicom_seg: bool, register: str | None,
         bias_correct: bool,
         quiet: bool, skip_existing: bool, shard: str | None, merge: Path | None,
         ray_address: str | None, ray_actors: int | None,
         ray_gpus_per_actor: float | None, ray_cpus_per_actor: float | None,
         ray_layout: str | None,
         calibrate_workers: bool) -> None:
    """Segment stroke lesions in INPUT volumes (NIfTI files, DICOM series, directories or globs).

    Writes OUT/<name>_mask.nii.gz per input (same shape, affine, qform/sform
    and voxel sizes as the input) and OUT/summary.json (per-case status,
    lesion volume, slabs run/skipped and time per stage). Lesion masks found
    in folders (ATLAS LesionSmooth, label-..._mask, labelsTr/) are skipped.
    """
    # Imported here so that `dunet-infer --help` stays instant.
    from dunet_deploy.artifacts import check_output_dir
    from dunet_deploy.runtime.pipeline import (
        SUMMARY_NAME,
        CaseResult,
        missing_folders,
        remove_empty_folders,
    )

    ctx = click.get_current_context()
    if merge is not None:
        _merge(merge, inputs, recursive, quiet)
        return
    if calibrate_workers:
        _calibrate(quiet)
        return
    many = _many_machines(ctx.params)
    _require(ctx, "inputs", "out_dir")
    params = dict(ctx.params)
    if server_side and params["workers"] is None:
        params["workers"] = 0  # the server reads and writes: no worker processes here
    options = build_options(params)
    _check_remote(options, model_path, triton_url, server_side)
    volumes = _expand(inputs, options, out_dir)
    if ctx.params["workers"] is None and not (server_side or quiet or many.cluster):
        _hint_calibration(len(volumes))
    check_output_dir(out_dir, "-o/--out")
    if preview:
        from dunet_deploy.runtime.preview import require_matplotlib

        require_matplotlib()
    progress = _Progress(enabled=not quiet)
    created = missing_folders(out_dir)

    def triton_runner(path: Path, info: Any) -> Any:
        from dunet_deploy.runtime.triton_client import TritonRunner

        return remote if model_path is None else TritonRunner(str(triton_url), expected=info)

    remote: Any = None
    if triton_url and not server_side and model_path is None:
        from dunet_deploy.runtime.triton_client import TritonRunner

        remote = TritonRunner(triton_url)  # the server's description stands for the model

    def on_start(runner: Any, total: int) -> None:
        progress.start(total)

    def on_result(result: CaseResult) -> None:
        if not result.ok:
            progress.error(f"error: {one_line(result.message)}")
        for warning in result.warnings:
            progress.error(f"warning: {result.input}: {one_line(warning)}")
        progress.advance()

    try:
        if server_side:
            from dunet_deploy.artifacts import read_artifact_info
            from dunet_deploy.runtime.triton_client import segment_server_side

            assert triton_url is not None  # _check_remote
            summary = segment_server_side(
                triton_url, volumes, out_dir,
                expected=None if model_path is None else read_artifact_info(model_path),
                on_start=progress.start, on_result=on_result, options=options)
        elif many.cluster is not None:
            from dunet_deploy.runtime.ray_exec import segment_on_ray

            assert model_path is not None  # _check_remote: no --triton-url with --ray

            summary = segment_on_ray(model_path, inputs, out_dir, options, many.cluster,
                                     on_result=on_result, shard=many.shard)
        else:
            from dunet_deploy.runtime.segmenter import Segmenter

            with Segmenter(model_path or str(triton_url), options, lazy=True,
                           info=None if remote is None else remote.info,
                           runner_factory=triton_runner if triton_url else None) as seg:
                # The inputs as given: the summary records what the search left out.
                summary = seg.predict_files(inputs, out_dir, on_start=on_start,
                                            on_result=on_result, shard=many.shard)
    except BaseException:
        remove_empty_folders(created)  # a run that failed leaves no empty folder it made
        raise
    finally:
        progress.close()
    if preview:
        from dunet_deploy.runtime.preview import write_previews

        shown = write_previews(summary["cases"], out_dir)
        if not quiet:
            click.echo(f"wrote {len(shown)} preview(s): {Path(out_dir)}/*_preview.png")
        if model_path is not None and not triton_url:  # the template lies beside the model
            from dunet_deploy.runtime.register_stage import write_registration_previews

            registered = write_registration_previews(summary["cases"], model_path, out_dir)
            if registered and not quiet:
                click.echo(f"wrote {len(registered)} registration preview(s): "
                           f"{Path(out_dir)}/*_registration.png")
    earlier = len(summary.get("earlier_cases") or [])
    if earlier:
        click.echo(f"note: {out_dir}: {earlier} case(s) of earlier runs are kept (not segmented "
                   f"again); {SUMMARY_NAME} lists them under earlier_cases", err=True)
    if not quiet:
        kept = summary.get("skipped_existing") or 0
        click.echo(
            f"{summary['ok']}/{summary['total']} volume(s) segmented with {summary['backend']} "
            f"({summary['precision']}, {summary['device']}) in {summary['wall_s']:.1f} s"
            f"{f' ({kept} already done, skipped)' if kept else ''}; "
            f"summary: {Path(out_dir) / (many.shard.summary_name if many.shard else SUMMARY_NAME)}"
        )
    if summary["failed"]:
        raise click.exceptions.Exit(EXIT_SOME_FAILED)


# ------------------------------------------------------------ many machines
class _ManyMachines:
    """What --shard and --ray asked for: the shard, the Ray cluster (or ``None``)."""

    def __init__(self, shard: Any, cluster: Any) -> None:
        self.shard = shard
        self.cluster = cluster


def _require(ctx: click.Context, *names: str) -> None:
    """The usage error of a missing parameter, for those required unless --merge is given."""
    for param in ctx.command.params:
        if param.name in names and ctx.params.get(param.name) in (None, ()):
            fail(click.MissingParameter(ctx=ctx, param=param).format_message())


def _many_machines(params: dict[str, Any]) -> _ManyMachines:
    """Parse --shard / --ray* (the work is in runtime.shards and runtime.ray_exec).

    Raises:
        DunetError: a bad shard, a --ray value that is an input, or flags that do not combine.
    """
    from dunet_deploy.runtime.shards import parse_shard

    address = params["ray_address"]
    if address is None:
        for name in ("ray_actors", "ray_gpus_per_actor", "ray_cpus_per_actor", "ray_layout"):
            if params[name] is not None:
                raise DunetError(f"--{name.replace('_', '-')} needs --ray")
    if (address is not None or params["shard"] or params["skip_existing"]) \
            and params["server_side"]:
        raise DunetError("--server-side runs every case on the server: it takes no --ray, "
                         "--shard or --skip-existing")
    try:
        shard = parse_shard(params["shard"]) if params["shard"] else None
    except DunetError as exc:
        raise DunetError(exc.for_command(FLAGS)) from None
    if address is None:
        return _ManyMachines(shard, None)
    if address and Path(address).exists():
        raise DunetError(f"--ray {address!r} is a file or folder, not a cluster address: write "
                         f"--ray=ADDRESS, or put --ray after the inputs")
    for flag, given in (("--triton-url", params["triton_url"]),
                        ("--workers", params["workers"] is not None)):
        if given:
            raise DunetError(f"--ray runs the model, the reads and the writes on the cluster: "
                             f"it takes no {flag}")
    from dunet_deploy.runtime.ray_exec import ClusterOptions

    asked = {"address": address or None, "actors": params["ray_actors"],
             "gpus_per_actor": params["ray_gpus_per_actor"],
             "cpus_per_actor": params["ray_cpus_per_actor"], "layout": params["ray_layout"]}
    return _ManyMachines(shard, ClusterOptions(**{k: v for k, v in asked.items()
                                                  if v is not None}))


def _calibrate(quiet: bool) -> None:
    """``--calibrate-workers``: measure, save and report this machine's default worker count."""
    from dunet_deploy.bench.workers_calibration import calibrate_workers

    done = calibrate_workers(log=None if quiet else lambda line: click.echo(line, err=True))
    rates = ", ".join(f"{w}: {v:.2f}" for w, v in done["median"].items())
    click.echo(f"default --workers on this machine: {done['workers']} (volumes/s by workers, "
               f"median: {rates}); saved in {done['path']}")


def _merge(out: Path, inputs: tuple[str, ...], recursive: bool, quiet: bool) -> None:
    """``--merge OUT``: the shards' summaries into OUT/summary.json; exit 1 if cases are missing."""
    from dunet_deploy.runtime.shards import merge_summaries

    merged = merge_summaries(out, list(inputs) or None, recursive=recursive)
    missing = len(merged["missing_cases"]) + merged["unlisted_cases"]
    for name in merged["missing_cases"]:
        click.echo(f"missing: {name}", err=True)
    for name in merged["failed_cases"]:
        click.echo(f"failed: {name}", err=True)
    if not quiet:
        shards = merged["shards"]
        absent = f", shard(s) {', '.join(map(str, shards['missing']))} wrote no summary" \
            if shards["missing"] else ""
        click.echo(f"merged {len(shards['found'])} of {shards['count']} shard summaries: "
                   f"{merged['ok']}/{merged['total']} volume(s) segmented, {merged['failed']} "
                   f"failed, {missing} missing{absent}; summary: {out / 'summary.json'}")
    if merged["failed"] or missing:
        raise click.exceptions.Exit(EXIT_SOME_FAILED)


if __name__ == "__main__":
    main()
