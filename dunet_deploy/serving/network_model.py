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

import re
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


#: Triton platform -> the runtime that runs it (Triton's own backends).
_PLATFORM_RUNTIMES = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_BACKEND_KEY = re.compile(r'^\s*(backend|platform)\s*:\s*"([^"]*)"', re.MULTILINE)


def network_model_file(model_dir: Path, source: str) -> Path:
    """The model file a network model of the repository runs (its template lies beside it).

    A python-backend network names it in ``runtime.model_file`` (absolute, or in
    its version folder); Triton's own backends read ``model.onnx`` / ``model.plan``
    from the newest version folder.

    Args:
        model_dir: the network model's folder (``<repository>/<name>``).
        source: the asking model's name, for messages.

    Raises:
        DunetError: an unreadable configuration or no version folder.
    """
    from dunet_deploy.export.triton_repo import PLATFORMS, read_config

    config = model_dir / "config.pbtxt"
    params, _ = read_config(config)
    found = {m.group(1): m.group(2) for m in _BACKEND_KEY.finditer(config.read_text("utf-8"))}
    versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()),
                      key=lambda p: int(p.name))
    if not versions:
        raise DunetError(f"{source}: network model {model_dir.name!r} has no version folder")
    if found.get("backend") == "python":
        named = Path(params.get("runtime.model_file", "model.onnx"))
        return named if named.is_absolute() else versions[-1] / named
    names = {platform: file for platform, file, _ in PLATFORMS.values()}
    return versions[-1] / names.get(found.get("platform", ""), "model.onnx")


def network_runtime(model_dir: Path, source: str) -> dict[str, str]:
    """What a network model of the repository really runs: backend, precision, device.

    A python-backend network (``runtime.backend`` / ``runtime.precision`` may say
    ``auto``) is resolved by opening the runner its parameters describe, as the
    network model itself does at load, and closing it again: OpenVINO's precision
    under ``auto`` (bf16 or fp32) is only known once the model is compiled on this
    machine. A network on Triton's ONNX Runtime or TensorRT backend runs the
    model's own precision.

    Args:
        model_dir: the network model's folder (``<repository>/<name>``).
        source: the asking model's name, for messages.

    Returns:
        ``{"backend": ..., "precision": ..., "device": ...}``, never ``auto``.

    Raises:
        DunetError: an unreadable configuration or a model that cannot be opened.
    """
    from dunet_deploy.export.triton_repo import read_config

    config = model_dir / "config.pbtxt"
    params, _ = read_config(config)
    text = config.read_text(encoding="utf-8")
    found = {m.group(1): m.group(2) for m in _BACKEND_KEY.finditer(text)}
    if found.get("backend") == "python":
        versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()),
                          key=lambda p: int(p.name))
        if not versions:
            raise DunetError(f"{source}: network model {model_dir.name!r} has no version folder")
        runner = open_network(params, versions[-1], f"{source}: network model {model_dir.name!r}")
        try:
            return {"backend": runner.backend, "precision": runner.precision,
                    "device": runner.device}
        finally:
            runner.close()
    declared = artifact_parameters(params, f"{source}: network model {model_dir.name!r}")
    backend = _PLATFORM_RUNTIMES.get(found.get("platform", ""), found.get("backend", "triton"))
    return {"backend": backend, "precision": declared.precision, "device": "triton"}


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
