"""The lean, torch-free runtime: run exported models on NIfTI volumes.

* :class:`Segmenter` — a model loaded once for any number of volumes
  (``predict`` a path, a nibabel image or an array; ``predict_files`` does what
  ``dunet-infer`` does);
* :mod:`~dunet_deploy.runtime.core` — the one inference core (volume -> slabs ->
  any ``predict`` callable -> probabilities on the volume's grid), shared by
  every command, training validation, the bench and the Triton models;
* :func:`open_runner` / :class:`Runner` — one interface over ONNX Runtime,
  OpenVINO and TensorRT (backends are imported only when used).

Nothing in this package imports torch (a test checks it). Everything but the
runners is imported on first use: the runners alone need neither nibabel nor
the data package (a GPU image with only numpy, onnx and a backend runs them).
"""

import importlib
from typing import Any

from dunet_deploy.runtime.base import Runner, backend_for, open_runner

# name -> module, imported on first access (PEP 562).
_LAZY = {
    "NetworkInput": "core", "Prediction": "core", "Predictor": "core",
    "predict_grid": "core", "predict_volume": "core", "segment": "core",
    "to_network": "core",
    "CaseResult": "pipeline", "expand_inputs": "pipeline", "prepare_volume": "pipeline",
    "prepare_source": "pipeline", "infer_case": "pipeline", "finish_case": "pipeline",
    "write_case": "pipeline", "NiftiReader": "pipeline", "NiftiWriter": "pipeline",
    "Prefetcher": "inprocess", "run_cases": "inprocess",
    "InferenceOptions": "options",
    "Segmenter": "segmenter", "segment_files": "segmenter",
}

__all__ = ["Runner", "backend_for", "open_runner", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dunet_deploy.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dunet_deploy.runtime.{module}"), name)
