"""Model zoo: D-UNet, its fusion variants and the UNet baselines (needs torch)."""

from .registry import (
    PAPER_SEADD123_PARAMS,
    ModelInfo,
    create_model,
    keras_param_count,
    list_models,
    model_info,
    model_kwargs,
    register_model,
)
from .unets import DUNet, UNet2D, UNet3D

__all__ = [
    "PAPER_SEADD123_PARAMS",
    "DUNet",
    "ModelInfo",
    "UNet2D",
    "UNet3D",
    "create_model",
    "keras_param_count",
    "list_models",
    "model_info",
    "model_kwargs",
    "register_model",
]
