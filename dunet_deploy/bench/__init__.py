"""``dunet-bench``: latency, throughput and work accounting of the model zoo per backend.

One call of :func:`run_bench` measures, in one process and one sitting:

1. the matrix-multiply peak of the device at every requested precision
   (:mod:`~dunet_deploy.bench.peak`);
2. every model × backend × precision × batch size (:mod:`~dunet_deploy.bench.measure`
   over the sessions of :mod:`~dunet_deploy.bench.backends`): warm-up, timed
   iterations, latency percentiles, throughput, achieved GFLOP/s from the ONNX
   graph's FLOP count and its percentage of the peak, peak RSS and GPU memory;
3. the ratios (:func:`~dunet_deploy.bench.core.compute_ratios`): D-UNet / 3D UNet,
   each backend against torch eager, and the runtime pipeline's volume time
   against pure model time on one synthetic volume (:mod:`~dunet_deploy.bench.e2e`).

Combinations that cannot run here are *skipped with a reason*, never fatal.
``bench.json`` is rewritten after every record (:mod:`~dunet_deploy.bench.run`);
``bench.md`` and ``bench.png`` (:mod:`~dunet_deploy.bench.report`) at the end.
:class:`~dunet_deploy.bench.config.BenchConfig` ``deadline_s`` caps the whole run.

Example::

    from dunet_deploy.bench import BenchConfig, run_bench
    doc = run_bench(BenchConfig(models=("dunet", "unet3d"), batch_sizes=(1, 8), iters=5),
                    out_dir="bench-out")

Importing this package is cheap: the names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BenchConfig", "run_bench", "validate_config"]

_LAZY = {"BenchConfig": "dunet_deploy.bench.config",
         "validate_config": "dunet_deploy.bench.config",
         "run_bench": "dunet_deploy.bench.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dunet_deploy.bench' has no attribute {name!r}")
