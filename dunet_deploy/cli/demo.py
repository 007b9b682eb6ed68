"""``dunet-demo``: the main job on synthetic data, no download needed.

Example::

    dunet-demo --out demo        # what `make demo` runs

synthesize -> train D-UNet -> evaluate -> export ONNX -> dunet-infer on a
held-out volume -> mask, PNG overlay and report.md in OUT.

The heads are warped MNI152 2009a anatomy by default (needs the ``anatomy``
extra, which ships the template in the nilearn wheel); ``--anatomy ellipsoid``
gives the older ellipsoid heads.
"""

from __future__ import annotations

from pathlib import Path

import click

from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch
from dunet_deploy.cli.synth import parse_shape
from dunet_deploy.data.anatomy import ANATOMIES
from dunet_deploy.demo import DEMO_SHAPES

_SHAPE_DEFAULTS = "; ".join(f"{name}: {','.join(map(str, DEMO_SHAPES[name]))}"
                            for name in ANATOMIES)


@click.command(cls=DunetCommand)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              show_default=True, help="Output folder (new, empty, or a previous demo's).")
@click.option("--cases", type=click.IntRange(min=4), default=10, show_default=True,
              help="Synthetic training cases.")
@click.option("--anatomy", type=click.Choice(ANATOMIES), default="mni152", show_default=True,
              help="Head model: the MNI152 2009a template shipped in the nilearn wheel, warped, "
              "with lesions (needs dunet-deploy[anatomy]), or ellipsoid heads.")
@click.option("--shape", "shape_text", default=None,
              help=f"Volume shape X,Y,Z; for mni152 a grid over the MNI box, 197,233,189 "
              f"being 1 mm [default: {_SHAPE_DEFAULTS}].")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=64, show_default=True,
              help="Network input side (multiple of 16).")
@click.option("--base-filters", type=click.IntRange(min=16), default=32, show_default=True,
              help="D-UNet width (32 = the paper's model).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: all cores).")
@handle_errors
def main(out: Path, cases: int, anatomy: str, shape_text: str | None, epochs: int,
         image_size: int, base_filters: int, seed: int, threads: int | None) -> None:
    """Synthesize data, train D-UNet, evaluate, export and segment a held-out volume."""
    shape = None if shape_text is None else parse_shape(shape_text)
    require_torch("dunet-demo")
    from dunet_deploy.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=out, cases=cases, anatomy=anatomy, shape=shape,
                                 epochs=epochs, image_size=image_size,
                                 base_filters=base_filters, seed=seed, threads=threads),
                      log=click.echo)
    click.echo((out / "report.md").read_text())
    click.echo(f"held-out DSC {report['heldout']['dsc']:.3f}; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
