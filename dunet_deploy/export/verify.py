"""Numerical verification of exported models against their reference.

Every export is checked on two input sets (:func:`verification_inputs`):

* ``random`` — standard-normal slabs: exercise every weight, no structure;
* ``synthetic`` — the non-empty slabs of a synthetic volume
  (:func:`~dunet_deploy.data.synth.synthesize_case` at the spec's geometry,
  preprocessed with :func:`~dunet_deploy.data.preprocess.volume_to_slabs`):
  in-distribution inputs, on which the mask agreement is meaningful.

and reported as max/mean absolute error of the probabilities and agreement of
the thresholded masks (:class:`Comparison`). Runners exist for PyTorch (the
reference of an FP32 export), ONNX Runtime (CPU) and OpenVINO (CPU).

FP16 graphs are checked three ways, because no CPU runtime really executes
float16: ONNX Runtime's CPU provider wraps ops without float16 kernels (most
of them) in casts and then drops the cast pairs, so float16 regions run in
float32 with float16 weights; OpenVINO's CPU plugin upgrades float16 to
float32 unless the CPU has native float16 (``INFERENCE_PRECISION_HINT=f32``:
float16 weights, float32 activations). Both prove that the graph loads and
runs there. :func:`~dunet_deploy.export.fp16.emulate_fp16` adds the third,
faithful check: a float32 graph with explicit float16 rounding of every
tensor the FP16 graph stores in float16 — the numerics of GPU float16
kernels with float32 accumulation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "FP16_MIN_AGREEMENT",
    "FP32_TOLERANCE",
    "Comparison",
    "compare",
    "format_table",
    "openvino_available",
    "run_onnxruntime",
    "run_openvino",
    "run_torch",
    "verification_inputs",
    "verify_engine",
    "verify_fp16",
    "verify_fp32",
]

#: Largest |p_onnx - p_torch| accepted for an FP32 export.
FP32_TOLERANCE = 1e-4
#: Smallest mask agreement (synthetic volume) accepted for an FP16 export.
FP16_MIN_AGREEMENT = 0.999

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """One row of a verification table.

    Attributes:
        inputs: input set (``"random"`` or ``"synthetic"``).
        backend: what produced the output (``"onnxruntime"``, ``"openvino"``...).
        reference: what it is compared against.
        slabs: number of slabs.
        max_abs: largest absolute probability difference.
        mean_abs: mean absolute probability difference.
        mask_agreement: fraction of pixels whose thresholded mask agrees.
        disagreeing: number of pixels whose mask differs.
        positives: lesion pixels in the reference mask.
        passed: the row met its gate (``None`` when it has none).
    """

    inputs: str
    backend: str
    reference: str
    slabs: int
    max_abs: float
    mean_abs: float
    mask_agreement: float
    disagreeing: int
    positives: int
    passed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def compare(
    reference: np.ndarray,
    output: np.ndarray,
    threshold: float,
    *,
    inputs: str,
    backend: str,
    reference_name: str,
) -> Comparison:
    """Compare two probability batches ``[N, 1, S, S]``.

    Args:
        reference: probabilities of the reference.
        output: probabilities under test, same shape.
        threshold: mask threshold (``p >= threshold`` is lesion, as
            :func:`~dunet_deploy.data.preprocess.binarize`).
        inputs: name of the input set.
        backend: name of the backend under test.
        reference_name: name of the reference.
    """
    if reference.shape != output.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {output.shape}")
    ref = reference.astype(np.float64)
    out = output.astype(np.float64)
    diff = np.abs(ref - out)
    m_ref = ref >= threshold
    m_out = out >= threshold
    disagree = int(np.count_nonzero(m_ref != m_out))
    return Comparison(
        inputs=inputs,
        backend=backend,
        reference=reference_name,
        slabs=int(reference.shape[0]),
        max_abs=float(diff.max()) if diff.size else 0.0,
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        mask_agreement=1.0 - disagree / max(1, m_ref.size),
        disagreeing=disagree,
        positives=int(np.count_nonzero(m_ref)),
    )


def format_table(rows: Sequence[Comparison]) -> str:
    """A fixed-width table of comparisons, one line each."""
    head = (
        f"{'inputs':<10} {'backend':<22} {'vs':<12} {'slabs':>5} {'max|dp|':>10} "
        f"{'mean|dp|':>10} {'mask agree':>11} {'differ':>7} {'lesion px':>9}  ok"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = {True: "yes", False: "NO", None: "-"}[r.passed]
        lines.append(
            f"{r.inputs:<10} {r.backend:<22} {r.reference:<12} {r.slabs:>5} {r.max_abs:>10.2e} "
            f"{r.mean_abs:>10.2e} {100 * r.mask_agreement:>10.4f}% {r.disagreeing:>7} "
            f"{r.positives:>9}  {ok}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------- inputs
def verification_inputs(
    spec: PreprocessSpec,
    *,
    seed: int = 0,
    random_slabs: int = 4,
    max_synthetic_slabs: int = 24,
) -> dict[str, np.ndarray]:
    """The two verification input sets at the spec's geometry.

    Args:
        spec: preprocessing spec (geometry, channels, intensity mode).
        seed: seed of the random slabs and of the synthetic case.
        random_slabs: number of standard-normal slabs.
        max_synthetic_slabs: cap on synthetic slabs; when the volume has more
            non-empty slabs, evenly spaced ones are taken (always including
            the slab with the most lesion, if any).

    Returns:
        ``{"random": float32[R, C, S, S], "synthetic": float32[K, C, S, S]}``.
    """
    from dunet_deploy.data.preprocess import nonempty_slab_indices, volume_to_slabs
    from dunet_deploy.data.synth import synthesize_case

    s, c = spec.image_size, spec.in_channels
    rng = np.random.default_rng(seed)
    rand = rng.standard_normal((random_slabs, c, s, s), dtype=np.float32)
    spec_for_synth = spec
    if spec.intensity == "dataset_minmax_zscore":
        # The dataset statistics belong to real scans; synthetic intensities
        # are in arbitrary units, so use the per-volume normalisation instead.
        spec_for_synth = spec.replace(intensity="robust_zscore")
    image, mask = synthesize_case(spec.volume_shape, seed=seed)
    slabs = volume_to_slabs(image, spec_for_synth)
    idx = nonempty_slab_indices(image, spec_for_synth)
    if idx.size > max_synthetic_slabs:
        pick = idx[np.linspace(0, idx.size - 1, max_synthetic_slabs).round().astype(int)]
        lesion = np.moveaxis(mask, spec.axial_axis, 0).reshape(mask.shape[spec.axial_axis], -1)
        best = int(lesion.sum(axis=1).argmax())
        if lesion[best].any() and best not in pick:
            pick[len(pick) // 2] = best
        idx = np.unique(pick)
    return {"random": rand, "synthetic": np.ascontiguousarray(slabs[idx])}


# -------------------------------------------------------------------- runners
def _batched(fn: Runner, slabs: np.ndarray, batch_size: int) -> np.ndarray:
    outs = [fn(slabs[i : i + batch_size]) for i in range(0, len(slabs), batch_size)]
    return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


def run_torch(model: Any, slabs: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Probabilities of a torch model in eval mode, float32 ``[N, 1, S, S]``."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _batched(
                lambda x: model(torch.from_numpy(np.ascontiguousarray(x))).numpy(),
                slabs,
                batch_size,
            )
    finally:
        model.train(was_training)


def run_onnxruntime(
    model: str | os.PathLike[str] | bytes,
    slabs: np.ndarray,
    batch_size: int = 8,
    *,
    optimization: str = "all",
) -> np.ndarray:
    """Run an ONNX model on ONNX Runtime's CPU execution provider.

    Args:
        model: path or serialized bytes.
        slabs: float32 ``[N, C, S, S]``.
        batch_size: slabs per run.
        optimization: graph optimisation level, ``"all"`` (ORT's default) or
            ``"basic"``.

    Returns:
        float32 ``[N, 1, S, S]``.
    """
    from dunet_deploy.runtime.loaders import CPU_EP, ort_session

    sess = ort_session(model, [CPU_EP], optimization=optimization)
    return _batched(lambda x: sess.run(None, {INPUT_NAME: x})[0], slabs, batch_size)


def openvino_available() -> bool:
    """Whether the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def run_openvino(
    model: str | os.PathLike[str],
    slabs: np.ndarray,
    batch_size: int = 8,
    *,
    precision: str = "f32",
) -> np.ndarray:
    """Run an ONNX file on OpenVINO's CPU plugin.

    Args:
        model: path of the ``.onnx``.
        slabs: float32 ``[N, C, S, S]``.
        batch_size: slabs per inference.
        precision: ``INFERENCE_PRECISION_HINT`` (``"f32"`` keeps float32
            activations; float16 weights are decompressed).

    Returns:
        float32 ``[N, 1, S, S]``.
    """
    import openvino as ov

    from dunet_deploy.runtime.loaders import openvino_compile, openvino_read

    core = ov.Core()
    compiled = openvino_compile(core, openvino_read(core, model), "CPU",
                                {"INFERENCE_PRECISION_HINT": precision}, model)
    request = compiled.create_infer_request()

    def one(x: np.ndarray) -> np.ndarray:
        return np.asarray(request.infer({0: x})[compiled.output(0)]).copy()

    return _batched(one, slabs, batch_size)


# ------------------------------------------------------------------ the gates
Log = Callable[[str], None]


def verify_fp32(
    model: Any,
    onnx_path: str | os.PathLike[str],
    spec: PreprocessSpec,
    *,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    max_synthetic_slabs: int = 16,
    log: Log | None = None,
) -> dict[str, Any]:
    """Check an FP32 ONNX against its PyTorch model on ONNX Runtime (CPU).

    Args:
        model: the torch model that was exported.
        onnx_path: the exported ``.onnx``.
        spec: its preprocessing spec (geometry, threshold).
        inputs: input sets (default: :func:`verification_inputs`).
        seed: seed of the default inputs.
        max_synthetic_slabs: cap of the default synthetic slabs.
        log: receives the verification table (e.g. ``print``).

    Returns:
        JSON-able ``{"reference": "torch", "tolerance_abs", "rows": [...], "passed": True}``.

    Raises:
        DunetError: when any max abs error exceeds :data:`FP32_TOLERANCE`.
    """
    from dataclasses import replace

    from dunet_deploy.errors import DunetError

    if inputs is None:
        inputs = verification_inputs(spec, seed=seed, max_synthetic_slabs=max_synthetic_slabs)
    rows = []
    for name, slabs in inputs.items():
        row = compare(
            run_torch(model, slabs),
            run_onnxruntime(onnx_path, slabs),
            spec.threshold,
            inputs=name,
            backend="onnxruntime-cpu",
            reference_name="torch",
        )
        rows.append(replace(row, passed=row.max_abs <= FP32_TOLERANCE))
    if log is not None:
        log(f"verification of {Path(onnx_path).name} (fp32, max|dp| <= {FP32_TOLERANCE:g})")
        log(format_table(rows))
    bad = [r for r in rows if not r.passed]
    if bad:
        raise DunetError(
            f"verification failed: {Path(onnx_path).name} differs from PyTorch by "
            f"{bad[0].max_abs:.2e} on {bad[0].inputs} slabs (tolerance {FP32_TOLERANCE:g})"
        )
    return {
        "reference": "torch",
        "tolerance_abs": FP32_TOLERANCE,
        "rows": [r.to_dict() for r in rows],
        "passed": True,
    }


def _gate_against_fp32(
    onnx32: str | os.PathLike[str],
    inputs: dict[str, np.ndarray],
    spec: PreprocessSpec,
    backends: list[tuple[str, Runner]],
    min_agreement: float,
    *,
    kind: str,
    name: str,
    log: Log | None,
) -> dict[str, Any]:
    """Each backend against the FP32 ONNX on ONNX Runtime; the synthetic volume is the gate.

    Args:
        onnx32: The reference FP32 ONNX.
        inputs: Named slab sets (``"synthetic"`` is the one gated).
        spec: Its threshold binarises the masks.
        backends: ``(name, run)`` pairs under test.
        min_agreement: Least mask agreement on the synthetic volume.
        kind: What is verified, for messages (``"FP16"``, ``"TensorRT"``).
        name: The file under test, for messages.
        log: Where the table goes.

    Returns:
        JSON-able ``{"reference": "fp32 onnx", "min_mask_agreement", "rows", "passed": True}``.

    Raises:
        DunetError: naming the first backend below ``min_agreement``.
    """
    from dataclasses import replace

    from dunet_deploy.errors import DunetError

    rows = []
    for label, slabs in inputs.items():
        ref = run_onnxruntime(onnx32, slabs)
        for backend, run in backends:
            row = compare(ref, run(slabs), spec.threshold, inputs=label, backend=backend,
                          reference_name="fp32 onnx")
            gate = row.mask_agreement >= min_agreement if label == "synthetic" else None
            rows.append(replace(row, passed=gate))
    if log is not None:
        log(f"verification of {name} (mask agreement >= {100 * min_agreement:g}% on the "
            "synthetic volume)")
        log(format_table(rows))
    bad = [r for r in rows if r.passed is False]
    if bad:
        raise DunetError(
            f"{kind} verification failed: {name} agrees with the FP32 masks on "
            f"{100 * bad[0].mask_agreement:.3f}% < {100 * min_agreement:g}% of the "
            f"synthetic-volume pixels ({bad[0].backend})"
        )
    return {"reference": "fp32 onnx", "min_mask_agreement": min_agreement,
            "rows": [r.to_dict() for r in rows], "passed": True}


def verify_fp16(
    onnx32: str | os.PathLike[str],
    onnx16: str | os.PathLike[str],
    spec: PreprocessSpec,
    *,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    max_synthetic_slabs: int = 16,
    log: Log | None = None,
) -> dict[str, Any]:
    """Check a mixed-precision ONNX against the FP32 ONNX it came from.

    Three backends (see the module docstring): the float16 emulation
    (:func:`~dunet_deploy.export.fp16.emulate_fp16` on ONNX Runtime), ONNX
    Runtime CPU and OpenVINO CPU (``f32`` hint; skipped with a note when
    OpenVINO is not installed) running the FP16 file as it is.

    Returns:
        JSON-able ``{"reference": "fp32 onnx", "min_mask_agreement", "rows", "passed": True}``.

    Raises:
        DunetError: when a backend agrees with the FP32 masks on less than
            :data:`FP16_MIN_AGREEMENT` of the synthetic-volume pixels.
    """
    import onnx

    from dunet_deploy.export.fp16 import emulate_fp16

    if inputs is None:
        inputs = verification_inputs(spec, seed=seed, max_synthetic_slabs=max_synthetic_slabs)
    emulated = emulate_fp16(onnx.load(str(onnx16))).SerializeToString()
    backends: list[tuple[str, Runner]] = [
        ("fp16-emulation", lambda x: run_onnxruntime(emulated, x)),
        ("onnxruntime-cpu", lambda x: run_onnxruntime(onnx16, x)),
    ]
    if openvino_available():
        backends.append(("openvino-cpu-f32", lambda x: run_openvino(onnx16, x)))
    elif log is not None:
        log("note: openvino is not installed; FP16 verified with ONNX Runtime only")
    return _gate_against_fp32(onnx32, inputs, spec, backends, FP16_MIN_AGREEMENT,
                              kind="FP16", name=Path(onnx16).name, log=log)


def verify_engine(
    plan: str | os.PathLike[str],
    onnx32: str | os.PathLike[str],
    spec: PreprocessSpec,
    *,
    inputs: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    max_synthetic_slabs: int = 16,
    min_agreement: float = FP16_MIN_AGREEMENT,
    log: Log | None = None,
) -> dict[str, Any]:
    """Run a freshly built TensorRT engine (with its sidecar) against the FP32 ONNX.

    On the GPU, through the runtime's TensorRT runner: the same gate as the
    FP16 ONNX (mask agreement on the synthetic volume).

    Returns:
        JSON-able ``{"reference": "fp32 onnx", "min_mask_agreement", "rows", "passed": True}``.

    Raises:
        DunetError: when TensorRT/the GPU is unusable or the engine agrees with
            the FP32 masks on less than ``min_agreement`` of the synthetic pixels.
    """
    from dunet_deploy.runtime.base import open_runner

    if inputs is None:
        inputs = verification_inputs(spec, seed=seed, max_synthetic_slabs=max_synthetic_slabs)
    with open_runner(Path(plan), "tensorrt") as runner:
        return _gate_against_fp32(onnx32, inputs, spec, [("tensorrt", runner.infer)],
                                  min_agreement, kind="TensorRT", name=Path(plan).name,
                                  log=log)
