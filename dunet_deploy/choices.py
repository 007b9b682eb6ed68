"""The choices every command and the bench offer, in one place.

Each CLI builds its ``click.Choice`` from these tuples and each library
function validates against them, so a new backend or precision is added once.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BACKENDS",
    "BENCH_BACKENDS",
    "BENCH_PRECISIONS",
    "DEVICES",
    "LAYOUTS",
    "PRECISIONS",
    "PROB_DTYPES",
    "RAY_LAYOUTS",
    "REGISTER_MODES",
    "RESAMPLE_MODES",
    "SPLITS",
    "TRAIN_DEVICES",
    "TTA_MODES",
    "check_choice",
]

#: Runtime backends (besides ``"auto"``): what ``dunet-infer``/``dunet-eval``/``dunet-serve`` run.
BACKENDS: tuple[str, ...] = ("onnxruntime", "openvino", "tensorrt")
#: Precision requests: ``auto`` = the backend's best for this model and machine.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")
#: Runtime device requests: ``cuda`` / ``tensorrt`` select ONNX Runtime execution providers.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "tensorrt")
#: Where PyTorch trains and evaluates checkpoints.
TRAIN_DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Dataset layouts (see :mod:`dunet_deploy.data.layouts`).
LAYOUTS: tuple[str, ...] = ("atlas-r1.1", "atlas-v2", "pairs")
#: Where ``dunet-infer --ray`` runs the stages: ``auto`` (``split`` when the actors hold GPUs,
#: else ``fused``), ``split`` (read/write tasks around the model actors), ``fused`` (each
#: actor runs whole cases).
RAY_LAYOUTS: tuple[str, ...] = ("auto", "split", "fused")
#: Which cases of a checkpoint's dataset to evaluate.
SPLITS: tuple[str, ...] = ("all", "train", "val")
#: Backends ``dunet-bench`` knows, in report order.
BENCH_BACKENDS: tuple[str, ...] = ("torch", "torch-cudagraphs", "torch-compile", "onnxruntime",
                                   "openvino", "tensorrt")
#: Precisions ``dunet-bench`` measures.
BENCH_PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
#: Test-time augmentation: ``flip`` averages the network's output on the slab and on its
#: left-right mirror.
TTA_MODES: tuple[str, ...] = ("none", "flip")
#: How inputs off the training grid are handled: ``auto`` resamples them, ``never`` refuses.
RESAMPLE_MODES: tuple[str, ...] = ("auto", "never")
#: On-disk type of probability maps: float32, or uint16 (p * 65535 with scl_slope; NIfTI has
#: no float16).
PROB_DTYPES: tuple[str, ...] = ("float32", "uint16")
#: Registration to the model's template: ``auto`` registers scans that do not look
#: registered, ``always`` every scan, ``never`` none (a warning when one does not look so).
REGISTER_MODES: tuple[str, ...] = ("auto", "always", "never")


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` when it is one of ``choices``, else raise one line naming ``name``.

    The one phrasing for a bad choice: ``precision 'x': choose one of auto, fp32, ...``.
    ``name`` is the parameter's name (not a command-line flag); the error's
    ``option`` attribute carries it so a command can print its ``--flag`` instead.

    Raises:
        DunetError: when ``value`` is not in ``choices``.
    """
    if value not in choices:
        from dunet_deploy.errors import DunetError

        raise DunetError(f"{name} {value!r}: choose one of {', '.join(choices)}", option=name)
    return str(value)
