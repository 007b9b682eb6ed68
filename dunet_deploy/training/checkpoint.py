"""Checkpoints: one self-describing file per training state, loaded safely.

A checkpoint is a ``torch.save`` of a plain dict (loadable with
``weights_only=True``, so a pickle with a payload is refused)::

    format          "dunet-deploy-checkpoint"
    format_version  1
    model_name      registry name
    model_args      registry arguments (JSON-able)
    state_dict      model weights (no DDP "module." prefix)
    spec            PreprocessSpec.to_dict()
    config          full training configuration (JSON-able dict)
    epoch           last completed epoch (1-based)
    metrics         validation metrics of that epoch (may be {})
    best_metrics    best validation metrics so far (may be {})
    optimizer       optimizer.state_dict() or None
    scaler          GradScaler.state_dict() or None
    rng             RNG states (torch CPU/CUDA as tensors, numpy/python as lists)
    versions        package/torch versions that wrote it
    template        optional: the registration template (shape, data tensor, affine,
                    similarity_range; see dunet_deploy.data.registration.Template)
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dunet_deploy import __version__
from dunet_deploy.artifacts import atomic_write_bytes
from dunet_deploy.errors import DunetError, first_line
from dunet_deploy.filetypes import CHECKPOINT, check_kind
from dunet_deploy.models import create_model, list_models
from dunet_deploy.spec import PreprocessSpec

FORMAT = "dunet-deploy-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "model_name", "model_args", "state_dict", "spec")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    spec: PreprocessSpec,
    config: dict[str, Any] | None = None,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    best_metrics: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    rng: dict[str, Any] | None = None,
    template: dict[str, Any] | None = None,
) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then rename).

    Args:
        path: destination (``.pt``).
        model: a registry model (its ``model_name``/``model_args`` are recorded),
            possibly wrapped in DDP.
        spec: the preprocessing it was trained with.
        config: training configuration.
        epoch: last completed epoch.
        metrics: validation metrics of that epoch.
        best_metrics: best validation metrics so far.
        optimizer: optimizer whose state to keep (for ``--resume``).
        scaler: AMP GradScaler whose state to keep.
        rng: RNG states to restore on resume.
        template: ``Template.to_checkpoint()`` of the training data, or ``None``.
    """
    bare = unwrap(model)
    name = getattr(bare, "model_name", None)
    if name is None:
        raise ValueError("model was not built by create_model(): no model_name to record")
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": name,
        "model_args": dict(bare.model_args),  # type: ignore[arg-type]
        "state_dict": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "spec": spec.to_dict(),
        "config": dict(config or {}),
        "epoch": int(epoch),
        "metrics": dict(metrics or {}),
        "best_metrics": dict(best_metrics or {}),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "versions": {"dunet_deploy": __version__, "torch": str(torch.__version__)},
    }
    if template is not None:  # a tensor: weights_only loads it back
        doc["template"] = {**template, "data": torch.as_tensor(template["data"])}
    buf = io.BytesIO()
    torch.save(doc, buf)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Load and validate a checkpoint with ``weights_only=True``.

    Raises:
        DunetError: one line naming the file when it is missing, another kind
            of file (ONNX, engine, NIfTI: the message says which command takes
            it), truncated, not a torch file, carries code (a pickle payload),
            or is not ours.
    """
    path = Path(path)
    if not path.is_file():
        raise DunetError(f"{path}: checkpoint not found")
    check_kind(path, CHECKPOINT)  # an ONNX / engine / NIfTI given where a checkpoint goes
    try:
        doc = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = first_line(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise DunetError(
                f"{path}: refused: the file holds Python objects other than tensors "
                "(not loadable with weights_only=True)"
            ) from None
        raise DunetError(f"{path}: not a torch checkpoint ({first[:120]})") from None
    except Exception as e:  # torch raises many types for a damaged file (EOF, zip, KeyError…)
        msg = first_line(e)
        raise DunetError(f"{path}: truncated or corrupt checkpoint ({msg[:120]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DunetError(f"{path}: not a dunet-deploy checkpoint (no 'format': '{FORMAT}')")
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise DunetError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if int(doc["format_version"]) > FORMAT_VERSION:
        raise DunetError(
            f"{path}: checkpoint format {doc['format_version']} is newer than this "
            f"dunet-deploy supports ({FORMAT_VERSION})"
        )
    if doc["model_name"] not in list_models():
        raise DunetError(f"{path}: unknown model {doc['model_name']!r} in checkpoint")
    doc["spec_obj"] = checkpoint_spec(doc, path)
    return doc


def checkpoint_spec(
    doc: dict[str, Any], path: str | os.PathLike[str] = "checkpoint"
) -> PreprocessSpec:
    """The :class:`PreprocessSpec` stored in a loaded checkpoint."""
    try:
        return PreprocessSpec.from_dict(doc["spec"])
    except DunetError as e:
        raise DunetError(f"{path}: bad preprocessing spec in checkpoint: {e}") from None


def model_from_checkpoint(doc: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """Rebuild the model of a loaded checkpoint and load its weights (eval mode).

    Raises:
        DunetError: when the weights do not fit the recorded architecture.
    """
    try:
        model = create_model(doc["model_name"], **doc["model_args"])
    except (TypeError, ValueError, DunetError) as e:
        raise DunetError(f"{source}: cannot build {doc['model_name']!r}: {e}") from None
    try:
        model.load_state_dict(doc["state_dict"], strict=True)
    except RuntimeError as e:
        first = first_line(e)
        raise DunetError(
            f"{source}: weights do not fit model {doc['model_name']!r} ({first[:150]})"
        ) from None
    return model.eval()
