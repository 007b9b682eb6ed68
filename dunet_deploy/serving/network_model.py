"""``dunet`` with ``backend: "python"``: slabs -> probabilities through our runtime.

Input ``slabs`` ``FP32 [-1, C, S, S]``, output ``prob`` ``FP32 [-1, 1, S, S]``; Triton's
dynamic batcher merges requests, and :meth:`TritonPythonModel.execute` runs them as one
batch on one :class:`~dunet_deploy.runtime.base.Runner` per model instance. Config
parameters (written by :func:`dunet_deploy.export.triton_repo.triton_config_text`):
``runtime.model_file`` (relative to the version folder, or absolute), ``runtime.backend``,
``runtime.precision``, ``runtime.threads`` and the model's ``dunet.*`` metadata, checked
against the model file's own at load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME
from dunet_deploy.errors import DunetError
from dunet_deploy.serving._config import artifact_parameters, int_parameter, model_parameters


def open_network(params: Mapping[str, str], version_dir: Path, source: str) -> Any:
    """Open the runner a network model's parameters describe, checked against them.

    Args:
        params: the model's config parameters.
        version_dir: the model's version folder (``<model>/1``).
        source: the model's name for messages.

    Returns:
        An open :class:`~dunet_deploy.runtime.base.Runner`.

    Raises:
        DunetError: a missing or mismatched model file, bad parameters.
    """
    from dunet_deploy.runtime.base import open_runner

    declared = artifact_parameters(params, source)
    model_file = Path(params.get("runtime.model_file", "model.onnx"))
    if not model_file.is_absolute():
        model_file = version_dir / model_file
    threads = int_parameter(params, "runtime.threads", source) if params.get(
        "runtime.threads") else None
    runner = open_runner(model_file, params.get("runtime.backend", "auto"), threads=threads,
                         precision=params.get("runtime.precision", "auto"))
    if runner.spec.digest() != declared.spec.digest():
        runner.close()
        raise DunetError(f"{source}: {model_file} has spec digest {runner.spec.digest()}, "
                         f"config.pbtxt declares {declared.spec.digest()}")
    return runner


class TritonPythonModel:
    """Triton's python-backend entry points for the network model."""

    def initialize(self, args: dict[str, Any]) -> None:
        """Open the runner (once per model instance)."""
        name, params, model_dir = model_parameters(args)
        self.runner = open_network(params, model_dir / str(args["model_version"]), name)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run all requests of a dynamic batch as one model call."""
        import triton_python_backend_utils as pb_utils

        slabs = [pb_utils.get_input_tensor_by_name(r, INPUT_NAME).as_numpy() for r in requests]
        try:
            probs = self.runner.infer(np.concatenate(slabs, axis=0))
        except DunetError as exc:  # a bad input shape: fail these requests, keep serving
            error = pb_utils.TritonError(str(exc))
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum([len(s) for s in slabs])[:-1]
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT_NAME, part)])
            for part in np.split(probs, bounds)
        ]

    def finalize(self) -> None:
        """Release the runner."""
        self.runner.close()
