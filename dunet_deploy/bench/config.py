"""What a ``dunet-bench`` run measures (:class:`BenchConfig`) and its validation."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dunet_deploy.bench.core import BACKENDS, PRECISIONS
from dunet_deploy.errors import DunetError

__all__ = ["BenchConfig", "e2e_volume_shape", "spec_for", "validate_config"]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        models: registry names.
        backends: from :data:`~dunet_deploy.bench.core.BACKENDS`.
        precisions: from :data:`~dunet_deploy.bench.core.PRECISIONS`.
        batch_sizes: slabs per call, each >= 1.
        iters: timed iterations per record (the most; see ``time_budget_s``).
        warmup: untimed iterations per record.
        time_budget_s: per record, start no warm-up or timed iteration expected
            to end after this many seconds, once ``min_iters`` timed ones ran
            (``None``: always ``warmup`` + ``iters``).
        min_iters: timed iterations that run whatever the budget.
        image_size: network input side ``S`` (multiple of 16).
        threads: CPU threads for torch, ONNX Runtime and OpenVINO.
        device: ``"cpu"`` or ``"cuda"``.
        base_filters: override every model's ``base_filters`` (small quick runs).
        e2e: measure the runtime pipeline against pure model time.
        e2e_model: model used for it.
        e2e_batch_size: batch size used for it (``dunet-infer``'s default is 16).
        e2e_repeats: interleaved repeats of pipeline and pure model (best of each).
        seed: weights and input data.
        cache_dir: keep the ONNX files and engines here (a temporary folder otherwise).
        peak_sizes: square matmul sizes for the peak (``None``: the device's defaults).
        deadline_s: wall-clock cap of the whole run: once passed, every record
            not yet measured is skipped with the reason (``None``: no cap).
        cuda_graph: run the TensorRT and ONNX Runtime (CUDA) sessions with CUDA graphs.
    """

    models: tuple[str, ...] = ("dunet", "unet3d", "unet2d")
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16, 32)
    iters: int = 20
    warmup: int = 3
    time_budget_s: float | None = None
    min_iters: int = 2
    image_size: int = 192
    threads: int = field(default_factory=lambda: _usable_cores())
    device: str = "cpu"
    base_filters: int | None = None
    e2e: bool = True
    e2e_model: str = "dunet"
    e2e_batch_size: int = 16
    e2e_repeats: int = 2
    seed: int = 0
    cache_dir: str | None = None
    peak_sizes: tuple[int, ...] | None = None
    deadline_s: float | None = None
    cuda_graph: bool = False


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def validate_config(cfg: BenchConfig) -> None:
    """Refuse a configuration that cannot mean anything, before any work.

    Raises:
        DunetError: one line naming the offending setting.
    """
    from dunet_deploy.models import list_models

    known = list_models()
    for m in cfg.models:
        if m not in known:
            raise DunetError(f"--models: unknown model {m!r}; known: {', '.join(known)}")
    if not cfg.models:
        raise DunetError("--models: give at least one model")
    for b in cfg.backends:
        if b not in BACKENDS:
            raise DunetError(f"--backends: unknown backend {b!r}; known: {', '.join(BACKENDS)}")
    if not cfg.backends:
        raise DunetError("--backends: give at least one backend")
    for p in cfg.precisions:
        if p not in PRECISIONS:
            raise DunetError(f"--precision: unknown precision {p!r}; known: "
                             f"{', '.join(PRECISIONS)}")
    if not cfg.precisions:
        raise DunetError("--precision: give at least one precision")
    if not cfg.batch_sizes:
        raise DunetError("--batch-sizes: give at least one batch size")
    for n in cfg.batch_sizes:
        if n < 1:
            raise DunetError(f"--batch-sizes: batch size {n} must be >= 1")
    if cfg.iters < 1:
        raise DunetError(f"--iters {cfg.iters}: must be >= 1")
    if cfg.warmup < 0:
        raise DunetError(f"--warmup {cfg.warmup}: must be >= 0")
    if not 1 <= cfg.min_iters <= cfg.iters:
        raise DunetError(f"--min-iters {cfg.min_iters}: must be between 1 and --iters {cfg.iters}")
    if cfg.deadline_s is not None and cfg.deadline_s <= 0:
        raise DunetError(f"--deadline {cfg.deadline_s}: must be > 0")
    if cfg.time_budget_s is not None and cfg.time_budget_s <= 0:
        raise DunetError(f"--time-budget {cfg.time_budget_s}: must be > 0")
    if cfg.image_size < 16 or cfg.image_size % 16:
        raise DunetError(f"--image-size {cfg.image_size}: must be a multiple of 16 (four 2×2 "
                         "poolings), at least 16")
    if cfg.threads < 1:
        raise DunetError(f"--threads {cfg.threads}: must be >= 1")
    if cfg.device not in ("cpu", "cuda"):
        raise DunetError(f"--device {cfg.device!r}: choose cpu or cuda")
    if cfg.peak_sizes is not None and (not cfg.peak_sizes or min(cfg.peak_sizes) < 16):
        raise DunetError(f"--peak-sizes {cfg.peak_sizes}: sizes must be >= 16")
    if cfg.base_filters is not None and cfg.base_filters < 1:
        raise DunetError(f"--base-filters {cfg.base_filters}: must be >= 1")
    if cfg.e2e and cfg.e2e_repeats < 1:
        raise DunetError(f"--e2e-repeats {cfg.e2e_repeats}: must be >= 1")
    if cfg.e2e and cfg.e2e_batch_size < 1:
        raise DunetError(f"--e2e-batch-size {cfg.e2e_batch_size}: must be >= 1")
    if cfg.e2e and cfg.e2e_model not in known:
        raise DunetError(f"--e2e-model: unknown model {cfg.e2e_model!r}")
    if cfg.device == "cuda":
        from dunet_deploy.bench.backends import cuda_unavailable

        reason = cuda_unavailable()
        if reason is not None:
            raise DunetError(f"--device cuda: {reason}")


def e2e_volume_shape(image_size: int) -> tuple[int, int, int]:
    """Synthetic volume for the pipeline ratio: ATLAS geometry at 192, else a small one.

    At other sizes the in-plane shape is ``(S, S + S/4)`` (x, y) so that the
    centred square crop is exactly ``S`` and no resize is needed; 189 slices
    keep the slab count of an ATLAS volume.
    """
    from dunet_deploy.spec import ATLAS_SHAPE

    if image_size == 192:
        return ATLAS_SHAPE
    return (image_size, image_size + image_size // 4, 189)


def spec_for(model: str, image_size: int) -> Any:
    from dunet_deploy.models import model_info
    from dunet_deploy.spec import PreprocessSpec

    shape = e2e_volume_shape(image_size)
    return PreprocessSpec.for_geometry(shape, image_size=image_size, model_name=model,
                                       slab_offsets=model_info(model).slab_offsets)


