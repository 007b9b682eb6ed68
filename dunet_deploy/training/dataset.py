"""Training data: slabs of a :class:`~dunet_deploy.data.cache.SliceCache` as a torch dataset.

Preprocessing happened once, when the cache was built, with the same numpy
functions the runtime uses (:mod:`dunet_deploy.data.preprocess`); this module
only reads slabs back and decides their order.

Data order is a pure function of ``(seed, epoch)``: :func:`epoch_order` gives
the global order of an epoch (identical on every process), :func:`shard_order`
gives one process its share (``DistributedSampler`` semantics: pad by
wrapping to a multiple of the world size, then every ``world_size``-th item).
Resuming at epoch ``k`` therefore needs no iterator state, and the data a
process sees never depends on the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset

from dunet_deploy.data.cache import SliceCache

__all__ = [
    "STREAM_AUGMENT",
    "STREAM_ORDER",
    "STREAM_TORCH",
    "SlabDataset",
    "case_nonempty_positions",
    "derive_seed",
    "epoch_batches",
    "epoch_order",
    "make_loader",
    "shard_order",
    "training_indices",
]

#: Independent random streams derived from the run seed.
STREAM_ORDER, STREAM_AUGMENT, STREAM_TORCH = 1, 2, 3


def derive_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``parts`` (``SeedSequence``).

    Different ``parts`` (stream, epoch, rank) give statistically independent
    streams; the result fits ``torch.manual_seed`` and ``np.random.default_rng``.
    """
    words = np.random.SeedSequence([int(seed), *(int(p) for p in parts)]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & ((1 << 63) - 1)


class SlabDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A subset of a slice cache's slabs, by global slab index.

    Item ``i`` is slab ``indices[i]`` of the cache:
    ``(image float32 [C, S, S], label float32 [1, S, S])`` with labels in {0, 1}.
    Picklable (the cache reopens its memory maps in each worker).

    Args:
        cache: The built slice cache.
        indices: Global slab indices (int) to expose, in this order.
    """

    def __init__(self, cache: SliceCache, indices: npt.ArrayLike) -> None:
        self.cache = cache
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(cache)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise IndexError(f"slab indices must be in [0, {n})")
        self.lesion = np.isin(self.indices, cache.lesion_slab_indices())

    def __len__(self) -> int:
        """Number of slabs."""
        return int(self.indices.size)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slab ``i``: ``(float32 [C, S, S], float32 [1, S, S])``."""
        image, label = self.cache.slab(int(self.indices[i]))
        return torch.from_numpy(image), torch.from_numpy(label.astype(np.float32))


def training_indices(
    cache: SliceCache, case_ids: Sequence[str], *, nonempty_only: bool = True
) -> np.ndarray:
    """Global slab indices of the given cases.

    Args:
        cache: The slice cache.
        case_ids: Cases to take slabs from.
        nonempty_only: Keep only slabs the runtime would run the network on
            (any nonzero raw voxel in the crop box); all-background slabs are
            predicted as 0 without the network, so training on them is wasted.

    Returns:
        int64 ``[K]``, ascending.
    """
    parts = [cache.case_indices(cid) for cid in case_ids]
    idx = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    if nonempty_only:
        idx = idx[np.isin(idx, cache.nonempty_indices())]
    return idx.astype(np.int64)


def case_nonempty_positions(cache: SliceCache, case_id: str) -> np.ndarray:
    """Slice positions ``z`` of a case whose slab is non-empty (the runtime's rule).

    Returns:
        int64 ``[K]``, ascending, positions within the case (0-based).
    """
    idx = cache.case_indices(case_id)
    return np.flatnonzero(np.isin(idx, cache.nonempty_indices())).astype(np.int64)


def epoch_order(
    n: int,
    *,
    seed: int,
    epoch: int,
    lesion: npt.ArrayLike | None = None,
    oversample: float = 1.0,
) -> np.ndarray:
    """The global order of dataset positions for one epoch.

    Args:
        n: Dataset length.
        seed: Run seed.
        epoch: Epoch number (1-based, but any int works).
        lesion: bool ``[n]``, which positions hold a lesion slab.
        oversample: Relative sampling weight of lesion slabs. ``1`` gives a
            plain permutation of all positions; ``w > 1`` draws ``n`` positions
            with replacement, a lesion slab ``w`` times as likely as another
            (``WeightedRandomSampler`` semantics).

    Returns:
        int64 ``[n]`` positions.
    """
    if oversample <= 0:
        raise ValueError(f"oversample must be > 0, got {oversample}")
    rng = np.random.default_rng(derive_seed(seed, STREAM_ORDER, epoch))
    flags = None if lesion is None else np.asarray(lesion, dtype=bool).reshape(-1)
    if flags is not None and flags.size != n:
        raise ValueError(f"lesion flags have {flags.size} entries for {n} positions")
    if oversample == 1.0 or flags is None or flags.all() or not flags.any():
        return rng.permutation(n).astype(np.int64)
    weights = np.where(flags, float(oversample), 1.0)
    return rng.choice(n, size=n, replace=True, p=weights / weights.sum()).astype(np.int64)


def shard_order(order: npt.ArrayLike, rank: int, world_size: int) -> np.ndarray:
    """The share of one process (``DistributedSampler`` semantics).

    The order is padded by wrapping around to a multiple of ``world_size``
    and process ``rank`` takes items ``rank, rank + world_size, ...``, so all
    processes get the same number of items (and run the same number of steps).

    Returns:
        int64 ``[ceil(len(order) / world_size)]``.
    """
    o = np.asarray(order, dtype=np.int64).reshape(-1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if o.size == 0:
        return o
    total = -(-o.size // world_size) * world_size
    padded = np.resize(o, total)  # np.resize repeats the array to fill
    return padded[rank::world_size]


def epoch_batches(positions: npt.ArrayLike, batch_size: int) -> list[list[int]]:
    """Split positions into consecutive batches (the last one may be smaller).

    A last batch of a single slab is merged into the previous batch, since
    BatchNorm cannot train on one sample of 1×1 bottleneck features.
    """
    p = [int(v) for v in np.asarray(positions).reshape(-1)]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = [p[i : i + batch_size] for i in range(0, len(p), batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2].extend(batches.pop())
    return batches


def make_loader(
    dataset: SlabDataset,
    batches: list[list[int]],
    *,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    """A loader yielding ``(images [B, C, S, S], labels [B, 1, S, S])`` in batch order.

    Args:
        dataset: The dataset.
        batches: Dataset positions per batch (see :func:`epoch_batches`).
        workers: Loader processes (0 = load in the calling process). Loading
            is deterministic, so results do not depend on this.
        pin_memory: Pin host memory (for CUDA).
    """
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin_memory)
