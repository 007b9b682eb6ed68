"""A PyTorch model as the inference core's ``predict(slabs) -> probs`` callable.

The core (:mod:`dunet_deploy.runtime.core`) never imports torch; checkpoint
evaluation and training validation hand it the callable made here, so they
segment exactly as the exported runtime does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["autocast", "torch_predictor"]


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[object]:
    """Mixed precision for ``device`` (fp16 on CUDA, bf16 on the CPU), or nothing."""
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def torch_predictor(
    model: nn.Module, device: torch.device, *, amp: bool = False
) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``model`` (already in eval mode, on ``device``) as a numpy predictor.

    Args:
        model: Maps float32 ``[N, C, S, S]`` to probabilities ``[N, 1, S, S]``.
        device: Where the model lives.
        amp: Run under :func:`autocast`.

    Returns:
        ``predict(float32 [N, C, S, S]) -> float32 [N, 1, S, S]`` (numpy in and out).
    """

    def predict(slabs: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(slabs, dtype=np.float32)).to(device)
        with torch.no_grad(), autocast(device, amp):
            y = model(x)
        return y.float().cpu().numpy()

    return predict
