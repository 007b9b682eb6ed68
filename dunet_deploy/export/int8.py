"""Calibrated, accuracy-gated INT8 (QDQ) ONNX of a D-UNet.

``dunet-export CKPT --format onnx-int8 --calibration DATA`` runs
:func:`export_int8`:

1. **Data.** :func:`resolve_cases` picks the calibration and the held-out
   cases: when DATA is the checkpoint's own training set, calibration uses
   its training cases and the gate its validation split; otherwise all of
   DATA calibrates and ``--gate-data`` is the held-out set.
2. **Calibration slabs.** :func:`calibration_slabs` makes slabs with the
   spec's own preprocessing (:mod:`dunet_deploy.data.preprocess`), spread
   over the cases, lesion-bearing slabs over-represented (up to
   :attr:`Int8Policy.lesion_share` of each case's quota, against a few
   percent of slabs in real scans): activation ranges are then set where the
   decisions are made.
3. **Quantization** (:func:`quantize_qdq`): ONNX Runtime's ``quantize_static``
   in QDQ form — per-channel symmetric int8 ``Conv`` weights, per-tensor
   symmetric int8 activations (zero point 0), MinMax ranges — Q/DQ pairs on
   the inputs and weights of the convolutions only, which is where NVIDIA
   ModelOpt's ONNX PTQ (itself built on this quantizer) puts them for
   TensorRT explicit quantization; ONNX Runtime and OpenVINO fuse the same
   pattern into integer kernels. Like the FP16 policy, the squeeze-and-
   excitation branch (``ReduceMean``, its ``MatMul`` s and gating ``Sigmoid``)
   and the head (last ``Conv`` + ``Sigmoid``) stay float. Why this quantizer
   and not NNCF: ``docs/int8.md`` (measured accuracy and speed).
4. **Gate** (:func:`run_gate`): on the held-out cases, through every
   installed CPU runtime, int8 against fp32 of the same runtime: the mean
   per-case DSC against the ground truth may drop by at most
   :attr:`GateThresholds.max_dsc_drop` and the thresholded masks must agree
   on at least :attr:`GateThresholds.min_agreement` of the head voxels
   (nonzero input). Otherwise :class:`~dunet_deploy.errors.DunetError` with
   the numbers, and the export writes nothing.

Torch-free; onnxruntime (the ``int8`` extra) is imported when quantizing.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from dunet_deploy.artifacts import INPUT_NAME, ArtifactInfo
from dunet_deploy.data.layouts import Case, discover_cases, load_case
from dunet_deploy.data.preprocess import mask_to_labels, nonempty_slab_indices, volume_to_slices
from dunet_deploy.data.preprocess import slices_to_slabs as _slabs_of
from dunet_deploy.errors import DunetError, one_line
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "DEFAULT_CALIBRATION_SLABS",
    "DEFAULT_POLICY",
    "GateThresholds",
    "Int8Policy",
    "calibration_slabs",
    "check_gate",
    "export_int8",
    "format_gate",
    "quantize_qdq",
    "resolve_cases",
    "run_gate",
    "synthetic_calibration_slabs",
]

#: ``--calibration-slabs`` default.
DEFAULT_CALIBRATION_SLABS = 512
#: ONNX metadata key holding the int8 facts (policy, calibration, gate figures) as JSON.
METADATA_KEY = "dunet.int8"

Log = Callable[[str], None]


@dataclass(frozen=True)
class Int8Policy:
    """What is quantized and how (recorded in ``model_int8.json``).

    Attributes:
        quantized_ops: op types whose inputs and weights get Q/DQ pairs.
        keep_float_ops: op types always left float (the SE branch and gates).
        keep_head: leave the head (last ``Conv`` before the output) float.
        lesion_share: largest share of a case's calibration slabs taken
            from lesion-bearing slabs.
    """

    quantized_ops: tuple[str, ...] = ("Conv",)
    keep_float_ops: tuple[str, ...] = ("ReduceMean", "GlobalAveragePool", "MatMul", "Gemm",
                                       "Sigmoid")
    keep_head: bool = True
    lesion_share: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the fixed quantization scheme spelled out."""
        return {
            **asdict(self),
            "quantizer": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "weights": "int8, per-channel (output channel), symmetric",
            "activations": "int8, per-tensor, symmetric (zero point 0)",
            "calibration_method": "MinMax",
        }


DEFAULT_POLICY = Int8Policy()


@dataclass(frozen=True)
class GateThresholds:
    """The accuracy gate of an int8 export.

    Attributes:
        max_dsc_drop: largest accepted drop of the mean per-case DSC
            (fp32 minus int8, against the ground truth).
        min_agreement: smallest accepted fraction of head voxels whose int8
            mask equals the fp32 mask.
    """

    max_dsc_drop: float = 0.01
    min_agreement: float = 0.999


# ------------------------------------------------------------------ data
def _same_dataset(doc: dict[str, Any], data: Path, ids: set[str]) -> bool:
    config = doc.get("config") or {}
    split = config.get("split") or {}
    recorded = {str(i) for part in ("train", "val") for i in split.get(part) or []}
    if not split.get("val"):
        return False
    trained_on = config.get("data")
    if trained_on and Path(str(trained_on)).resolve() == data.resolve():
        return True
    return recorded <= ids  # the same cases, wherever they were copied


def resolve_cases(
    doc: dict[str, Any],
    calibration: Path,
    gate_data: Path | None,
    *,
    max_cases: int | None = None,
    layout: str | None = None,
    seed: int = 0,
) -> tuple[list[Case], list[Case], str]:
    """Calibration and held-out cases for an int8 export.

    Args:
        doc: the loaded checkpoint (its ``config`` records ``data`` and ``split``).
        calibration: ``--calibration`` DATA folder.
        gate_data: ``--gate-data`` folder, or ``None``.
        max_cases: ``--calibration-cases``: at most this many calibration cases
            (an evenly spread, seeded sample).
        layout: force a dataset layout.
        seed: sampling seed.

    Returns:
        ``(calibration_cases, gate_cases, how)``; ``how`` says where the gate cases came from.

    Raises:
        DunetError: when no held-out set can be found, or the two overlap.
    """
    _, cases = discover_cases(calibration, layout)
    ids = {c.case_id for c in cases}
    if gate_data is not None:
        _, gate = discover_cases(gate_data, layout)
        how = f"--gate-data {gate_data}"
        calib = cases
        shared = {c.image.resolve() for c in gate} & {c.image.resolve() for c in calib}
        if shared:
            raise DunetError(
                f"--gate-data {gate_data}: {len(shared)} case(s) are also calibration cases in "
                f"{calibration}; the gate needs held-out cases"
            )
    elif _same_dataset(doc, calibration, ids):
        split = doc["config"]["split"]
        val = {str(i) for i in split["val"]}
        gate = [c for c in cases if c.case_id in val]
        calib = [c for c in cases if c.case_id not in val]
        how = f"the checkpoint's validation split ({len(gate)} cases of {calibration})"
        if not gate or not calib:
            raise DunetError(
                f"--calibration {calibration}: the checkpoint's split leaves no "
                f"{'validation' if not gate else 'training'} case there; pass --gate-data"
            )
    else:
        raise DunetError(
            f"--calibration {calibration} is not the checkpoint's training set; pass --gate-data "
            "with held-out cases (image + lesion mask) for the int8 accuracy gate"
        )
    if max_cases is not None and len(calib) > max_cases:
        pick = np.random.default_rng(seed).choice(len(calib), max_cases, replace=False)
        calib = [calib[i] for i in sorted(pick)]
    return calib, gate, how


def _pick_slabs(
    image: np.ndarray, mask: np.ndarray | None, spec: PreprocessSpec, quota: int,
    lesion_share: float, rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Up to ``quota`` non-empty slabs of one volume, lesion slabs first up to their share.

    Returns:
        ``(float32 [k, C, S, S], lesion slabs among them)``.
    """
    idx = nonempty_slab_indices(image, spec)
    if mask is not None and idx.size:
        labels = mask_to_labels(mask, spec)[idx].reshape(idx.size, -1).any(axis=1)
    else:
        labels = np.zeros(idx.size, dtype=bool)
    lesion, other = idx[labels], idx[~labels]
    n_les = min(lesion.size, math.ceil(quota * lesion_share))
    n_other = min(other.size, quota - n_les)
    n_les = min(lesion.size, quota - n_other)  # a lesion-rich case fills the rest
    chosen = np.sort(np.concatenate([
        rng.choice(lesion, n_les, replace=False), rng.choice(other, n_other, replace=False)
    ])).astype(np.int64)
    slabs = _slabs_of(volume_to_slices(image, spec), spec, chosen)
    return slabs.astype(np.float32, copy=False), int(n_les)


def _gather(
    volumes: Iterator[tuple[np.ndarray, np.ndarray | None]], n_volumes: int,
    spec: PreprocessSpec, n_slabs: int, lesion_share: float, seed: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    quota = max(1, math.ceil(n_slabs / max(1, n_volumes)))
    parts, lesion = [], 0
    for image, mask in volumes:
        slabs, n_les = _pick_slabs(image, mask, spec, quota, lesion_share, rng)
        parts.append(slabs)
        lesion += n_les
    s, c = spec.image_size, spec.in_channels
    out = np.concatenate(parts)[:n_slabs] if parts else np.zeros((0, c, s, s), np.float32)
    if out.shape[0] == 0:
        raise DunetError("calibration: the data has no non-empty slab")
    stats = {"slabs": int(out.shape[0]), "lesion_slabs": min(lesion, int(out.shape[0])),
             "volumes": n_volumes, "seed": seed}
    return np.ascontiguousarray(out), stats


def calibration_slabs(
    cases: Sequence[Case],
    spec: PreprocessSpec,
    n_slabs: int = DEFAULT_CALIBRATION_SLABS,
    *,
    lesion_share: float = DEFAULT_POLICY.lesion_share,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Calibration slabs of a dataset, made by the spec's preprocessing.

    Each case contributes an equal quota of its non-empty slabs, lesion slabs
    first up to ``lesion_share`` of the quota. One case is read at a time.

    Returns:
        ``(float32 [K, C, S, S], stats)``, ``K <= n_slabs``; stats count slabs,
        lesion slabs and cases.

    Raises:
        DunetError: for unreadable cases or data without any non-empty slab.
    """
    def volumes() -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for case in cases:
            image, mask = load_case(case)
            yield image.data, mask

    slabs, stats = _gather(volumes(), len(cases), spec, n_slabs, lesion_share, seed)
    stats["cases"] = [c.case_id for c in cases]
    return slabs, stats


def synthetic_calibration_slabs(
    spec: PreprocessSpec, n_slabs: int = 64, *, seed: int = 0, volumes: int = 4
) -> np.ndarray:
    """Calibration slabs of synthetic ATLAS-like volumes (``dunet-bench``'s random models).

    Returns:
        float32 ``[K, C, S, S]``, ``K <= n_slabs``.
    """
    from dunet_deploy.data.synth import synthesize_case

    syn = spec
    if spec.intensity == "dataset_minmax_zscore":  # dataset statistics belong to real scans
        syn = spec.replace(intensity="robust_zscore")
    gen = (synthesize_case(spec.volume_shape, seed=seed + k) for k in range(volumes))
    slabs, _ = _gather(gen, volumes, syn, n_slabs, DEFAULT_POLICY.lesion_share, seed)
    return slabs


# ---------------------------------------------------------- quantization
def _float_nodes(graph: onnx.GraphProto, policy: Int8Policy) -> list[str]:
    from dunet_deploy.export.fp16 import head_nodes

    keep = [n.name for n in graph.node if n.op_type in policy.keep_float_ops]
    if policy.keep_head:
        keep += sorted(head_nodes(graph))
    return keep


def quantize_qdq(
    model: onnx.ModelProto, slabs: np.ndarray, policy: Int8Policy = DEFAULT_POLICY,
    *, batch_size: int = 8,
) -> onnx.ModelProto:
    """Quantize an fp32 model into a QDQ model calibrated on ``slabs``.

    Args:
        model: the checked fp32 export (named nodes).
        slabs: float32 ``[K, C, S, S]`` calibration slabs.
        policy: what is quantized.
        batch_size: slabs per calibration run.

    Returns:
        The QDQ model (float32 input and output, metadata of ``model`` kept).

    Raises:
        DunetError: when onnxruntime's quantization tooling is not installed.
    """
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as exc:
        raise DunetError(
            f"--format onnx-int8 needs onnxruntime's quantizer ({one_line(exc)}): "
            "pip install 'dunet-deploy[int8]'"
        ) from None

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter(range(0, len(slabs), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self._it, None)
            return None if i is None else {INPUT_NAME: slabs[i : i + batch_size]}

    with tempfile.TemporaryDirectory(prefix="dunet-int8-") as tmp:
        out = Path(tmp) / "model_int8.onnx"
        quantize_static(
            model, out, _Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(policy.quantized_ops),
            nodes_to_exclude=_float_nodes(model.graph, policy),
            per_channel=True,
            activation_type=QuantType.QInt8,  # TensorRT takes only signed int8 Q/DQ
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q


# ------------------------------------------------------------------ gate
def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _gate_backend(
    backend: str, onnx32: Path, onnx8: Path, cases: Sequence[Case], spec: PreprocessSpec,
) -> dict[str, Any]:
    from dunet_deploy.runtime.base import open_runner
    from dunet_deploy.training.evaluate import predict_volume

    ref_precision = "fp32" if backend == "openvino" else "auto"
    with open_runner(onnx32, backend, precision=ref_precision) as r32, \
            open_runner(onnx8, backend) as r8:
        executed = r8.precision
        d32, d8, agree, voxels, inter, total = [], [], 0, 0, 0, 0
        for case in cases:
            image, truth = load_case(case)
            m32 = predict_volume(image.data, spec, r32) >= spec.threshold
            m8 = predict_volume(image.data, spec, r8) >= spec.threshold
            head = image.data != 0
            d32.append(_dsc(m32, truth > 0))
            d8.append(_dsc(m8, truth > 0))
            agree += int(np.count_nonzero((m32 == m8) & head))
            voxels += int(np.count_nonzero(head))
            inter += int(np.count_nonzero(m32 & m8))
            total += int(m32.sum()) + int(m8.sum())
    return {
        "backend": backend,
        "executed_precision": executed,
        "cases": len(cases),
        "dsc_fp32": float(np.mean(d32)),
        "dsc_int8": float(np.mean(d8)),
        "dsc_drop": float(np.mean(d32) - np.mean(d8)),
        "voxel_agreement": agree / max(1, voxels),
        "lesion_dsc_vs_fp32": 1.0 if total == 0 else 2.0 * inter / total,
    }


def run_gate(
    onnx32: Path, onnx8: Path, cases: Sequence[Case], spec: PreprocessSpec,
    thresholds: GateThresholds = GateThresholds(),
) -> dict[str, Any]:
    """Compare int8 with fp32 on held-out cases through every installed CPU runtime.

    Returns:
        JSON-able ``{"thresholds", "rows": [per backend: dsc_fp32, dsc_int8,
        dsc_drop, voxel_agreement, lesion_dsc_vs_fp32, passed...], "passed"}``.
    """
    from dunet_deploy.runtime.base import is_installed

    backends = [b for b in ("onnxruntime", "openvino") if is_installed(b)]
    rows = []
    for backend in backends:
        row = _gate_backend(backend, onnx32, onnx8, cases, spec)
        row["passed"] = (row["dsc_drop"] <= thresholds.max_dsc_drop
                         and row["voxel_agreement"] >= thresholds.min_agreement)
        rows.append(row)
    return {"thresholds": asdict(thresholds), "rows": rows,
            "passed": bool(rows) and all(r["passed"] for r in rows)}


def format_gate(gate: dict[str, Any]) -> str:
    """The gate as a fixed-width table."""
    head = (f"{'backend':<12} {'runs':<6} {'cases':>5} {'DSC fp32':>9} {'DSC int8':>9} "
            f"{'drop':>8} {'voxel agree':>12} {'lesion DSC':>10}  ok")
    lines = [head, "-" * len(head)]
    for r in gate["rows"]:
        lines.append(
            f"{r['backend']:<12} {r['executed_precision']:<6} {r['cases']:>5} "
            f"{r['dsc_fp32']:>9.4f} {r['dsc_int8']:>9.4f} {r['dsc_drop']:>+8.4f} "
            f"{100 * r['voxel_agreement']:>11.4f}% {r['lesion_dsc_vs_fp32']:>10.4f}  "
            f"{'yes' if r['passed'] else 'NO'}"
        )
    return "\n".join(lines)


def check_gate(gate: dict[str, Any], name: str = "model_int8.onnx") -> None:
    """Raise with the numbers when the gate failed.

    Raises:
        DunetError: naming the first failing backend and its figures.
    """
    if gate["passed"]:
        return
    t = gate["thresholds"]
    bad = next((r for r in gate["rows"] if not r["passed"]), None)
    if bad is None:
        raise DunetError(f"int8 gate: no CPU runtime installed to check {name}")
    raise DunetError(
        f"int8 gate refused {name} ({bad['backend']}): DSC drop {bad['dsc_drop']:+.4f} "
        f"(max {t['max_dsc_drop']:g}; fp32 {bad['dsc_fp32']:.4f}, int8 {bad['dsc_int8']:.4f}), "
        f"voxel agreement {100 * bad['voxel_agreement']:.3f}% (min "
        f"{100 * t['min_agreement']:g}%) on {bad['cases']} held-out case(s); nothing written"
    )


# ---------------------------------------------------------------- export
def export_int8(
    proto32: onnx.ModelProto,
    onnx32: Path,
    out: Path,
    doc: dict[str, Any],
    info: ArtifactInfo,
    *,
    calibration: Path,
    gate_data: Path | None = None,
    n_slabs: int = DEFAULT_CALIBRATION_SLABS,
    max_cases: int | None = None,
    thresholds: GateThresholds = GateThresholds(),
    seed: int = 0,
    log: Log = print,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Calibrate, quantize and gate; write the QDQ model to ``out`` (a staging path).

    Args:
        proto32: the fp32 export.
        onnx32: that model on disk (the gate's reference).
        out: where the int8 model is written (the caller commits or deletes it).
        doc: the loaded checkpoint.
        info: the int8 model's self-description (``precision="int8"``).
        calibration: ``--calibration`` DATA.
        gate_data: ``--gate-data``.
        n_slabs: ``--calibration-slabs``.
        max_cases: ``--calibration-cases``.
        thresholds: the gate.
        seed: sampling seed.
        log: receives progress and the gate table.

    Returns:
        ``(int8 model, facts)``; facts (policy, calibration, gate) go into
        ``model_int8.json`` and the ``dunet.int8`` metadata.

    Raises:
        DunetError: for bad data, a missing quantizer, or a refused gate.
    """
    import json

    spec = info.spec
    calib, gate_cases, how = resolve_cases(
        doc, calibration, gate_data, max_cases=max_cases, seed=seed)
    slabs, stats = calibration_slabs(calib, spec, n_slabs, seed=seed)
    log(f"int8: calibrating on {stats['slabs']} slabs ({stats['lesion_slabs']} with lesion) "
        f"of {len(calib)} cases; gate on {how}")
    q = quantize_qdq(proto32, slabs)
    del q.metadata_props[:]
    for key, value in info.to_metadata().items():
        q.metadata_props.add(key=key, value=value)
    onnx.save(q, os.fspath(out))
    gate = run_gate(onnx32, out, gate_cases, spec, thresholds)
    log(f"int8 gate of {out.name} (DSC drop <= {thresholds.max_dsc_drop:g}, voxel agreement "
        f">= {100 * thresholds.min_agreement:g}% vs fp32, held-out cases)")
    log(format_gate(gate))
    check_gate(gate, out.name)
    facts = {"policy": DEFAULT_POLICY.to_dict(),
             "calibration": {**stats, "data": str(calibration)},
             "gate": {**gate, "cases_from": how, "cases": [c.case_id for c in gate_cases]}}
    summary = {"policy": DEFAULT_POLICY.to_dict(), "gate": gate}
    q.metadata_props.add(key=METADATA_KEY, value=json.dumps(summary, sort_keys=True))
    onnx.save(q, os.fspath(out))
    return q, facts


# ------------------------------------------------------------------ bench
def bench_int8_onnx(onnx32: Path, info: ArtifactInfo, out: Path, *, n_slabs: int = 32,
                    seed: int = 0) -> Path:
    """The QDQ model ``dunet-bench`` times for a randomly initialised model.

    Calibrated on synthetic slabs (:func:`synthetic_calibration_slabs`), with
    the export's policy; no gate (a random model has no accuracy to keep).

    Returns:
        ``out``, written.
    """
    slabs = synthetic_calibration_slabs(info.spec, n_slabs, seed=seed)
    q = quantize_qdq(onnx.load(os.fspath(onnx32)), slabs)
    del q.metadata_props[:]
    for key, value in info.to_metadata().items():
        q.metadata_props.add(key=key, value=value)
    onnx.save(q, os.fspath(out))
    return out


def qdq_matmul_onnx(n: int, seed: int = 1) -> bytes:
    """A QDQ ``Y = A @ B`` graph (``n``×``n``, int8 per-tensor symmetric) for the int8 peak.

    Runtimes fuse it into one integer GEMM (ONNX Runtime ``MatMulIntegerToFloat`` /
    ``QLinearMatMul``, OpenVINO an i8 ``FullyConnected``): 2·n³ int8 operations per run.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    b = rng.integers(-127, 128, (n, n), dtype=np.int8)
    inits = [
        numpy_helper.from_array(b, "B_q"),
        numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0.01, np.float32), "b_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["A", "a_scale", "zp"], ["A_q"]),
        helper.make_node("DequantizeLinear", ["A_q", "a_scale", "zp"], ["A_dq"]),
        helper.make_node("DequantizeLinear", ["B_q", "b_scale", "zp"], ["B_dq"]),
        helper.make_node("MatMul", ["A_dq", "B_dq"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq_matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
