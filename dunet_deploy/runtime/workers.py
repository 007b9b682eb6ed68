"""Worker processes that read, preprocess, post-process and write while one model stays busy.

``dunet-infer --workers N`` (and ``Segmenter.predict_files(workers=N)``)::

    worker processes:  read + to_network (volume i+k)   finish_prediction + save (volume i-1)
    main process:                      predict_grid (volume i)   <- one model load, one GPU context

Work goes to the pool in input order; results come back in input order. At
most ``workers + prefetch`` prepared volumes and ``workers`` finished grids are
in flight, so memory stays bounded however many inputs there are. A bad volume
fails its own case only. Workers ignore SIGINT, so a Ctrl-C reaches only the
main process, which stops submitting, lets the cases already being written
finish (their files are complete or absent), and re-raises.

Processes start through ``forkserver`` (``spawn`` where there is none): never
a plain ``fork`` of a process whose backend already runs threads.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from dunet_deploy.runtime.core import Predictor
from dunet_deploy.runtime.pipeline import (
    CaseResult,
    InputItem,
    Meter,
    OutputOptions,
    PreparedVolume,
    infer_case,
    prepare_volume,
    write_case,
)
from dunet_deploy.spec import PreprocessSpec

__all__ = ["default_workers", "run_in_workers"]


def default_workers(cores: int | None = None) -> int:
    """Worker processes ``dunet-infer`` uses by default.

    None on one or two cores (the backend already uses them; a worker would
    only compete), else half the cores, at most 4: enough to keep a GPU fed
    at ~1 core-second of host work per volume.
    """
    n = cores if cores is not None else (len(os.sched_getaffinity(0))
                                         if hasattr(os, "sched_getaffinity") else os.cpu_count())
    n = int(n or 1)
    return 0 if n <= 2 else min(4, n // 2)


def _context() -> Any:
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["dunet_deploy.runtime.workers"])
    return ctx


def _init_worker() -> None:
    # The main process decides what an interrupt means; numpy stays single-threaded
    # so N workers do not oversubscribe the cores the backend uses.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _prepare_task(item: InputItem, spec: PreprocessSpec, resample: str) -> PreparedVolume:
    return prepare_volume(item, spec, resample)


def _write_task(grid: np.ndarray, prep: PreparedVolume, spec: PreprocessSpec,
                opts: OutputOptions) -> CaseResult:
    return write_case(grid, prep, spec, opts)


class _Done:
    """A result known without a worker (a case that failed before writing)."""

    def __init__(self, result: CaseResult) -> None:
        self._result = result

    def result(self) -> CaseResult:
        return self._result


def run_in_workers(
    open_predictor: Callable[[], Predictor],
    spec: PreprocessSpec,
    items: Sequence[InputItem],
    opts: OutputOptions,
    *,
    workers: int,
    batch_size: int = 16,
    prefetch: int = 1,
    resample: str = "auto",
    on_result: Callable[[CaseResult], None] | None = None,
    results: list[CaseResult] | None = None,
    meter: Meter | None = None,
) -> list[CaseResult]:
    """Segment ``items`` with reading/writing in ``workers`` processes and the model here.

    Args:
        open_predictor: Returns the network (loading it when needed); called
            once the first volumes are being read. It runs only in this process.
        spec: The model's preprocessing spec.
        items: Inputs in output order.
        opts: Output folder and what to write.
        workers: Worker processes, >= 1.
        batch_size: Slabs per model call.
        prefetch: Prepared volumes waiting for the model beyond one per worker.
        resample: ``"auto"`` or ``"never"``.
        on_result: Called with each finished result, in input order.
        results: Finished results are appended here as they complete, so an
            interrupted caller still has them.
        meter: Traffic counter of a remote model (see ``pipeline.infer_case``).

    Returns:
        ``results``: one :class:`CaseResult` per input, in order.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results = [] if results is None else results
    todo = deque(items)
    preparing: deque[Future[PreparedVolume]] = deque()
    writing: deque[Future[CaseResult] | _Done] = deque()

    def collect(keep: int) -> None:
        while len(writing) > keep:
            result = writing.popleft().result()
            results.append(result)
            if on_result is not None:
                on_result(result)

    def submit_prepares(pool: ProcessPoolExecutor) -> None:
        while todo and len(preparing) < workers + max(0, prefetch):
            preparing.append(pool.submit(_prepare_task, todo.popleft(), spec, resample))

    with ProcessPoolExecutor(max_workers=workers, mp_context=_context(),
                             initializer=_init_worker) as pool:
        try:
            submit_prepares(pool)
            predict = open_predictor()  # the model loads while the workers read
            while preparing:
                prep = preparing.popleft().result()
                submit_prepares(pool)
                grid = infer_case(predict, spec, prep, batch_size, meter)
                if grid is None:
                    writing.append(_Done(prep.result))
                else:
                    writing.append(pool.submit(_write_task, grid, prep, spec, opts))
                collect(keep=workers)
            collect(keep=0)
        except BaseException:
            # Interrupted (or a bug): start nothing new; cases being written finish.
            for fut in preparing:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            for pending in writing:
                if not (isinstance(pending, Future) and pending.cancelled()):
                    try:
                        results.append(pending.result())
                    except BaseException:  # a worker that died with the interrupt
                        continue
            raise
    return results
