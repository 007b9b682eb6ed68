"""``dunet-demo``: the main job on synthetic data, no download needed.

Example::

    dunet-demo --out demo        # what `make demo` runs

synthesize -> train D-UNet -> evaluate -> export ONNX -> dunet-infer on a
held-out volume -> mask, PNG overlay and report.md in OUT.
"""

from __future__ import annotations

from pathlib import Path

import click

from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch


@click.command(cls=DunetCommand)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Output folder (new, empty, or a previous demo's).")
@click.option("--cases", type=click.IntRange(min=4), default=10, show_default=True,
              help="Synthetic training cases.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=64, show_default=True,
              help="Network input side (multiple of 16).")
@click.option("--base-filters", type=click.IntRange(min=16), default=32, show_default=True,
              help="D-UNet width (32 = the paper's model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: all cores).")
@handle_errors
def main(out: Path, cases: int, epochs: int, image_size: int, base_filters: int, seed: int,
         threads: int | None) -> None:
    """Synthesize data, train D-UNet, evaluate, export and segment a held-out volume."""
    require_torch("dunet-demo")
    from dunet_deploy.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=out, cases=cases, epochs=epochs, image_size=image_size,
                                 base_filters=base_filters, seed=seed, threads=threads),
                      log=click.echo)
    click.echo((out / "report.md").read_text())
    click.echo(f"held-out DSC {report['heldout']['dsc']:.3f}; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
