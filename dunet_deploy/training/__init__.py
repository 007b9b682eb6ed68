"""Training and evaluation of the models.

Public API (imported lazily, so ``import dunet_deploy.training.evaluate`` —
the torch-free evaluation that the runtime reuses — never pulls in torch)::

    train(TrainConfig(data=..., out=...)) -> RunResult          # trainer
    evaluate_checkpoint(ckpt, data_dir, split="val") -> [CaseMetrics]
    evaluate_cases(cases, spec, predict) -> [CaseMetrics]          # any predictor
    write_report(metrics, out_dir, method=..., params=...)         # CSV/MD/JSON/PNG
    SlabDataset, epoch_order, shard_order                          # dataset
    augment_batch, AugmentParams                                   # augment
    save_checkpoint, load_checkpoint, model_from_checkpoint        # checkpoint
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # trainer
    "TrainConfig": "trainer",
    "RunResult": "trainer",
    "train": "trainer",
    "resume_config": "trainer",
    "build_spec": "trainer",
    "resolve_device": "trainer",
    "torch_predictor": "predictor",
    # evaluation (torch-free)
    "Predictor": "evaluate",
    "evaluate_case": "evaluate",
    "evaluate_cases": "evaluate",
    "evaluate_checkpoint": "evaluate",
    "predict_volume": "evaluate",
    "select_cases": "evaluate",
    "table2_markdown": "evaluate",
    "write_boxplot": "evaluate",
    "write_report": "evaluate",
    # data
    "SlabDataset": "dataset",
    "derive_seed": "dataset",
    "epoch_order": "dataset",
    "shard_order": "dataset",
    "epoch_batches": "dataset",
    "training_indices": "dataset",
    # augmentation
    "AugmentParams": "augment",
    "PAPER_AUGMENT": "augment",
    "augment_batch": "augment",
    "random_affine": "augment",
    "apply_affine": "augment",
    # checkpoints
    "save_checkpoint": "checkpoint",
    "load_checkpoint": "checkpoint",
    "model_from_checkpoint": "checkpoint",
    "unwrap": "checkpoint",
}

__all__ = [
    "PAPER_AUGMENT",
    "AugmentParams",
    "Predictor",
    "RunResult",
    "SlabDataset",
    "TrainConfig",
    "apply_affine",
    "augment_batch",
    "build_spec",
    "derive_seed",
    "epoch_batches",
    "epoch_order",
    "evaluate_case",
    "evaluate_cases",
    "evaluate_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "predict_volume",
    "random_affine",
    "resolve_device",
    "resume_config",
    "save_checkpoint",
    "select_cases",
    "shard_order",
    "table2_markdown",
    "torch_predictor",
    "train",
    "training_indices",
    "unwrap",
    "write_boxplot",
    "write_report",
]

if TYPE_CHECKING:  # pragma: no cover
    from .augment import PAPER_AUGMENT, AugmentParams, apply_affine, augment_batch, random_affine
    from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint, unwrap
    from .dataset import (
        SlabDataset,
        derive_seed,
        epoch_batches,
        epoch_order,
        shard_order,
        training_indices,
    )
    from .evaluate import (
        Predictor,
        evaluate_case,
        evaluate_cases,
        evaluate_checkpoint,
        predict_volume,
        select_cases,
        table2_markdown,
        write_boxplot,
        write_report,
    )
    from .predictor import torch_predictor
    from .trainer import (
        RunResult,
        TrainConfig,
        build_spec,
        resolve_device,
        resume_config,
        train,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
