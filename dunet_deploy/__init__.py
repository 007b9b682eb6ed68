"""dunet-deploy: D-UNet stroke lesion segmentation, from training to TensorRT.

The package is laid out in the order data flows through it::

    spec -> data -> models -> losses / training -> export -> runtime -> bench -> cli

Importing the top-level package is cheap and never imports torch; the
subpackages that need torch (``models``, ``losses``, ``training``, ``export``)
import it themselves.
"""

__version__ = "0.1.0"
