"""Checkpoint -> verified ONNX / FP16 ONNX / INT8 ONNX / TensorRT engine / Triton repository.

:func:`run_export` is what ``dunet-export`` runs: :meth:`ExportRequest.checked`
applies the option rules, then one step per artefact (:data:`STEPS`) builds
into a staging folder *inside* the output folder — on the same file system,
so the final renames are atomic even when the output is a mount point — and
only when every requested artefact was built and verified are the files
moved into place. A failed export leaves no file behind (not even the output
folder, when it did not exist before).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    ArtifactInfo,
    deferred_interrupts,
    write_engine_sidecar,
    write_json,
)
from dunet_deploy.errors import DunetError
from dunet_deploy.spec import InferenceDefaults

__all__ = ["FORMATS", "STAGING_PREFIX", "TRITON_BACKENDS", "ExportRequest", "run_export"]

FORMATS = ("onnx", "onnx-fp16", "onnx-int8", "trt", "triton")
TRITON_BACKENDS = ("onnx", "trt", "python")
#: ``--trt-precision``: the ONNX the strongly typed engine is built from.
TRT_PRECISIONS = ("fp16", "int8")
#: Name prefix of the staging folder made inside the output folder.
STAGING_PREFIX = ".dunet-export-"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportRequest:
    """What to export; the defaults are ``dunet-export``'s.

    Attributes:
        checkpoint: the ``.pt`` file.
        out_dir: output folder (created when missing).
        formats: artefacts to build (:data:`FORMATS`), in any order.
        batch_range: ``(min, opt, max)`` batch sizes (TensorRT profile; max is
            Triton's ``max_batch_size``).
        opset: ONNX opset (>= 17).
        verify: run the numerical verification of every artefact.
        triton_backend: model file Triton serves (:data:`TRITON_BACKENDS`).
        timing_cache: TensorRT timing cache (default ``out_dir/timing.cache``).
        workspace_mb: TensorRT workspace limit.
        opt_level: TensorRT builder optimisation level.
        verify_slabs: most synthetic slabs used for verification.
        seed: seed of the verification inputs and calibration sampling.
        calibration: dataset calibrating ``onnx-int8`` (any of our layouts).
        calibration_slabs: number of calibration slabs.
        calibration_cases: at most this many calibration cases (``None``: all).
        gate_data: held-out cases of the int8 gate when ``calibration`` is not
            the checkpoint's training set.
        gate_max_dsc_drop: int8 gate: largest accepted mean-DSC drop.
        inference: TTA and post-processing defaults stored in every artefact.
        gate_min_lesion_dsc: int8 gate: smallest accepted per-case DSC of the int8
            mask against the fp32 mask (cases where fp32 finds >= 100 voxels).
        gate_min_agreement: int8 gate: smallest accepted per-case agreement of the
            two masks on the union of both masks and the truth.
        trt_precision: precision of the TensorRT engine (:data:`TRT_PRECISIONS`): built
            strongly typed from ``model_fp16.onnx`` or from the gated ``model_int8.onnx``.
        template: registration template NIfTI written beside the models (for
            checkpoints without one; a checkpoint's own template is used otherwise).
    """

    checkpoint: Path
    out_dir: Path = Path("export")
    formats: tuple[str, ...] = ("onnx",)
    batch_range: tuple[int, int, int] = (1, 8, 32)
    opset: int = 17
    verify: bool = True
    triton_backend: str = "onnx"
    timing_cache: Path | None = None
    workspace_mb: int | None = None
    opt_level: int | None = None
    verify_slabs: int = 16
    seed: int = 0
    calibration: Path | None = None
    calibration_slabs: int = 512
    calibration_cases: int | None = None
    gate_data: Path | None = None
    gate_max_dsc_drop: float = 0.01
    gate_min_lesion_dsc: float = 0.95
    gate_min_agreement: float = 0.90
    inference: InferenceDefaults = field(default_factory=InferenceDefaults)
    trt_precision: str = "fp16"
    template: Path | None = None

    def checked(self) -> ExportRequest:
        """The request with its formats de-duplicated (default ``onnx``), once its rules hold.

        Raises:
            DunetError: naming the option that breaks a rule.
        """
        fmts = tuple(dict.fromkeys(self.formats or ("onnx",)))
        unknown = [f for f in fmts if f not in FORMATS]
        if unknown:
            raise DunetError(f"--format {unknown[0]}: choose from {', '.join(FORMATS)}")
        if self.triton_backend not in TRITON_BACKENDS:
            raise DunetError(f"--triton-backend {self.triton_backend}: choose from "
                             f"{', '.join(TRITON_BACKENDS)}")
        from dunet_deploy.export.onnx_export import MIN_OPSET  # imports torch, as the export

        lo, opt, hi = self.batch_range
        if not 1 <= lo <= opt <= hi:
            raise DunetError(f"--batch-range {lo},{opt},{hi}: need 1 <= MIN <= OPT <= MAX")
        if self.opset < MIN_OPSET:
            raise DunetError(f"--opset {self.opset}: dunet-deploy exports opset >= {MIN_OPSET}")
        if "triton" in fmts and self.triton_backend == "trt":
            if "trt" not in fmts:
                raise DunetError("--triton-backend trt needs --format trt (the engine to serve)")
            if lo != 1:
                raise DunetError(
                    f"--triton-backend trt needs a batch range starting at 1 (Triton sends single "
                    f"requests), got {lo},{opt},{hi}"
                )
        if self.trt_precision not in TRT_PRECISIONS:
            raise DunetError(f"--trt-precision {self.trt_precision}: choose from "
                             f"{', '.join(TRT_PRECISIONS)}")
        if self.trt_precision == "int8" and "trt" in fmts and "onnx-int8" not in fmts:
            raise DunetError("--trt-precision int8 needs --format onnx-int8 (the engine is built "
                             "from the calibrated, gated QDQ model)")
        self._check_int8(fmts)
        return replace(self, formats=fmts)

    def _check_int8(self, fmts: tuple[str, ...]) -> None:
        if "onnx-int8" not in fmts:
            given = [name for name, value in (("--calibration", self.calibration),
                                              ("--gate-data", self.gate_data),
                                              ("--calibration-cases", self.calibration_cases))
                     if value is not None]
            if given:
                raise DunetError(f"{given[0]} is for --format onnx-int8, which was not requested")
            return
        if self.calibration is None:
            raise DunetError("--format onnx-int8 needs --calibration DATA (a dataset folder)")
        if self.calibration_slabs < 1 or (self.calibration_cases or 1) < 1:
            raise DunetError("--calibration-slabs and --calibration-cases must be >= 1")
        for flag, value in (("--gate-min-agreement", self.gate_min_agreement),
                            ("--gate-min-lesion-dsc", self.gate_min_lesion_dsc)):
            if not 0.0 <= value <= 1.0:
                raise DunetError(f"{flag} {value}: must be in [0, 1]")
        if not self.verify:
            raise DunetError("--format onnx-int8 cannot skip verification (--no-verify): "
                             "the accuracy gate is what makes an int8 model safe")


@dataclass
class _Job:
    """State shared by the export steps (one export)."""

    req: ExportRequest
    stage: Path
    log: Log
    model: Any
    doc: dict[str, Any]
    spec: Any
    source: dict[str, Any]
    base_info: ArtifactInfo
    trt_version: str | None
    proto: Any = None
    flops: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)
    fp16_verification: dict[str, Any] = field(default_factory=lambda: {"skipped": True})
    int8_data: Any = None
    template: Any = None
    written: list[str] = field(default_factory=list)

    @property
    def formats(self) -> tuple[str, ...]:
        return self.req.formats

    @property
    def need_fp16(self) -> bool:
        # The FP16 TensorRT engine is built strongly typed from the mixed FP16 ONNX.
        return "onnx-fp16" in self.formats or (
            "trt" in self.formats and self.req.trt_precision == "fp16")

    def onnx_json(self, name: str, info: ArtifactInfo, **extra: Any) -> None:
        """Write ``<name>.json`` beside ``<name>.onnx`` in the stage."""
        s = self.spec.image_size
        io = {
            "input": {"name": INPUT_NAME, "dtype": "float32",
                      "shape": ["N", self.spec.in_channels, s, s]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["N", 1, s, s]},
        }
        doc = {"source": self.source,
               "onnx": {"file": f"{name}.onnx", "opset": self.req.opset, **io},
               "flops_per_slab": self.flops, **extra}
        write_json(self.stage / f"{name}.json", replace(info, extra=doc).to_json_dict())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _staging(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``out_dir`` (same file system: renames out of it are atomic).

    Folders this creates are removed again on failure; the stage always is.
    """
    created: list[Path] = []
    cur = out_dir.absolute()
    while not cur.exists():
        created.append(cur)
        cur = cur.parent
    for d in reversed(created):
        try:
            d.mkdir()
        except OSError as e:
            raise DunetError(f"{out_dir}: cannot create the output folder ({e.strerror})") from None
    try:
        stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    except OSError as e:
        raise DunetError(f"{out_dir}: output folder is not writable ({e.strerror})") from None
    ok = False
    try:
        yield stage
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok:
            for d in created:  # innermost first; only what is still empty
                with contextlib.suppress(OSError):
                    d.rmdir()


@contextlib.contextmanager
def _nothing_written() -> Iterator[None]:
    """Say in a verification error that the export wrote nothing."""
    try:
        yield
    except DunetError as e:
        raise DunetError(f"{e}; nothing written") from None


def _open_job(req: ExportRequest, stage: Path, log: Log, trt_version: str | None) -> _Job:
    """Load the checkpoint and describe it."""
    from dunet_deploy.export.onnx_export import artifact_info
    from dunet_deploy.training.checkpoint import load_checkpoint, model_from_checkpoint

    doc = load_checkpoint(req.checkpoint)
    model = model_from_checkpoint(doc, source=str(req.checkpoint))
    source = {
        "checkpoint": req.checkpoint.name,
        "sha256": _sha256(req.checkpoint),
        "epoch": doc.get("epoch"),
        "best_metrics": doc.get("best_metrics", {}),
    }
    template = _template(req, doc)
    info = replace(artifact_info(model, doc["spec_obj"], metrics=doc.get("metrics") or {}),
                   inference=req.inference,
                   template=None if template is None else template.describe())
    return _Job(req, stage, log, model, doc, doc["spec_obj"], source, info, trt_version,
                template=template)


def _template(req: ExportRequest, doc: dict[str, Any]) -> Any:
    """The registration template: ``req.template``, else the checkpoint's, else ``None``."""
    from dunet_deploy.data.registration import Template

    if req.template is not None:
        return Template.load(req.template)
    if doc.get("template"):
        return Template.from_checkpoint(doc["template"])
    return None


def _int8_data_step(job: _Job) -> None:
    """Read the int8 calibration and gate data first: bad data fails before any export work."""
    from dunet_deploy.export.int8 import prepare_int8

    if "onnx-int8" not in job.formats:
        return
    req = job.req
    assert req.calibration is not None  # ExportRequest.checked()
    job.int8_data = prepare_int8(job.doc, job.spec, req.calibration, req.gate_data,
                                 n_slabs=req.calibration_slabs, max_cases=req.calibration_cases,
                                 seed=req.seed)


def _fp32_step(job: _Job) -> None:
    """``model.onnx`` (always built: every other artefact derives from it)."""
    from dunet_deploy.export import verify as ver
    from dunet_deploy.export.onnx_export import export_onnx
    from dunet_deploy.flops import count_flops

    req, spec = job.req, job.spec
    onnx32 = job.stage / "model.onnx"
    job.proto = export_onnx(job.model, spec, onnx32, info=job.base_info, opset=req.opset)
    chw = (spec.in_channels, spec.image_size, spec.image_size)
    job.flops = count_flops(job.proto, (1, *chw))["per_sample"]
    verification: dict[str, Any] = {"skipped": True}
    if req.verify:
        job.inputs = ver.verification_inputs(spec, seed=req.seed,
                                             max_synthetic_slabs=req.verify_slabs)
        with _nothing_written():
            verification = ver.verify_fp32(job.model, onnx32, spec, inputs=job.inputs,
                                           log=job.log)
    job.onnx_json("model", job.base_info, verification=verification)
    if "onnx" in job.formats:
        job.written += ["model.onnx", "model.json"]
    if job.template is not None:  # one template beside every model of the folder
        from dunet_deploy.data.registration import TEMPLATE_FILE

        job.template.save(job.stage / TEMPLATE_FILE)
        job.written.append(TEMPLATE_FILE)


def _fp16_step(job: _Job) -> None:
    """``model_fp16.onnx`` (also the strongly typed TensorRT build's input)."""
    from dunet_deploy.export import fp16 as fp16_mod
    from dunet_deploy.export import verify as ver
    from dunet_deploy.export.onnx_export import set_metadata

    if not job.need_fp16:
        return
    info16 = replace(job.base_info, precision="fp16")
    proto16, report = fp16_mod.convert_to_mixed_fp16(job.proto)
    set_metadata(proto16, info16)
    onnx16 = job.stage / "model_fp16.onnx"
    onnx16.write_bytes(proto16.SerializeToString())
    if job.req.verify:
        with _nothing_written():
            job.fp16_verification = ver.verify_fp16(
                job.stage / "model.onnx", onnx16, job.spec, inputs=job.inputs, log=job.log)
    policy = {"policy": fp16_mod.DEFAULT_POLICY.to_dict(), "conversion": report.to_dict()}
    job.onnx_json("model_fp16", info16, fp16=policy, verification=job.fp16_verification)
    if "onnx-fp16" in job.formats:
        job.written += ["model_fp16.onnx", "model_fp16.json"]


def _int8_step(job: _Job) -> None:
    """``model_int8.onnx``: calibrated QDQ model, written only when its accuracy gate passes."""
    from dunet_deploy.export.int8 import GateThresholds, export_int8

    if "onnx-int8" not in job.formats:
        return
    req = job.req
    info8 = replace(job.base_info, precision="int8")
    thresholds = GateThresholds(max_dsc_drop=req.gate_max_dsc_drop,
                                min_lesion_dsc=req.gate_min_lesion_dsc,
                                min_agreement=req.gate_min_agreement)
    _, facts = export_int8(
        job.proto, job.stage / "model.onnx", job.stage / "model_int8.onnx", info8,
        job.int8_data, thresholds=thresholds, log=job.log,
    )
    job.onnx_json("model_int8", info8, int8=facts, verification=facts["gate"])
    job.written += ["model_int8.onnx", "model_int8.json"]


def _cache_target(req: ExportRequest) -> Path:
    return req.timing_cache or (req.out_dir / "timing.cache")


def _trt_step(job: _Job) -> None:
    """``model.plan`` + its sidecar and layer report, built strongly typed from the FP16 ONNX.

    On the GPU the new engine is run on the verification inputs against the
    FP32 ONNX; below the FP16 gate nothing is written.
    """
    from dunet_deploy.export import verify as ver
    from dunet_deploy.export.tensorrt_build import (
        EngineOptions,
        build_engine,
        format_layer_counts,
        layer_report_path,
        write_layer_report,
    )

    if "trt" not in job.formats:
        return
    req, spec = job.req, job.spec
    opts = EngineOptions(
        batch_range=req.batch_range,
        workspace_mb=req.workspace_mb,
        opt_level=req.opt_level,
        timing_cache=_cache_target(req),
        timing_cache_out=job.stage / "timing.cache",
    )
    chw = (spec.in_channels, spec.image_size, spec.image_size)
    # Strongly typed: the precision is the source graph's (mixed FP16, or int8 Q/DQ).
    source = "model_int8.onnx" if req.trt_precision == "int8" else "model_fp16.onnx"
    built = build_engine(job.stage / source, chw, opts)
    plan = job.stage / "model.plan"
    plan.write_bytes(built.plan)
    write_engine_sidecar(plan, replace(job.base_info, precision=built.precision), built.sidecar,
                         {"source": job.source, "flops_per_slab": job.flops,
                          "verification": job.fp16_verification})
    write_layer_report(plan, built.layers)
    job.log(format_layer_counts(built.sidecar.layer_precisions))
    if req.verify:
        with _nothing_written():
            ver.verify_engine(plan, job.stage / "model.onnx", spec, inputs=job.inputs,
                              log=job.log)
    job.written += [layer_report_path(plan).name, "model.plan", "model.plan.json"]


def _triton_step(job: _Job) -> None:
    """``triton/dunet/`` model repository serving the ONNX or the engine."""
    from dunet_deploy.export.triton_repo import write_triton_repo, write_volume_model

    if "triton" not in job.formats:
        return
    backend = job.req.triton_backend
    precision = job.req.trt_precision
    info = replace(job.base_info, precision=precision) if backend == "trt" else job.base_info
    _lo, opt, hi = job.req.batch_range
    model_file = job.stage / ("model.plan" if backend == "trt" else "model.onnx")
    model_dir = write_triton_repo(job.stage / "triton", model_file, info, backend=backend,
                                  max_batch_size=hi, preferred_batch_sizes=(opt, hi))
    # dunet_volume: the whole pipeline on the server (NIfTI bytes in, mask out), via BLS.
    volume_dir = write_volume_model(job.stage / "triton", info, batch_size=hi)
    job.written += [str(p.relative_to(job.stage)) for d in (model_dir, volume_dir)
                    for p in sorted(d.rglob("*")) if p.is_file()]


#: The export steps, in order; each reads what the earlier ones left in the job.
STEPS: tuple[Callable[[_Job], None], ...] = (
    _int8_data_step, _fp32_step, _fp16_step, _int8_step, _trt_step, _triton_step,
)


def _commit(job: _Job) -> list[Path]:
    """Move every written file from the stage into the output folder.

    The renames run under :func:`~dunet_deploy.artifacts.deferred_interrupts`: a
    Ctrl-C or SIGTERM arriving between two of them is raised once all are done,
    so the folder never holds half the new set beside half the old one.
    """
    out = job.req.out_dir
    with deferred_interrupts():
        for rel in job.written:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(job.stage / rel, dst)
        cache = job.stage / "timing.cache"
        if "trt" in job.formats and cache.is_file():
            target = _cache_target(job.req)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(cache), str(target))  # may be on another file system
    return [Path(p) for p in job.written]


def run_export(req: ExportRequest, log: Log = print) -> list[Path]:
    """Build, verify and write every requested artefact.

    Returns:
        The written paths, relative to ``req.out_dir``.

    Raises:
        DunetError: on any user-facing failure (nothing is written then).
    """
    from dunet_deploy.export.tensorrt_build import check_tensorrt_available, probe_gpu

    req = req.checked()
    trt_version = None
    if "trt" in req.formats:  # fail fast, before minutes of export work
        trt_version = check_tensorrt_available()
        probe_gpu()
    if not req.checkpoint.is_file():  # before creating the output folder
        raise DunetError(f"{req.checkpoint}: checkpoint not found")
    with _staging(req.out_dir) as stage:
        job = _open_job(req, stage, log, trt_version)
        for step in STEPS:
            step(job)
        return _commit(job)
