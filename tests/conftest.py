"""Shared test settings: small tensors, deterministic torch, few threads."""

from __future__ import annotations

import os

# Two cores on CI: keep BLAS/OpenMP from oversubscribing when subprocesses run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
