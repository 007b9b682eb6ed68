"""The in-process executor: the stages one case after the other, reading one case ahead.

``dunet-infer --workers 0`` and ``Segmenter.predict_files(workers=0)``::

    prefetch thread:  Reader.read + prepare (volume i+1 ... i+prefetch)
    this thread:      infer_case (volume i) -> write_case (volume i)

Reading and preprocessing run on a background thread while the model runs
(a bounded queue holds at most ``prefetch`` ready volumes; decompression,
percentiles and matmul resizing release the GIL).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from dunet_deploy.runtime import pipeline as stages
from dunet_deploy.runtime.core import Predictor
from dunet_deploy.runtime.pipeline import infer_case, prepare_volume, write_case
from dunet_deploy.runtime.register_stage import RegisterStage
from dunet_deploy.spec import PreprocessSpec

__all__ = ["Prefetcher", "run_cases"]


class Prefetcher:
    """Reads and preprocesses inputs on a background thread, in order.

    Iterate over it to get :class:`PreparedVolume` objects; at most
    ``depth`` finished volumes wait in the queue, so memory stays bounded.
    Use as a context manager (or call :meth:`close`) so the thread stops
    when the consumer stops early.

    Args:
        items: Inputs in processing order.
        spec: The model's preprocessing spec.
        depth: Queue size (ready volumes held ahead of the consumer), >= 1.
        resample: ``"auto"`` or ``"never"``, for :func:`prepare_volume`.
        reader: Reads each input (:data:`~dunet_deploy.runtime.pipeline.NIFTI_READER`).
        register: The registration stage (``None``: none).
    """

    _DONE = object()

    def __init__(self, items: Sequence[stages.InputItem], spec: PreprocessSpec, depth: int = 1,
                 resample: str = "auto", reader: stages.Reader = stages.NIFTI_READER,
                 register: RegisterStage | None = None) -> None:
        self._items = list(items)
        self._register = register
        self._spec = spec
        self._resample = resample
        self._reader = reader
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="dunet-prefetch", daemon=True)
        self._thread.start()

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put(
                        prepare_volume(item, self._spec, self._resample, self._reader,
                                       register=self._register)):
                    return
        except BaseException as exc:  # a bug: hand it to the consumer to re-raise
            self._put(exc)
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[stages.PreparedVolume]:
        while True:
            obj = self._queue.get()
            if obj is self._DONE:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj

    def close(self) -> None:
        """Stop the thread (after the volume it is working on) and wait for it."""
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()




def run_cases(
    predict: Predictor,
    spec: PreprocessSpec,
    volumes: Iterable[stages.PreparedVolume],
    out: stages.OutputOptions,
    *,
    on_result: Callable[[stages.CaseResult], None] | None = None,
    results: list[stages.CaseResult] | None = None,
    meter: stages.Meter | None = None,
) -> list[stages.CaseResult]:
    """Segment prepared volumes one after the other, in this process, and write their outputs.

    Args:
        predict: The network (a runner, possibly wrapped for test-time augmentation).
        spec: The model's preprocessing spec.
        volumes: Prepared volumes (e.g. a :class:`Prefetcher`).
        out: Output folder, the run's options (``batch_size``, what to write) and the writer.
        on_result: Called with each finished result (progress, error lines).
        results: Finished results are appended here, so an interrupted caller
            still has them.
        meter: Traffic counter of a remote model (see
            :func:`~dunet_deploy.runtime.pipeline.infer_case`).

    Returns:
        ``results``: one :class:`CaseResult` per volume, in order.
    """
    results = [] if results is None else results
    for prep in volumes:
        grid = infer_case(predict, spec, prep, out.options.batch_size, meter)
        result = prep.result if grid is None else write_case(grid, prep, spec, out)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
