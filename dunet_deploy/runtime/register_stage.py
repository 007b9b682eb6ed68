"""The registration stage: ``--register auto|always|never`` and ``--bias-correct`` in prepare.

Runs inside :func:`~dunet_deploy.runtime.pipeline.prepare_source`, so in the
worker processes of ``--workers`` (registration parallelises across volumes)::

    scan --(bias_correct: N4)--> plan_registration (auto: similarity check first)
       registered?  no  -> the ordinary plan (core.to_network: reorient / resample by the affine)
                    yes -> Registration.to_model (scan -> model grid through the transform)
                           -> slices; RegisteredSpace.to_input brings the probabilities back
                              onto the scan's own grid (linear) before thresholding

so the mask keeps the input's shape, affine and header whatever happened. The
template is the one beside the model (``template.nii.gz``, digest in its
metadata), read once per process. Nothing here imports torch or SimpleITK
(only :func:`~dunet_deploy.data.registration.register` and
:func:`~dunet_deploy.data.registration.bias_correct` do, when they run).
"""

from __future__ import annotations

import functools
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dunet_deploy.choices import REGISTER_MODES, check_choice
from dunet_deploy.data.geometry import ModelSpace, describe_grid
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.core import NetworkInput, add_time, to_network
from dunet_deploy.spec import PreprocessSpec

__all__ = ["NO_TEMPLATE", "REGISTRATION_PREVIEW_SUFFIX", "RegisterStage", "RegisteredSpace",
           "register_to_network", "write_registration_preview", "write_registration_previews"]

#: Why a scan was not checked when the model has no template (names the flag that adds one).
NO_TEMPLATE = ("the model has no registration template, so the scan was not checked: "
               "export it with one (dunet-export --template FILE)")


@dataclass(frozen=True, eq=False)
class RegisteredSpace(ModelSpace):
    """A :class:`~dunet_deploy.data.geometry.ModelSpace` through a registration transform.

    ``to_model`` / ``to_input`` are those of the :class:`Registration` it
    holds (linear both ways, 0 outside); ``method`` is ``"affine"``.

    Attributes:
        registration: The :class:`~dunet_deploy.data.registration.Registration`.
    """

    registration: Any = None

    def _map(self, data: npt.ArrayLike, *, forward: bool) -> np.ndarray:
        reg = self.registration
        return reg.to_model(data) if forward else reg.to_input(data)

    def describe(self) -> dict[str, Any]:
        """:meth:`ModelSpace.describe`, resampled through the registration."""
        doc = super().describe()
        doc["resampled"] = True
        return doc


@functools.lru_cache(maxsize=4)
def _template(model: str, mtime_ns: int) -> Any:
    """The model's template, read once per process (and again when the file changes)."""
    from dunet_deploy.data.registration import load_template

    return load_template(model)


@dataclass(frozen=True)
class RegisterStage:
    """What the registration stage does to each scan (picklable: sent to worker processes).

    Attributes:
        mode: One of :data:`~dunet_deploy.choices.REGISTER_MODES`.
        bias_correct: N4 bias-field correction before everything else.
        model: The model whose ``template.nii.gz`` is used (``None``: no template).
        has_template: Whether the model records one (checked by :meth:`for_model`).
        threads: Threads SimpleITK may use (``None``: the CPUs this process may run on).
    """

    mode: str = "auto"
    bias_correct: bool = False
    model: str | None = None
    has_template: bool = False
    threads: int | None = field(default=None)

    def __post_init__(self) -> None:
        check_choice("register", self.mode, REGISTER_MODES)

    @classmethod
    def for_model(cls, model: str | os.PathLike[str], info: Any, options: Any,
                  spec: PreprocessSpec) -> RegisterStage:
        """The stage of a run: the options' ``register`` / ``bias_correct`` on this model.

        Args:
            model: The model file (its template lies beside it).
            info: Its :class:`~dunet_deploy.artifacts.ArtifactInfo`.
            options: :class:`~dunet_deploy.runtime.options.InferenceOptions` with
                the model's defaults applied.
            spec: The model's spec.

        Raises:
            DunetError: ``register="always"`` on a model without a template or
                without a training grid (before any scan is read).
        """
        mode = options.register or "auto"
        has = bool(getattr(info, "template", None)) and spec.grid_matrix is not None
        if mode == "always" and not getattr(info, "template", None):
            raise DunetError("register 'always': the model has no registration template; "
                             "export it with one (dunet-export --template FILE)",
                             option="register")
        if mode == "always" and spec.grid_matrix is None:
            raise DunetError("register 'always': the model's spec records no training grid "
                             "to register onto", option="register")
        if has:
            _template(str(model), _mtime(model))  # a missing or foreign template fails now
        return cls(mode=mode, bias_correct=bool(options.bias_correct), model=str(model),
                   has_template=has)

    @property
    def active(self) -> bool:
        """Whether the stage runs (and records what it did, if only that it could not check)."""
        return self.bias_correct or self.model is not None

    def template(self) -> Any:
        """The model's :class:`~dunet_deploy.data.registration.Template` (cached per process)."""
        assert self.model is not None and self.has_template
        return _template(self.model, _mtime(self.model))


def _mtime(model: str | os.PathLike[str]) -> int:
    from dunet_deploy.data.registration import TEMPLATE_FILE

    try:
        return (Path(model).parent / TEMPLATE_FILE).stat().st_mtime_ns
    except OSError:
        return 0


def register_to_network(
    volume: npt.ArrayLike, affine: npt.ArrayLike, spec: PreprocessSpec, stage: RegisterStage,
    *, resample: str = "auto", times: dict[str, float] | None = None, template: Any = None,
) -> tuple[NetworkInput, dict[str, Any], tuple[str, ...]]:
    """:func:`~dunet_deploy.runtime.core.to_network` with the registration stage before it.

    Args:
        volume: Raw ``[X, Y, Z]`` scan.
        affine: Its ``[4, 4]`` voxel → world (RAS mm).
        spec: The model's spec (its training grid is the registration's target).
        stage: What to do.
        resample: ``"auto"`` or ``"never"``; ``never`` refuses a scan that needs registering.
        times: ``"preprocess"`` seconds (N4, the check, the registration) are added to it.
        template: A :class:`~dunet_deploy.data.registration.Template` to use
            instead of the model's (benchmarks, a template in memory).

    Returns:
        ``(network input, summary's registration record, warnings)``.

    Raises:
        DunetError: the scan cannot be taken: a registration that does not
            converge (with the similarities), ``resample="never"`` on a scan
            that needs registering, or what ``to_network`` refuses. The first
            two are a :class:`~dunet_deploy.data.registration.RegistrationError`
            whose ``record`` is the summary's registration record of the case
            (``done: False`` with the similarities, the floor and the seconds).
    """
    t0 = time.perf_counter()
    vol = np.asarray(volume)
    aff = np.asarray(affine, dtype=np.float64)
    record: dict[str, Any] = {"done": False, "method": "none", "mode": stage.mode,
                              "bias_corrected": stage.bias_correct}
    if stage.bias_correct:
        from dunet_deploy.data.registration import bias_correct

        t_n4 = time.perf_counter()
        vol = bias_correct(vol, aff, threads=stage.threads)
        record["bias_correct_seconds"] = round(time.perf_counter() - t_n4, 3)
    if template is None and stage.has_template:
        template = stage.template()
    if template is None:
        add_time(times, "preprocess", time.perf_counter() - t0)
        record["checked"] = False
        record["reason"] = (NO_TEMPLATE if stage.model is None or spec.grid_matrix is not None
                            else "the model's spec records no training grid to register onto")
        return to_network(vol, spec, affine=aff, resample=resample, times=times), record, ()
    from dunet_deploy.data.registration import RegistrationError, plan_registration

    assert spec.grid_matrix is not None
    grid = (spec.volume_shape, spec.grid_matrix)
    record["checked"] = True
    if stage.mode != "never" and resample == "never":
        # The check alone decides; registering would resample, which "never" forbids.
        reg = plan_registration(vol, aff, template, mode="never", grid=grid)
        if reg.warnings:
            refused = {**reg.describe(), "warnings": []}
            raise RegistrationError(f"the scan ({describe_grid(vol.shape, aff)}) does not look "
                                    "registered to the model's template and --resample never "
                                    "forbids registering it", record={**record, **refused})
    else:
        try:
            reg = plan_registration(vol, aff, template, mode=stage.mode, grid=grid,
                                    threads=stage.threads)
        except RegistrationError as exc:
            exc.record = {**record, **exc.record}  # with the mode and the bias correction
            raise
    record.update(reg.describe())
    warnings = tuple(reg.warnings)
    add_time(times, "preprocess", time.perf_counter() - t0)
    if not reg.done:
        return to_network(vol, spec, affine=aff, resample=resample, times=times), record, warnings
    t1 = time.perf_counter()
    space = RegisteredSpace(
        reg.input_shape, reg.input_affine, reg.grid_shape, reg.grid_affine, "affine",
        model_orientation=spec.orientation, grid=describe_grid(reg.grid_shape, reg.grid_affine),
        overlap=None, warnings=warnings, registration=reg)
    on_grid = space.to_model(vol)
    add_time(times, "preprocess", time.perf_counter() - t1)
    net = to_network(on_grid, spec, affine=None, times=times)
    net.space = space
    return net, record, warnings


# ------------------------------------------------------------------ preview
#: ``--preview`` file of a registered case: the template's outline over the registered scan.
REGISTRATION_PREVIEW_SUFFIX = "_registration.png"
_OUTLINE_COLOUR = "#ffcc00"


def write_registration_preview(case: dict[str, Any], template: Any,
                               out_dir: str | os.PathLike[str]) -> Path:
    """``<name>_registration.png``: the scan on the template grid, the template brain outlined.

    Three axial slices (a quarter, half and three quarters up the template)
    of the scan resampled through the case's ``world_to_template``, with the
    outline of the template's brain (Otsu threshold): a good registration
    puts the outline on the scan's brain.

    Args:
        case: A ``summary.json`` case whose ``registration`` was done.
        template: The model's :class:`~dunet_deploy.data.registration.Template`.
        out_dir: Where to write.

    Raises:
        DunetError: when matplotlib is missing (one line naming the install).
    """
    from dunet_deploy.data.registration import _otsu, _resample
    from dunet_deploy.runtime.pipeline import output_stem
    from dunet_deploy.runtime.preview import case_scan, require_matplotlib

    plt = require_matplotlib()
    scan = case_scan(case)  # a NIfTI file or a DICOM series
    reg = case["registration"]
    w2t = np.asarray(reg["world_to_template"], dtype=np.float64)
    on_template = _resample(np.asarray(scan.data), np.asarray(scan.affine, dtype=np.float64),
                            template.data.shape, template.affine, world=np.linalg.inv(w2t))
    brain = template.data > _otsu(template.data)
    depth = template.data.shape[2]
    zs = [int(depth * f) for f in (0.35, 0.5, 0.65)]
    inside = on_template[on_template > 0]
    lo, hi = np.percentile(inside, [1, 99.5]) if inside.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(zs), figsize=(2.7 * len(zs), 3.4), squeeze=False)
    try:
        for ax, z in zip(axes[0], zs, strict=True):
            ax.imshow(on_template[:, :, z].T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            if brain[:, :, z].any():
                ax.contour(brain[:, :, z].T.astype(np.float32), levels=[0.5],
                           colors=[_OUTLINE_COLOUR], linewidths=1.0, origin="lower")
            ax.set_title(f"template z = {z}", fontsize=8)
            ax.set_axis_off()
        fig.suptitle(f"{output_stem(case['input'])}: registered to the template (outline), "
                     f"similarity {reg['similarity_before']:.2f} -> {reg['similarity_after']:.2f}",
                     fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
    finally:
        plt.close(fig)
    from dunet_deploy.artifacts import atomic_write_bytes

    out = Path(out_dir) / f"{output_stem(case['input'])}{REGISTRATION_PREVIEW_SUFFIX}"
    atomic_write_bytes(out, buf.getvalue())
    return out


def write_registration_previews(cases: list[dict[str, Any]], model: str | os.PathLike[str],
                                out_dir: str | os.PathLike[str]) -> list[Path]:
    """:func:`write_registration_preview` for each registered case of a ``summary.json``."""
    done = [c for c in cases if c.get("status") == "ok" and (c.get("registration") or {})
            .get("done")]
    if not done:
        return []
    template = _template(str(model), _mtime(model))
    return [write_registration_preview(c, template, out_dir) for c in done]
