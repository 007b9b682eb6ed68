"""``dunet-synth``: write a synthetic stroke-lesion dataset.

Example::

    dunet-synth demo/data --cases 8 --layout atlas-r1.1 --shape 64,80,48 --seed 0 --preview

OUT_DIR must be new or empty. A folder previously written by ``dunet-synth``
(recognised by its ``dunet_synth.json`` marker) is replaced only with
``--overwrite``: a run trained on it records its split, which a new dataset
would no longer match (``dunet-train`` refuses an existing run the same way).
Anything else is refused so user data is never mixed with or overwritten by
synthetic files.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import numpy as np

from dunet_deploy.cli._common import DunetCommand, handle_errors
from dunet_deploy.data.anatomy import ANATOMIES
from dunet_deploy.data.layouts import LAYOUTS
from dunet_deploy.data.nifti import load_mask, load_nifti
from dunet_deploy.data.synth import MARKER_FILE, preview_png, write_dataset
from dunet_deploy.errors import DunetError

#: Entries dunet-synth creates at the top of OUT_DIR (removed on regeneration).
_GENERATED = re.compile(r"^(Site\d+|Training|imagesTr|labelsTr|previews|dunet_synth\.json)$")
_MAX_VOXELS = 512**3


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse ``"X,Y,Z"`` (or ``XxYxZ``) into three sizes >= 8.

    Raises:
        DunetError: on anything else.
    """
    parts = re.split(r"[,xX]", text.strip())
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3:
        raise DunetError(f"--shape {text!r}: expected three integers like 64,80,48")
    if min(dims) < 8:
        raise DunetError(f"--shape {text!r}: every size must be >= 8")
    if int(np.prod(dims)) > _MAX_VOXELS:
        raise DunetError(f"--shape {text!r}: volume too large (more than 512^3 voxels)")
    return dims[0], dims[1], dims[2]


def _describe_dataset(out_dir: Path) -> str:
    """``"4 cases, layout pairs, shape 24x28x16"`` from the marker, or ``"a dataset"``."""
    try:
        doc = json.loads((out_dir / MARKER_FILE).read_text())
        shape = "x".join(str(int(n)) for n in doc["shape"])
        return f"{int(doc['cases'])} cases, layout {doc['layout']}, shape {shape}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a dataset"


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Check OUT_DIR before writing anything; with ``overwrite``, remove our old dataset.

    Raises:
        DunetError: OUT_DIR is a file, holds files we did not write, or holds an
            earlier dataset and ``overwrite`` is false (nothing is deleted then).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DunetError(f"{out_dir}: exists and is not a folder")
    if not out_dir.exists():
        return
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not (out_dir / MARKER_FILE).is_file():
        raise DunetError(
            f"{out_dir}: folder is not empty and was not written by dunet-synth; "
            "choose a new or empty folder"
        )
    foreign = [e.name for e in entries if not _GENERATED.match(e.name)]
    if foreign:
        raise DunetError(
            f"{out_dir}: contains {foreign[0]!r}, which dunet-synth did not write; "
            "refusing to replace the dataset"
        )
    if not overwrite:
        raise DunetError(
            f"{out_dir}: already holds a dunet-synth dataset ({_describe_dataset(out_dir)}); "
            "add --overwrite to replace it (runs trained on it will no longer match) or "
            "choose another folder"
        )
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@click.command(cls=DunetCommand)
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--cases", "-n", "n_cases", type=int, default=8, show_default=True,
              help="Number of cases (>= 1).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="atlas-r1.1", show_default=True,
              help="Folder layout to write.")
@click.option("--shape", "shape_text", default=None,
              help="Volume shape X,Y,Z (197,233,189 is the ATLAS geometry) [default: 64,80,48; "
              "mni152: 197,233,189, the 1 mm MNI box].")
@click.option("--anatomy", type=click.Choice(ANATOMIES), default="ellipsoid", show_default=True,
              help="Head model: ellipsoid heads, or the MNI152 2009a template shipped in the "
              "nilearn wheel, warped, with lesions (needs dunet-deploy[anatomy]).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of case 0 (case i uses seed + i).")
@click.option("--preview", is_flag=True, help="Also write previews/<case>.png.")
@click.option("--overwrite", is_flag=True,
              help="Replace a dataset dunet-synth wrote earlier in OUT_DIR.")
@handle_errors
def main(out_dir: Path, n_cases: int, layout: str, shape_text: str | None, anatomy: str,
         seed: int, preview: bool, overwrite: bool) -> None:
    """Write a synthetic T1 stroke-lesion dataset to OUT_DIR."""
    if shape_text is None:
        shape_text = "197,233,189" if anatomy == "mni152" else "64,80,48"
    shape = parse_shape(shape_text)
    if n_cases < 1:
        raise DunetError(f"--cases {n_cases}: must be >= 1")
    if seed < 0:
        raise DunetError(f"--seed {seed}: must be >= 0")
    _prepare_out_dir(out_dir, overwrite)
    cases = write_dataset(out_dir, cases=n_cases, layout=layout, shape=shape, seed=seed,
                          anatomy=anatomy)
    if preview:
        (out_dir / "previews").mkdir(exist_ok=True)
    click.echo(f"{'case':<22} {'masks':>5} {'lesion_voxels':>13}  image")
    for case in cases:
        mask = load_mask(list(case.masks))
        if preview:
            image = load_nifti(case.image).data
            preview_png(image, mask, out_dir / "previews" / f"{case.case_id}.png")
        rel = case.image.relative_to(out_dir)
        click.echo(f"{case.case_id:<22} {len(case.masks):>5} {int(mask.sum()):>13}  {rel}")
    shape_str = "x".join(str(n) for n in shape)
    click.echo(f"wrote {len(cases)} case(s), layout {layout}, shape {shape_str}, to {out_dir}")


if __name__ == "__main__":
    main()
