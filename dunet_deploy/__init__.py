"""dunet-deploy: D-UNet stroke lesion segmentation, from training to TensorRT.

The package is laid out in the order data flows through it::

    spec -> data -> models -> losses / training -> export -> runtime -> bench -> cli

Importing the top-level package is cheap and never imports torch; the
subpackages that need torch (``models``, ``losses``, ``training``, ``export``)
import it themselves. :class:`Segmenter` (in-process inference on exported
models) is loaded on first access and imports no backend until it is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Prediction", "Segmenter", "__version__"]

if TYPE_CHECKING:
    from dunet_deploy.runtime.segmenter import Prediction, Segmenter


def __getattr__(name: str) -> Any:
    # PEP 562: `from dunet_deploy import Segmenter` imports numpy/nibabel only then.
    if name in ("Segmenter", "Prediction"):
        from dunet_deploy.runtime import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'dunet_deploy' has no attribute {name!r}")
