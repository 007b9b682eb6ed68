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

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from dunet_deploy.artifacts import INPUT_NAME, ArtifactInfo
from dunet_deploy.data.layouts import Case, discover_cases, load_case
from dunet_deploy.data.preprocess import mask_to_labels, slices_to_slabs
from dunet_deploy.errors import DunetError, one_line
from dunet_deploy.spec import InferenceDefaults, PreprocessSpec

if TYPE_CHECKING:
    from dunet_deploy.runtime.core import NetworkInput

__all__ = [
    "DEFAULT_CALIBRATION_SLABS",
    "DEFAULT_POLICY",
    "GateThresholds",
    "Int8Data",
    "Int8Policy",
    "SensitivityOptions",
    "calibration_slabs",
    "check_gate",
    "choose_float_layers",
    "cpu_compilers",
    "export_int8",
    "float_convs",
    "format_float_layers",
    "format_gate",
    "layer_sensitivity",
    "prepare_int8",
    "quantize_qdq",
    "quantized_convs",
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
        reduce_range: 7-bit weights (``[-64, 64]``): AVX2 int8 kernels without
            VNNI (ONNX Runtime's and OpenVINO's) sum pairs of u8*s8 products in
            saturating int16, which full-range weights overflow; measured on an
            AMD EPYC Zen 3 it lifts both runtimes' masks (``docs/int8.md``).
    """

    quantized_ops: tuple[str, ...] = ("Conv",)
    keep_float_ops: tuple[str, ...] = ("ReduceMean", "GlobalAveragePool", "MatMul", "Gemm",
                                       "Sigmoid")
    keep_head: bool = True
    lesion_share: float = 0.5
    reduce_range: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON form, with the fixed quantization scheme spelled out."""
        return {
            **asdict(self),
            "quantizer": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "weights": "int8 (7-bit range), per-channel (output channel), symmetric",
            "activations": "int8, per-tensor, symmetric (zero point 0)",
            "calibration_method": "MinMax",
        }


DEFAULT_POLICY = Int8Policy()


@dataclass(frozen=True)
class GateThresholds:
    """The accuracy gate of an int8 export: it looks where the lesions are.

    Attributes:
        max_dsc_drop: largest accepted drop of the mean per-case DSC against
            the truth (fp32 minus int8).
        min_lesion_dsc: smallest accepted DSC between the int8 and the fp32
            mask of one case, for cases where fp32 finds ``min_voxels`` voxels.
        min_agreement: smallest accepted fraction, per case, of the voxels in
            the union of both masks and the truth where the two masks agree
            (cases whose union has ``min_voxels`` voxels): catches int8
            lesions where fp32 finds none.
        min_voxels: the size from which a case is judged by the two rules above.
    """

    max_dsc_drop: float = 0.01
    min_lesion_dsc: float = 0.95
    min_agreement: float = 0.90
    min_voxels: int = 100


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


def _case_network(case: Case, spec: PreprocessSpec) -> tuple[Any, np.ndarray, NetworkInput]:
    """One case on the model's grid, as ``dunet-infer`` sees it.

    Returns:
        ``(image NiftiVolume, truth mask on the image's own grid, NetworkInput)``.

    Raises:
        DunetError: naming the case when it cannot be read or does not fit the spec.
    """
    from dunet_deploy.runtime.core import to_network

    image, truth = load_case(case)
    try:
        net = to_network(image.data, spec, affine=image.affine)
    except DunetError as exc:
        raise DunetError(f"case {case.case_id}: {exc}") from None
    return image, truth, net


def _slab_labels(net: NetworkInput, mask: np.ndarray | None, spec: PreprocessSpec) -> np.ndarray:
    """Which of ``net.indices`` hold lesion, the mask brought onto the model's grid first.

    Returns:
        bool ``[K]`` aligned with ``net.indices``.
    """
    idx = net.indices
    if mask is None or not idx.size:
        return np.zeros(idx.size, dtype=bool)
    on_grid = mask if net.space is None else net.space.mask_to_model(mask)
    return mask_to_labels(on_grid, spec)[idx].reshape(idx.size, -1).any(axis=1)


def _pick_slabs(
    net: NetworkInput, lesion_flags: np.ndarray, spec: PreprocessSpec, quota: int,
    lesion_share: float, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``quota`` of the slabs the core would run, lesion slabs first up to their share.

    Returns:
        ``(float32 [k, C, S, S], bool [k] lesion-bearing)``.
    """
    idx = net.indices
    lesion, other = idx[lesion_flags], idx[~lesion_flags]
    n_les = min(lesion.size, math.ceil(quota * lesion_share))
    n_other = min(other.size, quota - n_les)
    n_les = min(lesion.size, quota - n_other)  # a lesion-rich case fills the rest
    chosen = np.sort(np.concatenate([
        rng.choice(lesion, n_les, replace=False), rng.choice(other, n_other, replace=False)
    ])).astype(np.int64)
    if net.slices is None or not chosen.size:
        s = spec.image_size
        return np.zeros((0, spec.in_channels, s, s), np.float32), np.zeros(0, bool)
    slabs = slices_to_slabs(net.slices, spec, chosen)
    return slabs.astype(np.float32, copy=False), np.isin(chosen, lesion)


def _gather(
    volumes: Iterator[tuple[NetworkInput, np.ndarray]], n_volumes: int,
    spec: PreprocessSpec, n_slabs: int, lesion_share: float, seed: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The calibration set: ``(float32 [K, C, S, S], bool [K] lesion-bearing, stats)``."""
    rng = np.random.default_rng(seed)
    quota = max(1, math.ceil(n_slabs / max(1, n_volumes)))
    parts, flags = [], []
    for net, labels in volumes:
        slabs, is_lesion = _pick_slabs(net, labels, spec, quota, lesion_share, rng)
        parts.append(slabs)
        flags.append(is_lesion)
    s, c = spec.image_size, spec.in_channels
    out = np.concatenate(parts)[:n_slabs] if parts else np.zeros((0, c, s, s), np.float32)
    lesion = np.concatenate(flags)[:n_slabs] if flags else np.zeros(0, bool)
    if out.shape[0] == 0:
        raise DunetError("calibration: the data has no non-empty slab")
    stats = {"slabs": int(out.shape[0]), "lesion_slabs": int(lesion.sum()),
             "volumes": n_volumes, "seed": seed}
    return np.ascontiguousarray(out), lesion, stats


def calibration_slabs(
    cases: Sequence[Case],
    spec: PreprocessSpec,
    n_slabs: int = DEFAULT_CALIBRATION_SLABS,
    *,
    lesion_share: float = DEFAULT_POLICY.lesion_share,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Calibration slabs of a dataset, made by the inference core.

    Each case goes through :func:`~dunet_deploy.runtime.core.to_network` with
    its affine (the reorientation or resampling ``dunet-infer`` applies), and
    contributes an equal quota of the slabs the core would run, lesion slabs
    (its mask brought onto the same grid) first up to ``lesion_share`` of the
    quota. One case is read at a time.

    Returns:
        ``(float32 [K, C, S, S], bool [K] lesion-bearing, stats)``,
        ``K <= n_slabs``; stats count slabs, lesion slabs and cases.

    Raises:
        DunetError: for unreadable cases or data without any non-empty slab.
    """
    def volumes() -> Iterator[tuple[NetworkInput, np.ndarray]]:
        for case in cases:
            _, truth, net = _case_network(case, spec)
            yield net, _slab_labels(net, truth, spec)

    slabs, lesion, stats = _gather(volumes(), len(cases), spec, n_slabs, lesion_share, seed)
    stats["cases"] = [c.case_id for c in cases]
    return slabs, lesion, stats


def synthetic_calibration_slabs(
    spec: PreprocessSpec, n_slabs: int = 64, *, seed: int = 0, volumes: int = 4
) -> np.ndarray:
    """Calibration slabs of synthetic ATLAS-like volumes (``dunet-bench``'s random models).

    Returns:
        float32 ``[K, C, S, S]``, ``K <= n_slabs``.
    """
    from dunet_deploy.data.synth import synthesize_case
    from dunet_deploy.runtime.core import to_network

    syn = spec
    if spec.intensity == "dataset_minmax_zscore":  # dataset statistics belong to real scans
        syn = spec.replace(intensity="robust_zscore")

    def gen() -> Iterator[tuple[NetworkInput, np.ndarray]]:
        for k in range(volumes):
            image, mask = synthesize_case(spec.volume_shape, seed=seed + k)
            net = to_network(image, syn)  # already on the model's grid
            yield net, _slab_labels(net, mask, syn)

    slabs, _, _ = _gather(gen(), volumes, syn, n_slabs, DEFAULT_POLICY.lesion_share, seed)
    return slabs


# ---------------------------------------------------------- quantization
class _DropPreprocessAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _no_preprocess_advice() -> Iterator[None]:
    """Silence ``quantize_static``'s "consider pre-processing" warning, and only it.

    Its pre-processing (symbolic shape inference, ONNX Runtime's basic graph
    optimisations) was measured on this export: the exported graph already
    has BatchNorm folded and static shapes, and the quantized model's masks
    are identical with and without it (``docs/int8.md``).
    """
    root = logging.getLogger()
    flt = _DropPreprocessAdvice()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


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

    with tempfile.TemporaryDirectory(prefix="dunet-int8-") as tmp, _no_preprocess_advice():
        out = Path(tmp) / "model_int8.onnx"
        src = onnx.ModelProto()
        src.CopyFrom(model)  # quantize_static saves its input with external data, in place
        quantize_static(
            src, out, _Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(policy.quantized_ops),
            nodes_to_exclude=_float_nodes(model.graph, policy),
            per_channel=True,
            reduce_range=policy.reduce_range,
            activation_type=QuantType.QInt8,  # TensorRT takes only signed int8 Q/DQ
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        q = onnx.load(str(out))
    onnx.checker.check_model(q)
    return q


# ------------------------------------------------- per-layer sensitivity
def quantized_convs(model: onnx.ModelProto) -> list[str]:
    """Names of the ``Conv`` nodes whose weight comes through a ``DequantizeLinear``, in order."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dq]


def float_convs(qmodel: onnx.ModelProto, model32: onnx.ModelProto,
                names: Sequence[str]) -> onnx.ModelProto:
    """A copy of the QDQ model in which the convolutions ``names`` compute in float.

    Each named ``Conv`` takes its float input (the tensor its input
    ``QuantizeLinear`` reads) and its fp32 weight from ``model32``; Q/DQ nodes
    no longer used by anything are removed. The ranges of every other layer
    stay those calibrated for the whole model.

    Args:
        qmodel: The QDQ model (from :func:`quantize_qdq`).
        model32: The fp32 model it was quantized from (same node names).
        names: ``Conv`` node names to keep in float.

    Returns:
        The new model (``qmodel`` is not modified).
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(qmodel)
    g = out.graph
    producer = {o: n for n in g.node for o in n.output}
    inits32 = {t.name: t for t in model32.graph.initializer}
    convs32 = {n.name: n for n in model32.graph.node if n.op_type == "Conv"}
    for node in g.node:
        if node.name not in names or node.op_type != "Conv":
            continue
        dq = producer.get(node.input[0])
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[0] = q.input[0]
        w32 = inits32[convs32[node.name].input[1]]
        name = f"{node.name}.weight_float"
        g.initializer.append(numpy_helper.from_array(numpy_helper.to_array(w32), name))
        node.input[1] = name
    _drop_dead_nodes(g)
    return out


def _drop_dead_nodes(g: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)


Predict = Callable[[np.ndarray], np.ndarray]
#: ``make(model) -> predict``: one CPU runtime compiling an in-memory model.
Compile = Callable[[onnx.ModelProto], Predict]


def _ort_compile(model: onnx.ModelProto) -> Predict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: np.asarray(sess.run(None, {INPUT_NAME: x})[0])


def _openvino_compile(model: onnx.ModelProto) -> Predict:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: np.asarray(compiled(x)[0])


def cpu_compilers(backends: Sequence[str] | None = None) -> dict[str, Compile]:
    """The installed CPU runtimes (ONNX Runtime, OpenVINO f32 elsewhere) as model compilers."""
    from dunet_deploy.runtime.base import is_installed

    known: dict[str, Compile] = {"onnxruntime": _ort_compile, "openvino": _openvino_compile}
    return {b: known[b] for b in (backends or known) if b in known and is_installed(b)}


def _masks(predict: Predict, slabs: np.ndarray, threshold: float, batch_size: int) -> np.ndarray:
    out = [predict(slabs[i:i + batch_size]) for i in range(0, len(slabs), batch_size)]
    return np.concatenate(out) >= threshold


class _Probe:
    """fp32 masks of the probe slabs on each runtime, and a variant's worst DSC against them."""

    def __init__(self, model32: onnx.ModelProto, slabs: np.ndarray, threshold: float,
                 compilers: dict[str, Compile], batch_size: int) -> None:
        self.slabs, self.threshold, self.batch = slabs, threshold, batch_size
        self.compilers = compilers
        self.ref = {b: self._masks(make, model32) for b, make in compilers.items()}

    def _masks(self, make: Compile, model: onnx.ModelProto) -> np.ndarray:
        return _masks(make(model), self.slabs, self.threshold, self.batch)

    def score(self, model: onnx.ModelProto) -> dict[str, float]:
        """Masks' DSC vs fp32 of the same runtime, per runtime."""
        return {b: _dsc(self.ref[b], self._masks(make, model))
                for b, make in self.compilers.items()}


def layer_sensitivity(
    qmodel: onnx.ModelProto, model32: onnx.ModelProto, slabs: np.ndarray, threshold: float,
    *, compilers: dict[str, Compile] | None = None, batch_size: int = 8,
) -> list[dict[str, Any]]:
    """How much each convolution, quantized alone, moves the lesion masks.

    For each quantized ``Conv``, a model with only that layer int8 (ranges of
    the whole-model calibration) runs on ``slabs`` through every installed CPU
    runtime; its masks are compared with fp32's on the same runtime (int8
    kernels differ by runtime and CPU: OpenVINO's on an AVX2-only CPU lose
    more than ONNX Runtime's, see ``docs/int8.md``).

    Args:
        qmodel: The QDQ model.
        model32: The fp32 model.
        slabs: float32 ``[K, C, S, S]`` slabs where lesions are.
        threshold: The mask threshold.
        compilers: Runtimes to measure on (default :func:`cpu_compilers`).
        batch_size: Slabs per run.

    Returns:
        One entry per layer, most sensitive first: ``layer``, ``dsc_vs_fp32``
        (the worst runtime's), ``per_backend``.
    """
    probe = _Probe(model32, slabs, threshold, compilers or cpu_compilers(), batch_size)
    layers = quantized_convs(qmodel)
    rows = []
    for name in layers:
        per = probe.score(float_convs(qmodel, model32, [n for n in layers if n != name]))
        rows.append({"layer": name, "dsc_vs_fp32": min(per.values()), "per_backend": per})
    return sorted(rows, key=lambda r: r["dsc_vs_fp32"])


def choose_float_layers(
    qmodel: onnx.ModelProto, model32: onnx.ModelProto, slabs: np.ndarray, threshold: float,
    sensitivity: list[dict[str, Any]], *, max_layers: int = 3, target_dsc: float = 0.99,
    compilers: dict[str, Compile] | None = None, batch_size: int = 8,
) -> tuple[list[dict[str, Any]], dict[str, float], dict[str, float]]:
    """Keep the most sensitive convolutions in float while it measurably helps.

    Greedy, in order of :func:`layer_sensitivity`: a layer is kept in float
    when the whole model with it (and those kept before) in float agrees
    better with fp32 on ``slabs`` on the worst runtime; it stops at
    ``max_layers`` or once every runtime's masks reach ``target_dsc``.

    Returns:
        ``(kept, before, after)``: the kept layers (each with its sensitivity
        figures and why it was kept), and the whole model's DSC vs fp32 per
        runtime before and after.
    """
    probe = _Probe(model32, slabs, threshold, compilers or cpu_compilers(), batch_size)
    start = best = probe.score(qmodel)
    kept: list[dict[str, Any]] = []
    for row in sensitivity:
        if len(kept) >= max_layers or min(best.values()) >= target_dsc:
            break
        if row["dsc_vs_fp32"] >= 1.0:
            break  # the rest change no mask pixel alone
        trial = probe.score(float_convs(qmodel, model32,
                                        [k["layer"] for k in kept] + [row["layer"]]))
        if min(trial.values()) > min(best.values()):
            best = trial
            worst = min(row["per_backend"], key=row["per_backend"].get)
            kept.append({**row, "model_dsc_vs_fp32": trial,
                         "why": (f"int8 alone it moves the lesion masks to DSC "
                                 f"{row['dsc_vs_fp32']:.4f} vs fp32 ({worst}); kept float, the "
                                 f"model's worst runtime reaches {min(trial.values()):.4f}")})
    return kept, start, best


# ------------------------------------------------------------------ gate
def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def _case_row(case_id: str, m32: np.ndarray, m8: np.ndarray, truth: np.ndarray,
              head: np.ndarray) -> dict[str, Any]:
    """The figures of one case: masks vs each other, on the lesion region, and vs the truth."""
    region = m32 | m8 | truth
    n_region = int(np.count_nonzero(region))
    agree = int(np.count_nonzero((m32 == m8) & region))
    return {
        "case": case_id,
        "fp32_voxels": int(np.count_nonzero(m32)),
        "int8_voxels": int(np.count_nonzero(m8)),
        "region_voxels": n_region,
        "dsc_vs_fp32": _dsc(m32, m8),
        "region_agreement": 1.0 if n_region == 0 else agree / n_region,
        "dsc_fp32": _dsc(m32, truth),
        "dsc_int8": _dsc(m8, truth),
        "head_disagreement": int(np.count_nonzero((m32 != m8) & head)),
        "head_voxels": int(np.count_nonzero(head)),
    }


def _below(cases: list[dict[str, Any]], size: str, value: str, floor: float,
           min_voxels: int) -> list[dict[str, Any]]:
    """Cases with ``size`` >= ``min_voxels`` whose ``value`` is under ``floor``, worst first."""
    judged = [c for c in cases if c[size] >= min_voxels and c[value] < floor]
    return sorted(judged, key=lambda c: c[value])


def _failures(row: dict[str, Any], t: GateThresholds) -> list[str]:
    """Every criterion one backend's row breaks, worst first within each kind."""
    out = []
    for c in _below(row["per_case"], "fp32_voxels", "dsc_vs_fp32", t.min_lesion_dsc, t.min_voxels):
        out.append(f"case {c['case']}: int8 mask vs fp32 mask DSC {c['dsc_vs_fp32']:.4f} < "
                   f"{t.min_lesion_dsc:g} (fp32 finds {c['fp32_voxels']:,} voxels, int8 "
                   f"{c['int8_voxels']:,})")
    for c in _below(row["per_case"], "region_voxels", "region_agreement", t.min_agreement,
                    t.min_voxels):
        out.append(f"case {c['case']}: int8 and fp32 masks agree on "
                   f"{100 * c['region_agreement']:.2f}% < {100 * t.min_agreement:g}% of the "
                   f"{c['region_voxels']:,} voxels of both masks and the truth")
    if row["dsc_drop"] > t.max_dsc_drop:
        out.append(f"mean DSC vs truth drops {row['dsc_drop']:+.4f} > {t.max_dsc_drop:g} (fp32 "
                   f"{row['dsc_fp32']:.4f}, int8 {row['dsc_int8']:.4f})")
    return out


def _summarise_backend(backend: str, executed: str, cases: list[dict[str, Any]],
                       t: GateThresholds) -> dict[str, Any]:
    d32 = float(np.mean([c["dsc_fp32"] for c in cases]))
    d8 = float(np.mean([c["dsc_int8"] for c in cases]))
    judged = [c["dsc_vs_fp32"] for c in cases if c["fp32_voxels"] >= t.min_voxels]
    regional = [c["region_agreement"] for c in cases if c["region_voxels"] >= t.min_voxels]
    head = sum(c["head_voxels"] for c in cases)
    row: dict[str, Any] = {
        "backend": backend,
        "executed_precision": executed,
        "cases": len(cases),
        "dsc_fp32": d32,
        "dsc_int8": d8,
        "dsc_drop": d32 - d8,
        "min_dsc_vs_fp32": min(judged) if judged else None,
        "cases_judged": len(judged),
        "min_region_agreement": min(regional) if regional else None,
        # Whole-volume agreement: reported, not gated (background hides lesion errors).
        "voxel_agreement": 1.0 - sum(c["head_disagreement"] for c in cases) / max(1, head),
        "per_case": cases,
    }
    row["failures"] = _failures(row, t)
    row["passed"] = not row["failures"]
    return row


def run_gate(
    onnx32: Path, onnx8: Path, cases: Sequence[Case], spec: PreprocessSpec,
    thresholds: GateThresholds = GateThresholds(),
    *,
    inference: InferenceDefaults | None = None,
    backends: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Compare int8 with fp32 on held-out cases through every installed CPU runtime.

    Each case goes through the inference core as ``dunet-infer`` runs it
    (:func:`~dunet_deploy.runtime.core.to_network` with the volume's affine,
    the model's TTA and smallest-lesion defaults, masks on the input's own
    grid); int8 is compared with fp32 of the same runtime (OpenVINO fp32 with
    the ``f32`` hint), per case: the two masks' DSC where fp32 finds at least
    ``thresholds.min_voxels`` voxels, their agreement on the union of both
    masks and the truth, and the mean DSC against the truth.

    Args:
        onnx32: The fp32 ONNX (reference).
        onnx8: The QDQ ONNX.
        cases: Held-out cases (image + lesion mask).
        spec: The model's preprocessing spec.
        thresholds: The criteria.
        inference: The model's shipped TTA / min-lesion defaults (none: off).
        backends: Runtimes to run (default: every installed CPU runtime).
        batch_size: Slabs per call.

    Returns:
        JSON-able ``{"thresholds", "cpu", "rows": [per backend: figures,
        per_case, failures, passed], "passed"}``.

    Raises:
        DunetError: for unreadable cases, or when no CPU runtime is installed.
    """
    from dunet_deploy.machine import cpu_features
    from dunet_deploy.postprocess import with_tta
    from dunet_deploy.runtime.base import is_installed, open_runner
    from dunet_deploy.runtime.core import finish_prediction, geometry_of, predict_grid

    names = [b for b in (backends or ("onnxruntime", "openvino")) if is_installed(b)]
    if not names:
        raise DunetError(f"int8 gate: no CPU runtime (onnxruntime, openvino) installed to check "
                         f"{onnx8.name}")
    defaults = inference or InferenceDefaults()
    runners: list[tuple[str, Any, Any]] = []
    try:
        for b in names:
            runners.append((b, open_runner(onnx32, b, precision="fp32" if b == "openvino"
                                           else "auto"), open_runner(onnx8, b)))
        per_case: dict[str, list[dict[str, Any]]] = {b: [] for b in names}
        for case in cases:
            image, truth, net = _case_network(case, spec)
            geometry, truth_mask = geometry_of(image), np.asarray(truth) > 0
            head = np.asarray(image.data) != 0

            def mask(runner: Any, net: NetworkInput = net, geometry: Any = geometry) -> np.ndarray:
                grid = predict_grid(net, spec, with_tta(runner.infer, defaults.tta, spec),
                                    batch_size=batch_size)
                pred = finish_prediction(grid, net, geometry, spec, keep_prob=False,
                                         min_lesion_mm3=defaults.min_lesion_mm3)
                return np.asarray(pred.mask) > 0

            for b, r32, r8 in runners:
                per_case[b].append(_case_row(case.case_id, mask(r32), mask(r8), truth_mask, head))
        rows = [_summarise_backend(b, r8.precision, per_case[b], thresholds)
                for b, _, r8 in runners]
    finally:
        for _, r32, r8 in runners:
            r32.close()
            r8.close()
    feats = cpu_features()
    return {"thresholds": asdict(thresholds), "rows": rows,
            "cpu": {"model": feats["model"], "family": feats["family"],
                    "model_id": feats["model_id"], "flags": feats["flags"]},
            "passed": all(r["passed"] for r in rows)}


def format_gate(gate: dict[str, Any]) -> str:
    """The gate as a fixed-width table (one line per runtime)."""
    head = (f"{'backend':<12} {'runs':<6} {'cases':>5} {'DSC fp32':>9} {'DSC int8':>9} "
            f"{'drop':>8} {'min DSC vs fp32':>15} {'min lesion agree':>16}  ok")
    lines = [head, "-" * len(head)]

    def opt(v: float | None, pct: bool = False) -> str:
        return "n/a" if v is None else (f"{100 * v:.2f}%" if pct else f"{v:.4f}")

    for r in gate["rows"]:
        lines.append(
            f"{r['backend']:<12} {r['executed_precision']:<6} {r['cases']:>5} "
            f"{r['dsc_fp32']:>9.4f} {r['dsc_int8']:>9.4f} {r['dsc_drop']:>+8.4f} "
            f"{opt(r['min_dsc_vs_fp32']):>15} {opt(r['min_region_agreement'], True):>16}  "
            f"{'yes' if r['passed'] else 'NO'}"
        )
    return "\n".join(lines)


def check_gate(gate: dict[str, Any], name: str = "model_int8.onnx") -> None:
    """Raise, leading with the criterion that failed, when the gate refused the model.

    Raises:
        DunetError: naming the first failing runtime and its first failed criterion.
    """
    if gate["passed"]:
        return
    bad = next(r for r in gate["rows"] if not r["passed"])
    more = len(bad["failures"]) - 1
    also = f" (+{more} more failed check{'s' if more > 1 else ''})" if more > 0 else ""
    raise DunetError(
        f"int8 gate refused {name} ({bad['backend']}): {bad['failures'][0]}{also}; "
        f"{bad['cases']} held-out case(s); nothing written"
    )


# ---------------------------------------------------------------- export
@dataclass
class Int8Data:
    """Calibration and gate data of an int8 export, checked before any export work.

    Attributes:
        calibration: the calibration cases.
        gate: the held-out cases of the gate.
        gate_from: where the held-out cases came from (for the report).
        slabs: float32 ``[K, C, S, S]`` calibration slabs (inference core geometry).
        lesion: bool ``[K]``, which slabs hold lesion.
        stats: slab and case counts.
    """

    calibration: list[Case]
    gate: list[Case]
    gate_from: str
    slabs: np.ndarray
    lesion: np.ndarray
    stats: dict[str, Any]


def prepare_int8(
    doc: dict[str, Any],
    spec: PreprocessSpec,
    calibration: Path,
    gate_data: Path | None = None,
    *,
    n_slabs: int = DEFAULT_CALIBRATION_SLABS,
    max_cases: int | None = None,
    seed: int = 0,
) -> Int8Data:
    """Resolve and read the int8 data: run before the ONNX export, so bad data fails fast.

    Every held-out case is brought onto the model's grid once here (a case the
    core cannot take is refused now, not after the export); the calibration
    slabs are made.

    Raises:
        DunetError: naming the folder or case at fault.
    """
    calib, gate_cases, how = resolve_cases(doc, calibration, gate_data, max_cases=max_cases,
                                           seed=seed)
    for case in gate_cases:
        _case_network(case, spec)
    slabs, lesion, stats = calibration_slabs(calib, spec, n_slabs, seed=seed)
    return Int8Data(calib, gate_cases, how, slabs, lesion, {**stats, "data": str(calibration)})


@dataclass(frozen=True)
class SensitivityOptions:
    """How the layers kept in float are chosen (:func:`choose_float_layers`).

    Attributes:
        slabs: most lesion slabs of the calibration set measured per layer
            (0 turns the search off).
        max_layers: most convolutions kept in float.
        target_dsc: stop once the masks' DSC vs fp32 on those slabs reaches this.
    """

    slabs: int = 32
    max_layers: int = 3
    target_dsc: float = 0.99


def _sensitivity_slabs(data: Int8Data, n: int) -> np.ndarray:
    pick = data.slabs[data.lesion] if data.lesion.any() else data.slabs
    return np.ascontiguousarray(pick[:n])


def export_int8(
    proto32: onnx.ModelProto,
    onnx32: Path,
    out: Path,
    info: ArtifactInfo,
    data: Int8Data,
    *,
    thresholds: GateThresholds = GateThresholds(),
    sensitivity: SensitivityOptions = SensitivityOptions(),
    log: Log = print,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Quantize, keep the most sensitive layers float, gate; write the QDQ model to ``out``.

    Args:
        proto32: the fp32 export.
        onnx32: that model on disk (the gate's reference).
        out: where the int8 model is written (the caller commits or deletes it).
        info: the int8 model's self-description (``precision="int8"``).
        data: from :func:`prepare_int8`.
        thresholds: the gate.
        sensitivity: the per-layer search.
        log: receives progress, the layers kept in float and the gate table.

    Returns:
        ``(int8 model, facts)``; facts (policy, float layers, calibration,
        gate) go into ``model_int8.json`` and the ``dunet.int8`` metadata.

    Raises:
        DunetError: for a missing quantizer or a refused gate.
    """
    import json

    spec = info.spec
    stats = data.stats
    log(f"int8: calibrating on {stats['slabs']} slabs ({stats['lesion_slabs']} with lesion) "
        f"of {len(data.calibration)} cases; gate on {data.gate_from}")
    q = quantize_qdq(proto32, data.slabs)
    float_layers: dict[str, Any] = {"searched": False, "kept": []}
    if sensitivity.slabs > 0:
        probe = _sensitivity_slabs(data, sensitivity.slabs)
        ranking = layer_sensitivity(q, proto32, probe, spec.threshold)
        kept, before, after = choose_float_layers(
            q, proto32, probe, spec.threshold, ranking, max_layers=sensitivity.max_layers,
            target_dsc=sensitivity.target_dsc)
        if kept:
            q = float_convs(q, proto32, [k["layer"] for k in kept])
        float_layers = {**asdict(sensitivity), "searched": True, "slabs": len(probe),
                        "dsc_vs_fp32_all_int8": before, "dsc_vs_fp32": after, "kept": kept,
                        "ranking": ranking}
    log(format_float_layers(float_layers))
    del q.metadata_props[:]
    for key, value in info.to_metadata().items():
        q.metadata_props.add(key=key, value=value)
    onnx.save(q, os.fspath(out))
    gate = run_gate(onnx32, out, data.gate, spec, thresholds, inference=info.inference)
    log(f"int8 gate of {out.name} on {gate['cpu']['model']} (per case: int8 vs fp32 mask DSC "
        f">= {thresholds.min_lesion_dsc:g} where fp32 finds >= {thresholds.min_voxels} voxels, "
        f"agreement >= {100 * thresholds.min_agreement:g}% on both masks + truth; mean DSC drop "
        f"<= {thresholds.max_dsc_drop:g})")
    log(format_gate(gate))
    check_gate(gate, out.name)
    kept_names = [k["layer"] for k in float_layers["kept"]]
    facts = {"policy": DEFAULT_POLICY.to_dict(), "float_layers": float_layers,
             "calibration": stats,
             "gate": {**gate, "cases_from": data.gate_from,
                      "cases": [c.case_id for c in data.gate]}}
    summary = {"policy": DEFAULT_POLICY.to_dict(), "gate": gate,
               "float_layers": {"kept": kept_names,
                                "why": {k["layer"]: k["why"] for k in float_layers["kept"]}}}
    q.metadata_props.add(key=METADATA_KEY, value=json.dumps(summary, sort_keys=True))
    onnx.save(q, os.fspath(out))
    return q, facts


def format_float_layers(float_layers: dict[str, Any]) -> str:
    """What the per-layer search kept in float, and why (one line per layer)."""
    if not float_layers.get("searched"):
        return "int8: per-layer sensitivity search off; only the policy's float parts stay float"
    kept = float_layers["kept"]
    def fmt(per: dict[str, float]) -> str:
        return ", ".join(f"{b} {v:.4f}" for b, v in per.items())

    head = (f"int8: per-layer sensitivity on {float_layers['slabs']} lesion slabs: all "
            f"convolutions int8 give masks at DSC vs fp32 "
            f"{fmt(float_layers['dsc_vs_fp32_all_int8'])}; ")
    if not kept:
        return head + "no convolution kept in float (none improved it)"
    lines = [head + f"kept in float ({len(kept)}), now {fmt(float_layers['dsc_vs_fp32'])}:"]
    lines += [f"  {k['layer']}: {k['why']}" for k in kept]
    return "\n".join(lines)


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
    # 7-bit weights, as the export's (Int8Policy.reduce_range): AVX2 kernels without VNNI
    # sum pairs of u8*s8 products in saturating int16, and full-range weights overflow there.
    b = rng.integers(-63, 64, (n, n), dtype=np.int8)
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
