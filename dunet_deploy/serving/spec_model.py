"""``<name>_spec``: returns the network model's description as JSON (``BYTES [1]``).

Input ``request`` ``INT32 [1]`` (ignored), output ``info``: what
:func:`dunet_deploy.runtime.serve.info_document` makes of the ``dunet.*`` config
parameters, so :class:`~dunet_deploy.runtime.triton_client.TritonRunner` can check it
runs the model its user means, plus ``runtime``: what the network model really runs
(:func:`~dunet_deploy.serving.network_model.network_runtime`: backend and precision
resolved, e.g. OpenVINO bf16 under ``precision auto``), so a client records it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dunet_deploy.serving._config import artifact_parameters, model_parameters


class TritonPythonModel:
    """Triton's python-backend entry points for the description model."""

    def initialize(self, args: dict[str, Any]) -> None:
        """Build the document once."""
        from dunet_deploy.runtime.serve import SPEC_OUTPUT, info_document
        from dunet_deploy.serving.network_model import network_runtime

        name, params, model_dir = model_parameters(args)
        self.output = SPEC_OUTPUT
        doc = info_document(artifact_parameters(params, name))
        # <name>_spec describes <name>, its neighbour in the repository.
        network = model_dir.parent / name.removesuffix("_spec")
        doc["runtime"] = network_runtime(network, name)
        self.doc = json.dumps(doc).encode()

    def execute(self, requests: list[Any]) -> list[Any]:
        """The same document for every request."""
        import triton_python_backend_utils as pb_utils

        tensor = pb_utils.Tensor(self.output, np.array([self.doc], dtype=np.object_))
        return [pb_utils.InferenceResponse(output_tensors=[tensor]) for _ in requests]
