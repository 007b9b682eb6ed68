"""Slab dataset over the slice cache, seeded epoch order and DDP sharding."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dunet_deploy.data.cache import build_cache  # noqa: E402
from dunet_deploy.data.layouts import discover_cases  # noqa: E402
from dunet_deploy.data.synth import write_dataset  # noqa: E402
from dunet_deploy.spec import PreprocessSpec  # noqa: E402
from dunet_deploy.training.dataset import (  # noqa: E402
    SlabDataset,
    case_nonempty_positions,
    derive_seed,
    epoch_batches,
    epoch_order,
    make_loader,
    shard_order,
    training_indices,
)

SHAPE = (32, 40, 16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    write_dataset(root / "data", cases=4, shape=SHAPE, seed=1)
    _, cases = discover_cases(root / "data")
    spec = PreprocessSpec.for_geometry(SHAPE, image_size=32)
    return build_cache(cases, spec, root / "cache")


def test_derive_seed_is_stable_and_separates_streams():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(s, stream, epoch) for s in (0, 1) for stream in (1, 2) for epoch in (1, 2)}
    assert len(seeds) == 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_training_indices_and_items(cache):
    ids = cache.case_ids[:2]
    idx = training_indices(cache, ids)
    every = np.concatenate([cache.case_indices(c) for c in ids])
    assert set(idx) <= set(every)
    assert set(idx) == set(every) & set(cache.nonempty_indices())
    assert len(training_indices(cache, ids, nonempty_only=False)) == len(every)

    ds = SlabDataset(cache, idx)
    assert len(ds) == len(idx)
    image, label = ds[3]
    ref_img, ref_lab = cache.slab(int(idx[3]))
    assert image.dtype == torch.float32 and label.dtype == torch.float32
    assert image.shape == (4, 32, 32) and label.shape == (1, 32, 32)
    assert np.array_equal(image.numpy(), ref_img) and np.array_equal(label.numpy(), ref_lab)
    assert ds.lesion.sum() == np.isin(idx, cache.lesion_slab_indices()).sum() > 0

    pos = case_nonempty_positions(cache, ids[0])
    first = cache.case_indices(ids[0])
    assert np.array_equal(first[pos], idx[np.isin(idx, first)])


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(50, seed=3, epoch=1)
    assert np.array_equal(a, epoch_order(50, seed=3, epoch=1))
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, epoch_order(50, seed=3, epoch=2))
    assert not np.array_equal(a, epoch_order(50, seed=4, epoch=1))


def test_oversampling_favours_lesion_slabs():
    lesion = np.zeros(1000, bool)
    lesion[:200] = True
    plain = epoch_order(1000, seed=0, epoch=1, lesion=lesion, oversample=1.0)
    assert lesion[plain].mean() == pytest.approx(0.2)
    over = epoch_order(1000, seed=0, epoch=1, lesion=lesion, oversample=5.0)
    assert len(over) == 1000
    # expected fraction 5*0.2 / (5*0.2 + 0.8) = 0.556
    assert 0.50 < lesion[over].mean() < 0.61
    assert np.array_equal(over, epoch_order(1000, seed=0, epoch=1, lesion=lesion, oversample=5.0))
    with pytest.raises(ValueError):
        epoch_order(10, seed=0, epoch=1, oversample=0)


@pytest.mark.parametrize("n", [10, 11])
def test_shards_are_disjoint_equal_and_cover(n):
    order = epoch_order(n, seed=0, epoch=1)
    shards = [shard_order(order, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-n // 2)
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    if n % 2 == 0:
        assert not set(shards[0]) & set(shards[1])
    assert np.array_equal(shard_order(order, 0, 1), order)
    with pytest.raises(ValueError):
        shard_order(order, 2, 2)


def test_epoch_batches_never_end_with_a_single_slab():
    assert epoch_batches(np.arange(10), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert epoch_batches(np.arange(9), 4) == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert epoch_batches(np.arange(1), 4) == [[0]]


def test_loader_follows_the_batches(cache):
    ds = SlabDataset(cache, training_indices(cache, cache.case_ids))
    batches = epoch_batches(epoch_order(len(ds), seed=0, epoch=1)[:9], 4)
    got = list(make_loader(ds, batches))
    assert [b[0].shape[0] for b in got] == [4, 5]
    assert torch.equal(got[1][0][2], ds[batches[1][2]][0])
