"""``dunet-eval``: score a checkpoint, or an exported model, on a dataset in native space.

Example::

    dunet-eval --checkpoint runs/demo/best.pt --data demo/data --out runs/demo/eval
    dunet-eval --checkpoint runs/demo/best.pt --data demo/data --out eval_val --split val
    dunet-eval --engine export/model.onnx --data demo/data --out eval_onnx   # torch-free

Writes ``cases.csv`` (per case), ``summary.md`` / ``summary.json`` (the
paper's Table 2: DSC, DSC global, recall, precision, parameters) and
``dsc_boxplot.png`` (Fig. 4) to OUT, and prints the table. Nothing is written
unless every case was scored.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from dunet_deploy.choices import (
    BACKENDS,
    LAYOUTS,
    PRECISIONS,
    REGISTER_MODES,
    RESAMPLE_MODES,
    SPLITS,
    TRAIN_DEVICES,
    TTA_MODES,
)
from dunet_deploy.cli._common import DunetCommand, handle_errors
from dunet_deploy.errors import DunetError


class _Progress:
    """A per-case progress line on stderr, on a terminal only.

    ``end()`` finishes a line left open (an error or an interrupt then starts
    on its own line).
    """

    def __init__(self, hint: str) -> None:
        self.hint, self.open = hint, False
        self.interactive = sys.stderr.isatty()

    def __call__(self, done: int, total: int, case_id: str) -> None:
        if self.interactive:
            self.open = done != total
            click.echo(f"\r{self.hint} {done}/{total} {case_id:<24}", err=True,
                       nl=not self.open)

    def end(self) -> None:
        if self.open:
            click.echo("", err=True)
            self.open = False


def _want_boxplot(asked: bool | None) -> bool:
    """Whether to draw the box plot: ``--boxplot`` needs matplotlib, the default skips it."""
    if asked is False:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if asked:
            raise DunetError(
                "--boxplot: matplotlib is not installed (pip install matplotlib, or --no-boxplot)"
            ) from None
        click.echo("note: matplotlib is not installed: no dsc_boxplot.png "
                   "(pip install matplotlib)", err=True)
        return False
    return True


@click.command(cls=DunetCommand)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A dunet-train checkpoint (best.pt or last.pt).")
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Or an exported model (.onnx / .plan), run by the torch-free runtime.")
@click.option("--backend", type=click.Choice(["auto", *BACKENDS]),
              default="auto", show_default=True, help="Runtime backend for --engine.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              default="auto", show_default=True, help="Runtime precision for --engine.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Backend CPU threads for --engine.")
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Dataset folder (pairs, ATLAS 2.0 or ATLAS R1.1 layout).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Report folder (created; files in it are replaced).")
@click.option("--split", type=click.Choice(SPLITS), default="all",
              show_default=True, help="All cases, or the checkpoint's own val/train cases.")
@click.option("--device", type=click.Choice(TRAIN_DEVICES), default="auto",
              show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Slabs per forward pass.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="Force the dataset layout.  [default: auto-detect]")
@click.option("--amp/--no-amp", default=False, show_default=True,
              help="Mixed-precision inference.")
@click.option("--boxplot/--no-boxplot", default=None,
              help="Draw dsc_boxplot.png (needs matplotlib).  [default: on when matplotlib "
                   "is installed, else skipped with a note]")
@click.option("--tta", type=click.Choice(TTA_MODES), default=None,
              help="Test-time augmentation.  [default: an engine's own, else none]")
@click.option("--min-lesion-mm3", type=click.FloatRange(min=0), default=None,
              help="Remove smaller connected lesions before scoring.  [default: an engine's "
                   "own, else 0]")
@click.option("--resample", type=click.Choice(RESAMPLE_MODES), default="auto", show_default=True,
              help="Scans off the training grid: resample (auto) or refuse (never).")
@click.option("--register", type=click.Choice(REGISTER_MODES), default=None,
              help="With --engine: registration to the model's template (auto: scans that "
                   "do not look registered are registered; always; never).  [default: the "
                   "engine's, else auto]")
@click.option("--bias-correct", is_flag=True,
              help="With --engine: N4 bias-field correction of each scan first.")
@handle_errors
def main(checkpoint: Path | None, engine: Path | None, backend: str, precision: str,
         threads: int | None, data: Path, out: Path, split: str, device: str, batch_size: int,
         layout: str | None, amp: bool, boxplot: bool | None, tta: str | None,
         min_lesion_mm3: float | None, resample: str, register: str | None,
         bias_correct: bool) -> None:
    """Evaluate CHECKPOINT (or ENGINE) on the cases of DATA; write the report to OUT."""
    from dunet_deploy.artifacts import check_output_dir
    from dunet_deploy.training.evaluate import (
        evaluate_checkpoint_file,
        evaluate_engine,
        write_report,
    )

    if batch_size < 1:
        raise DunetError(f"--batch-size {batch_size}: must be >= 1")
    check_output_dir(out, "--out")  # before any work: a late failure loses it all
    boxplot = _want_boxplot(boxplot)
    if (checkpoint is None) == (engine is None):
        raise DunetError("give exactly one of --checkpoint or --engine")
    progress = _Progress("evaluating")
    try:
        if engine is not None:  # the runtime path: no torch
            if split != "all":
                raise DunetError(f"--split {split}: an engine records no split; use --split all")
            from dunet_deploy.runtime.options import InferenceOptions

            try:
                options = InferenceOptions(backend=backend, precision=precision, threads=threads,
                                           device=device, batch_size=batch_size, tta=tta,
                                           min_lesion_mm3=min_lesion_mm3, resample=resample,
                                           register=register, bias_correct=bias_correct)
            except DunetError as exc:
                raise DunetError(exc.for_command()) from None
            result = evaluate_engine(engine, data, options=options, layout=layout,
                                     progress=progress)
        else:
            assert checkpoint is not None
            if register is not None or bias_correct:
                raise DunetError("--register / --bias-correct run in the exported model's "
                                 "pipeline: evaluate with --engine (dunet-export first)")
            result = evaluate_checkpoint_file(
                checkpoint, data, split=split, device=device, batch_size=batch_size,
                layout=layout, amp=amp, progress=progress, tta=tta or "none",
                min_lesion_mm3=min_lesion_mm3 or 0.0, resample=resample)
    finally:
        progress.end()
    spec = result.spec
    meta = {**result.meta, "data": str(data), "split": split, "space": "native volume",
            "threshold": spec.threshold, "spec_digest": spec.digest()}
    paths = write_report(result.metrics, out, method=result.method, params=result.params,
                         meta=meta, boxplot=boxplot)
    click.echo(paths["markdown"].read_text().split("\n\n")[0].rstrip())
    click.echo(f"wrote {', '.join(p.name for p in paths.values())} to {out}")


if __name__ == "__main__":
    main()
