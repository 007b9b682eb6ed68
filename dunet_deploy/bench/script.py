"""``python -m dunet_deploy.bench.script``: the bench without click, configured by environment.

What ``benchmarks/gpu.sh`` runs, so a GPU image with only torch (CUDA), onnx,
numpy and onnxruntime (any build) can benchmark: no click, no nibabel needed
(without nibabel the end-to-end ratio is skipped with the reason).

Variables (defaults are the full GPU run; ``QUICK=1`` switches to the quick one):

==============  ==========================================  ==========================
variable        full                                        ``QUICK=1``
==============  ==========================================  ==========================
``MODELS``      ``dunet,unet3d,unet2d``                     ``dunet,unet3d``
``BACKENDS``    ``torch,torch-cudagraphs,tensorrt,``        same
                ``onnxruntime,torch-compile``
``PRECISIONS``  ``fp32,fp16,bf16``                          ``fp16,bf16``
``BATCHES``     ``1,4,8,16,32,64``                          ``1,8,32``
``ITERS``       ``50`` (``WARMUP`` 10, ``MIN_ITERS`` 5)     ``20`` (5, 3)
``TIME_BUDGET`` ``20`` s per record                         ``5``
``DEADLINE``    ``480`` s for the whole run                 ``480``
``E2E``         ``1``                                       ``1`` (volumes/s of the
                                                            pipeline with torch CUDA
                                                            as the model, and any
                                                            runtime backend that ran)
==============  ==========================================  ==========================

Also ``DEVICE`` (``cuda``), ``IMAGE_SIZE`` (192), ``BASE_FILTERS``, ``PEAK_SIZES``,
``THREADS``, ``CUDA_GRAPH`` (``1``: TensorRT / ONNX Runtime with CUDA graphs),
``E2E_BATCH`` (32) and ``OUT`` (required: the results folder). TensorRT and
ONNX Runtime CUDA come before ``torch-compile``: its max-autotune compilation
is the slowest set-up, and what the deadline cuts first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import replace

from dunet_deploy.bench.config import BenchConfig
from dunet_deploy.errors import DunetError

__all__ = ["config_from_env", "main"]

_FULL = {"MODELS": "dunet,unet3d,unet2d",
         "BACKENDS": "torch,torch-cudagraphs,tensorrt,onnxruntime,torch-compile",
         "PRECISIONS": "fp32,fp16,bf16", "BATCHES": "1,4,8,16,32,64", "ITERS": "50",
         "WARMUP": "10", "MIN_ITERS": "5", "TIME_BUDGET": "20", "DEADLINE": "480", "E2E": "1"}
_QUICK = {**_FULL, "MODELS": "dunet,unet3d", "PRECISIONS": "fp16,bf16", "BATCHES": "1,8,32",
          "ITERS": "20", "WARMUP": "5", "MIN_ITERS": "3", "TIME_BUDGET": "5", "E2E": "1"}


def _names(env: Mapping[str, str], key: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in env[key].split(",") if t.strip())


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DunetError(f"{key}={env[key]!r}: expected an integer") from None


def _float(env: Mapping[str, str], key: str) -> float:
    try:
        return float(env[key])
    except ValueError:
        raise DunetError(f"{key}={env[key]!r}: expected a number of seconds") from None


def config_from_env(environ: Mapping[str, str]) -> BenchConfig:
    """A :class:`BenchConfig` from the variables above.

    Raises:
        DunetError: naming the variable that is malformed.
    """
    env = {**(_QUICK if environ.get("QUICK") == "1" else _FULL), **environ}
    try:
        batches = tuple(int(t) for t in _names(env, "BATCHES"))
        peaks = tuple(int(t) for t in _names(env, "PEAK_SIZES")) if env.get("PEAK_SIZES") else None
    except ValueError:
        raise DunetError(f"BATCHES / PEAK_SIZES: expected integers like 1,8,32 "
                         f"(BATCHES={env['BATCHES']!r})") from None
    cfg = BenchConfig(
        models=_names(env, "MODELS"), backends=_names(env, "BACKENDS"),
        precisions=_names(env, "PRECISIONS"), batch_sizes=batches,
        iters=_int(env, "ITERS"), warmup=_int(env, "WARMUP"), min_iters=_int(env, "MIN_ITERS"),
        time_budget_s=_float(env, "TIME_BUDGET"), deadline_s=_float(env, "DEADLINE"),
        image_size=_int({"IMAGE_SIZE": "192", **env}, "IMAGE_SIZE"),
        device=env.get("DEVICE", "cuda"), e2e=env["E2E"] == "1",
        e2e_batch_size=_int({"E2E_BATCH": "32", **env}, "E2E_BATCH"), e2e_repeats=1,
        peak_sizes=peaks, cuda_graph=env.get("CUDA_GRAPH") == "1",
        base_filters=_int(env, "BASE_FILTERS") if env.get("BASE_FILTERS") else None,
    )
    if env.get("THREADS"):
        cfg = replace(cfg, threads=_int(env, "THREADS"))
    return cfg


def main(environ: Mapping[str, str] | None = None) -> int:
    """Run the bench into ``$OUT``; ``error: ...`` and exit status 2 on a user error."""
    from dunet_deploy.bench.run import run_bench

    env = os.environ if environ is None else environ
    try:
        if not env.get("OUT"):
            raise DunetError("OUT is not set: give the results folder")
        cfg = config_from_env(env)
        doc = run_bench(cfg, env["OUT"], command=f"{sys.executable} -m dunet_deploy.bench.script"
                        f" (QUICK={env.get('QUICK', '0')})")
    except DunetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(doc['records'])} record(s), {len(doc['skipped'])} skipped; results in "
          f"{env['OUT']}/bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
