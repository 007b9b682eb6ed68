"""The lean, torch-free runtime: run exported models on NIfTI volumes.

* :func:`open_runner` / :class:`Runner` — one interface over ONNX Runtime,
  OpenVINO and TensorRT (backends are imported only when used);
* :func:`segment_files` — what ``dunet-infer`` does: read, preprocess, infer,
  post-process and write masks plus ``summary.json``, with reading and
  preprocessing of the next volume overlapped with inference of the current.

Nothing in this package imports torch (a test checks it). The pipeline names
are imported on first use: the runners alone need neither nibabel nor the data
package (a GPU image with only numpy, onnx and a backend can run them).
"""

import importlib
from typing import Any

from dunet_deploy.runtime.base import (
    BACKENDS,
    DEVICES,
    PRECISIONS,
    Runner,
    backend_for,
    open_runner,
)

_PIPELINE = ("CaseResult", "Prefetcher", "expand_inputs", "predict_probs", "prepare_volume",
             "run_cases", "segment_files")

__all__ = [
    "BACKENDS",
    "DEVICES",
    "PRECISIONS",
    "CaseResult",
    "Prefetcher",
    "Runner",
    "backend_for",
    "expand_inputs",
    "open_runner",
    "predict_probs",
    "prepare_volume",
    "run_cases",
    "segment_files",
]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        return getattr(importlib.import_module("dunet_deploy.runtime.pipeline"), name)
    raise AttributeError(f"module 'dunet_deploy.runtime' has no attribute {name!r}")
