"""``dunet-train``: train a segmentation model on a dataset folder.

Examples::

    dunet-train --data demo/data --out runs/demo                      # defaults
    dunet-train --data demo/data --out runs/demo --resume auto --epochs 60
    dunet-train --data atlas/ --out runs/paper --optimizer sgd --lr 1e-6 \\
        --batch-size 36 --epochs 150 --bn-momentum 0.01               # the paper's recipe
    torchrun --nproc_per_node 2 -m dunet_deploy.cli.train --data D --out R   # DDP

With ``--resume`` the checkpoint's settings are reused; options given on the
command line override them, and contradicting ones (``--lr``, ``--model``...)
are refused. ``--epochs`` may be raised to train longer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from dunet_deploy.choices import LAYOUTS, TRAIN_DEVICES
from dunet_deploy.cli._common import DunetCommand, handle_errors, require_torch

# Option defaults shown in --help; keep in sync with TrainConfig (a test checks).
HELP_DEFAULTS = {
    "model": "dunet", "epochs": 30, "batch_size": 16, "optimizer": "adam", "lr": 1e-3,
    "loss": "eml", "val_fraction": 0.2, "seed": 0, "device": "auto", "workers": 0,
    "oversample": 1.0, "momentum": 0.9, "weight_decay": 0.0, "bn_momentum": 0.1,
}


def _opt(name: str, **kw: Any) -> Any:
    return click.option(name, default=None, **kw)


@click.command(cls=DunetCommand)
@click.option("--data", type=click.Path(path_type=Path), required=True,
              help="Dataset folder (pairs, ATLAS 2.0 or ATLAS R1.1 layout).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Run folder (checkpoints, metrics.jsonl, cache).")
@_opt("--model", help="Registry model name (dunet, unet2d, ...).  [default: dunet]")
@_opt("--epochs", type=int, help="Train until this epoch.  [default: 30]")
@_opt("--batch-size", type=int, help="Slabs per step and process.  [default: 16]")
@_opt("--image-size", type=int,
      help="Network input side, a multiple of 16.  [default: 192 for ATLAS, else crop side]")
@_opt("--optimizer", type=click.Choice(["adam", "sgd"]), help="Optimizer.  [default: adam]")
@_opt("--lr", type=float, help="Learning rate (constant).  [default: 0.001]")
@_opt("--momentum", type=float, help="SGD momentum.  [default: 0.9]")
@_opt("--weight-decay", type=float, help="L2 weight decay.  [default: 0]")
@_opt("--loss", type=click.Choice(["eml", "dice", "focal", "bce"]),
      help="Loss.  [default: eml]")
@_opt("--val-fraction", type=float,
      help="Cases held out for validation (paper: 0.8/0.2).  [default: 0.2]")
@_opt("--seed", type=int, help="Seed of split, init, order, augmentation.  [default: 0]")
@_opt("--device", type=click.Choice(TRAIN_DEVICES), help="Device.  [default: auto]")
@click.option("--amp/--no-amp", default=None, help="Mixed precision.  [default: off]")
@_opt("--workers", type=int, help="DataLoader workers.  [default: 0]")
@_opt("--resume", help="Continue from a last.pt, or 'auto' for OUT/last.pt.")
@_opt("--oversample", type=float,
      help="Sampling weight of lesion slabs (1 = uniform).  [default: 1]")
@click.option("--augment/--no-augment", default=None,
              help="Random shift/zoom/rotation/flip (the paper's).  [default: on]")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="Write TensorBoard logs to OUT/tensorboard.  [default: off]")
@_opt("--cache-dir", type=click.Path(path_type=Path),
      help="Slice cache folder.  [default: OUT/cache]")
@_opt("--base-filters", type=int, help="Override the model's first-block width (fast runs).")
@_opt("--layout", type=click.Choice(LAYOUTS),
      help="Force the dataset layout.  [default: auto-detect]")
@_opt("--bn-momentum", type=float,
      help="BatchNorm running-stats momentum (PyTorch convention); 0.01 is Keras' 0.99.  "
           "[default: 0.1]")
@click.option("--deterministic/--no-deterministic", default=None,
              help="torch.use_deterministic_algorithms (bit-exact resume).  [default: off]")
@click.option("--progress/--no-progress", default=None,
              help="tqdm progress bar on a terminal.  [default: on]")
@handle_errors
def main(data: Path, out: Path, **options: Any) -> None:
    """Train a D-UNet (or baseline) on DATA and write checkpoints to OUT."""
    require_torch("dunet-train")
    from dunet_deploy.training.trainer import TrainConfig, resume_config, train

    given: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()
             if v is not None}
    resume = given.get("resume")
    if resume is not None:
        overrides = {"data": str(data), **given}
        overrides.pop("resume")
        cfg = resume_config(resume, str(out), overrides)
    else:
        cfg = TrainConfig(data=str(data), out=str(out), **given)
    result = train(cfg, log=lambda line: click.echo(line))
    if os.environ.get("RANK", "0") != "0":  # torchrun: report once
        return
    best = result.best_metrics
    click.echo(
        f"done: epoch {result.epoch}, best epoch {result.best_epoch} "
        f"(val DSC {float(best.get('dsc_mean', 0.0)):.4f}); checkpoints in {result.out_dir}"
    )


if __name__ == "__main__":
    main()
