"""Shared test settings: small tensors, deterministic torch, few threads; a Ray cluster."""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

# Two cores on CI: keep BLAS/OpenMP from oversubscribing when subprocesses run.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on 127.0.0.1 (tests/ray_cluster.py), stopped at the end."""
    pytest.importorskip("ray.data")
    from ray_cluster import start_cluster

    with ExitStack() as stack:
        yield start_cluster(stack)
