"""A Triton Inference Server model repository for an exported model.

Layout (``name`` defaults to ``dunet``)::

    ROOT/NAME/config.pbtxt
    ROOT/NAME/1/model.onnx      platform "onnxruntime_onnx"   (or)
    ROOT/NAME/1/model.plan      platform "tensorrt_plan"

``config.pbtxt`` declares the batch dimension implicitly (``max_batch_size``;
``dims`` exclude it), enables the dynamic batcher, and carries the model's
:meth:`~dunet_deploy.artifacts.ArtifactInfo.to_metadata` as ``parameters`` —
among them ``dunet.spec``, the preprocessing spec as JSON — so a client can
fetch everything it needs from the server's model configuration and parse it
with :meth:`~dunet_deploy.artifacts.ArtifactInfo.from_metadata`.

The text is written directly (no protobuf dependency at export time); the
tests parse it with Triton's own ``ModelConfig`` message.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from dunet_deploy import __version__
from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError

__all__ = ["DEFAULT_MODEL_NAME", "PLATFORMS", "triton_config_text", "write_triton_repo"]

DEFAULT_MODEL_NAME = "dunet"
#: backend -> (Triton platform, file name in the version folder, instance kind)
PLATFORMS: dict[str, tuple[str, str, str]] = {
    "onnx": ("onnxruntime_onnx", "model.onnx", "KIND_AUTO"),  # GPU when the server has one
    "trt": ("tensorrt_plan", "model.plan", "KIND_GPU"),
}


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def triton_config_text(
    info: ArtifactInfo,
    *,
    backend: str,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    instances: int = 1,
    name: str = DEFAULT_MODEL_NAME,
) -> str:
    """The ``config.pbtxt`` of a dunet model.

    Args:
        info: the model's self-description (spec -> tensor dims; metadata ->
            ``parameters``).
        backend: ``"onnx"`` or ``"trt"``.
        max_batch_size: largest batch the server may form (the engine's
            profile maximum for ``trt``).
        preferred_batch_sizes: batch sizes the dynamic batcher aims for.
        max_queue_delay_us: how long the batcher may hold a request.
        instances: model instances per device.
        name: model name (must equal the folder name).

    Returns:
        Protobuf text of a ``inference.ModelConfig``; input ``slabs``
        ``TYPE_FP32 [C, S, S]``, output ``prob`` ``TYPE_FP32 [1, S, S]``.
    """
    if backend not in PLATFORMS:
        raise DunetError(f"unknown Triton backend {backend!r}; use one of {sorted(PLATFORMS)}")
    if max_batch_size < 1:
        raise DunetError(f"Triton max_batch_size must be >= 1, got {max_batch_size}")
    platform, filename, kind = PLATFORMS[backend]
    spec = info.spec
    s = spec.image_size
    preferred = sorted({int(b) for b in preferred_batch_sizes if 1 <= int(b) <= max_batch_size})
    lines = [
        f"# Written by dunet-export {__version__}: {info.model_name} ({info.precision}), "
        f"spec digest {spec.digest()}.",
        f"name: {_quote(name)}",
        f"platform: {_quote(platform)}",
        f"default_model_filename: {_quote(filename)}",
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        "  {",
        f"    name: {_quote(INPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_dims((spec.in_channels, s, s))}",
        "  }",
        "]",
        "output [",
        "  {",
        f"    name: {_quote(OUTPUT_NAME)}",
        "    data_type: TYPE_FP32",
        f"    dims: {_dims((1, s, s))}",
        "  }",
        "]",
        "dynamic_batching {",
    ]
    if preferred:
        lines.append(f"  preferred_batch_size: {_dims(preferred)}")
    lines += [
        f"  max_queue_delay_microseconds: {int(max_queue_delay_us)}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {int(instances)}",
        f"    kind: {kind}",
        "  }",
        "]",
    ]
    for key, value in sorted(info.to_metadata().items()):
        lines += [
            "parameters {",
            f"  key: {_quote(key)}",
            f"  value: {{ string_value: {_quote(value)} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def write_triton_repo(
    root: str | os.PathLike[str],
    model_file: str | os.PathLike[str],
    info: ArtifactInfo,
    *,
    backend: str,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    instances: int = 1,
    name: str = DEFAULT_MODEL_NAME,
) -> Path:
    """Write ``ROOT/NAME/config.pbtxt`` and copy ``model_file`` into ``ROOT/NAME/1/``.

    Args:
        root: the repository folder (created if needed).
        model_file: the ``.onnx`` (``backend="onnx"``) or ``.plan`` (``"trt"``).
        info: see :func:`triton_config_text` (the rest of the arguments too).

    Returns:
        The model folder ``ROOT/NAME``.
    """
    text = triton_config_text(
        info,
        backend=backend,
        max_batch_size=max_batch_size,
        preferred_batch_sizes=preferred_batch_sizes,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
        name=name,
    )
    model_dir = Path(root) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, version_dir / PLATFORMS[backend][1])
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return model_dir
