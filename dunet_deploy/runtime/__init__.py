"""The lean, torch-free runtime: run exported models on NIfTI volumes.

* :class:`Segmenter` — a model loaded once for any number of volumes
  (``predict`` a path, a nibabel image or an array; ``predict_files`` does what
  ``dunet-infer`` does);
* :mod:`~dunet_deploy.runtime.core` — the one inference core (volume -> slabs ->
  any ``predict`` callable -> probabilities on the volume's grid), shared by
  every command, training validation, the bench and the Triton models;
* :func:`open_runner` / :class:`Runner` — one interface over ONNX Runtime,
  OpenVINO and TensorRT (backends are imported only when used).

Nothing in this package imports torch (a test checks it).
"""

from dunet_deploy.runtime.base import Runner, backend_for, open_runner
from dunet_deploy.runtime.core import (
    NetworkInput,
    Prediction,
    Predictor,
    predict_grid,
    predict_volume,
    segment,
    to_network,
)
from dunet_deploy.runtime.pipeline import (
    CaseResult,
    Prefetcher,
    expand_inputs,
    prepare_volume,
    run_cases,
    segment_files,
)
from dunet_deploy.runtime.segmenter import Segmenter

__all__ = [
    "CaseResult",
    "NetworkInput",
    "Prediction",
    "Predictor",
    "Prefetcher",
    "Runner",
    "Segmenter",
    "backend_for",
    "expand_inputs",
    "open_runner",
    "predict_grid",
    "predict_volume",
    "prepare_volume",
    "run_cases",
    "segment",
    "segment_files",
    "to_network",
]
