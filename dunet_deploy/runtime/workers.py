"""The worker-process executor: reading, preprocessing, post-processing and writing in workers.

``dunet-infer --workers N`` (and ``Segmenter.predict_files`` with ``workers=N``)::

    worker processes:  prepare_volume (volume i+k)   write_case (volume i-1)
    main process:                  infer_case (volume i)   <- one model load, one GPU context

Work goes to the pool in input order; results come back in input order. At
most ``workers + prefetch`` prepared volumes and ``workers`` finished grids are
in flight, so memory stays bounded however many inputs there are. A bad volume
fails its own case only.

Signals: workers ignore SIGINT and SIGTERM, so a Ctrl-C or a SIGTERM sent to
the whole process group (``timeout``, systemd, Slurm, Kubernetes) is handled
by the main process alone, which stops submitting, lets the cases already
being written finish (their files are complete or absent), records them and
re-raises.

Dying workers: a worker killed mid-run (the OOM killer's SIGKILL) breaks the
pool. The case it was working on fails with ``worker process died (signal
9)`` and keeps none of its files (a writer killed between its renames has
put some in place: they are removed with the temporary files), a new pool
takes over and the other cases in flight are submitted again.

Processes start through ``forkserver`` (``spawn`` where there is none): never
a plain ``fork`` of a process whose backend already runs threads. The fork
server is started here with the BLAS thread variables set and SIGINT/SIGTERM
blocked; its first preload (:mod:`dunet_deploy.runtime._forkserver_signals`)
ignores both, so every worker inherits both settings. A signal that reaches
the main process while the server starts waits until it has started.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import deferred_interrupts
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.core import Predictor
from dunet_deploy.runtime.pipeline import (
    NIFTI_READER,
    CaseResult,
    InputItem,
    Meter,
    OutputOptions,
    PreparedVolume,
    Reader,
    infer_case,
    prepare_volume,
    write_case,
)
from dunet_deploy.runtime.register_stage import RegisterStage
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "THREAD_VARIABLES",
    "blas_threads",
    "calibrated_workers",
    "calibration_path",
    "default_workers",
    "machine_key",
    "run_in_workers",
    "save_calibration",
]

#: Set to 1 in workers (unless already set): N workers must not each start a
#: thread per core beside the backend's threads.
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_WORKER_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _cores() -> int:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(n or 1)


def default_workers(cores: int | None = None) -> int:
    """Worker processes ``dunet-infer`` uses by default.

    The count calibrated on this machine (:func:`calibrated_workers`:
    ``dunet-infer --calibrate-workers``, cached per machine) when there is one.
    Else: none on one or two cores (the backend already uses them), half the
    cores, at most 4, above. No rule on the core count holds on every CPU
    measured (benchmarks/results/2026-12-05-amd-epyc-zen3-2c/workers.md: on
    2 cores the best count was 0 on an Intel Xeon and an AMD Zen 3, 3 on an
    AMD Zen 4): the calibration measures instead.

    Args:
        cores: Decide for this many cores by the rule alone (no calibration).
    """
    if cores is None:
        calibrated = calibrated_workers()
        if calibrated is not None:
            return calibrated
    n = cores if cores is not None else _cores()
    return 0 if n <= 2 else min(4, n // 2)


def calibration_path() -> Path:
    """``$XDG_CACHE_HOME/dunet-deploy/workers.json`` (``~/.cache`` when unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dunet-deploy" / "workers.json"


def machine_key() -> str:
    """What a calibration holds for: host name, CPU model and flags, usable cores.

    A home folder shared by the nodes of a cluster keeps one entry per node.
    """
    from dunet_deploy.machine import cpu_features

    cpu = cpu_features()
    return "|".join([socket.gethostname(), str(cpu["model"]), str(cpu["family"]),
                     str(cpu["model_id"]), " ".join(cpu["flags"]), f"{_cores()} cores"])


def _read_calibrations(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # none yet, or unreadable: the rule decides
    return doc if isinstance(doc, dict) else {}


def calibrated_workers() -> int | None:
    """The worker count calibrated on this machine (:func:`machine_key`), or ``None``."""
    entry = _read_calibrations(calibration_path()).get(machine_key())
    workers = entry.get("workers") if isinstance(entry, dict) else None
    return workers if isinstance(workers, int) and not isinstance(workers, bool) \
        and workers >= 0 else None


def save_calibration(workers: int, measured: dict[str, Any]) -> Path:
    """Record ``workers`` as this machine's default (with what was measured); returns the file."""
    from dunet_deploy.artifacts import write_json

    path = calibration_path()
    doc = _read_calibrations(path)
    doc[machine_key()] = {"workers": int(workers), "measured": measured}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, doc)
    except OSError as exc:
        raise DunetError(f"{path}: cannot save the calibration ({exc.strerror})") from None
    return path


@contextlib.contextmanager
def _worker_environment() -> Iterator[None]:
    """Within the block: BLAS thread variables at 1 and SIGINT/SIGTERM blocked (this thread).

    A process started inside inherits both (the signal mask survives ``exec``).
    Blocked, not ignored: a signal that arrives meanwhile stays pending and is
    handled when the caller's mask is restored at the end (an ignored one would
    be dropped, and the run would go on as if none had come). The caller's
    environment is restored first.
    """
    saved_env = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)  # a pending signal acts here


def _context() -> Any:
    """The multiprocessing context, its fork server already running with the worker environment.

    The fork server preloads numpy (through this module), so thread variables
    set later, in a worker initializer, come too late for OpenBLAS; and a
    Ctrl-C while it imports would print its traceback.
    """
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        from multiprocessing import forkserver, resource_tracker

        ctx.set_forkserver_preload(["dunet_deploy.runtime._forkserver_signals",
                                    "dunet_deploy.runtime.workers"])
        # The fork server starts the resource tracker first, which unblocks both
        # signals once it runs: start it before they are blocked.
        resource_tracker.ensure_running()
        with _worker_environment():
            forkserver.ensure_running()
    return ctx


_claims: Any = None  # in a worker: where it says which task it starts


def _init_worker(claims: Any) -> None:
    # The main process decides what an interrupt means (the fork server already
    # ignores both signals; a spawned worker may not).
    global _claims
    for sig in _WORKER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    _claims = claims


def _claimed(key: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a task after telling the main process which worker runs it (a blocking write)."""
    if _claims is not None:
        _claims.put((key, os.getpid()))
    return fn(*args)


def blas_threads() -> int | None:
    """Threads numpy's BLAS uses in this process (``None`` when it cannot be told).

    threadpoolctl's answer when it is installed, else OpenBLAS's own
    ``openblas_get_num_threads`` from the library numpy loaded.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        for pool in threadpool_info():
            if pool.get("user_api") == "blas":
                return int(pool["num_threads"])
        return None
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # make sure BLAS is loaded
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        libs = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    for lib in sorted(libs):
        handle = ctypes.CDLL(lib)
        for symbol in ("openblas_get_num_threads", "openblas_get_num_threads64_",
                       "scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads"):
            function = getattr(handle, symbol, None)
            if function is not None:
                function.restype = ctypes.c_int
                return int(function())
    return None


def _prepare_task(item: InputItem, spec: PreprocessSpec, resample: str,
                  reader: Reader, register: RegisterStage | None = None) -> PreparedVolume:
    return prepare_volume(item, spec, resample, reader, register)


def _write_task(grid: np.ndarray, prep: PreparedVolume, spec: PreprocessSpec,
                out: OutputOptions) -> CaseResult:
    return write_case(grid, prep, spec, out)


def death_message(exitcode: int | None) -> str:
    """``worker process died (signal 9)`` / ``(exit code 1)``: what a dead worker's case says."""
    if exitcode is not None and exitcode < 0:
        how = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += ", e.g. the out-of-memory killer"
    elif exitcode is not None:
        how = f"exit code {exitcode}"
    else:
        how = "unknown cause"
    return f"worker process died ({how})"


class _Task:
    """One submitted piece of work that can be submitted again to a new pool.

    Attributes:
        key: Unique number (the worker claims it before starting).
        item: The input it belongs to.
        args: ``_prepare_task`` or ``_write_task`` and its arguments.
        on_death: The value this task gives when its worker died running it.
    """

    def __init__(self, key: int, item: InputItem, args: tuple[Any, ...],
                 on_death: Callable[[str], Any]) -> None:
        self.key, self.item, self.args, self.on_death = key, item, args, on_death
        self.future: Future[Any] | None = None
        self.value: Any = None
        self.done = False

    def finish(self, value: Any) -> None:
        self.value, self.done = value, True


def _succeeded(future: Future[Any] | None) -> bool:
    """Whether a future finished with a value (not cancelled, no exception)."""
    return (future is not None and future.done() and not future.cancelled()
            and future.exception() is None)


class _Pool:
    """A process pool that replaces itself when a worker dies (see the module docstring).

    Args:
        workers: Processes, >= 1.
        out: Where cases are written (to remove a dead writer's temporary files).
    """

    #: Pool breaks in a row that no dead worker explains before every task in flight fails.
    MAX_UNEXPLAINED = 3

    def __init__(self, workers: int, out: OutputOptions) -> None:
        self._workers = workers
        self._out = out
        self._ctx = _context()
        self._claims = self._ctx.SimpleQueue()
        self._keys = 0
        self._live: dict[int, _Task] = {}
        self._unexplained = 0
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self._workers, mp_context=self._ctx,
                                   initializer=_init_worker, initargs=(self._claims,))

    def submit(self, item: InputItem, args: tuple[Any, ...],
               on_death: Callable[[str], Any]) -> _Task:
        task = self.known(item, args, on_death)
        self._send(task)
        return task

    def known(self, item: InputItem, args: tuple[Any, ...],
              on_death: Callable[[str], Any]) -> _Task:
        """A task not submitted (yet): finish it by hand when its value is known."""
        self._keys += 1
        return _Task(self._keys, item, args, on_death)

    def _send(self, task: _Task) -> None:
        while True:
            try:
                # A submit may start a worker: an interrupt halfway through sending it its
                # start-up data would make it print an EOFError traceback. Hold it until sent.
                with deferred_interrupts():
                    task.future = self.pool.submit(_claimed, task.key, *task.args)
                break
            except BrokenProcessPool:  # broke since the last result: replace it first
                self._recover()
        self._live[task.key] = task

    def result(self, task: _Task) -> Any:
        """The task's value; a broken pool is replaced (and the task rerun or failed) first."""
        while not task.done:
            assert task.future is not None
            try:
                task.finish(task.future.result())
            except BrokenProcessPool:
                self._recover()
        self._live.pop(task.key, None)
        return task.value

    def _drain_claims(self) -> dict[int, int]:
        claims: dict[int, int] = {}
        while not self._claims.empty():
            key, pid = self._claims.get()
            claims[key] = pid
        return claims

    def _recover(self) -> None:
        """Fail the tasks of dead workers, replace the pool, resubmit the other tasks in flight."""
        # Private, but the only record of the workers' exit codes: the exception has none.
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        claims = self._drain_claims()
        running: dict[int, _Task] = {}
        for key, task in self._live.items():  # in key order: a pid's last claim wins
            if key in claims and not _succeeded(task.future):
                running[claims[key]] = task
        # The pool asks the survivors to stop with SIGTERM, which workers ignore: one
        # still preparing holds a result nobody reads, so stop it here (preparing writes
        # no file); one writing finishes its case atomically.
        gone = set(mp_connection.wait([p.sentinel for p in processes], timeout=0.1))
        stopped = set()
        for proc in processes:
            busy = running.get(proc.pid)
            if proc.sentinel not in gone and busy is not None and busy.args[0] is _prepare_task:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                stopped.add(proc.pid)
        self.pool.shutdown(wait=True, cancel_futures=True)
        dead = {}
        for proc in processes:
            proc.join()
            if proc.exitcode and proc.pid not in stopped:
                dead[proc.pid] = proc.exitcode
        self.pool = self._new_pool()
        failed = [(task, dead[pid]) for pid, task in running.items() if pid in dead]
        self._unexplained = 0 if failed else self._unexplained + 1
        if self._unexplained >= self.MAX_UNEXPLAINED:
            exitcode = next(iter(dead.values()), None)
            failed = [(task, exitcode) for task in self._live.values()]
        for task, exitcode in failed:
            self._discard(task, started=task.key in claims)
            task.finish(task.on_death(death_message(exitcode)))
            del self._live[task.key]
        for task in list(self._live.values()):
            if not _succeeded(task.future):
                self._send(task)

    def _discard(self, task: _Task, *, started: bool) -> None:
        """Remove what a failed task wrote: its temporary files; a started write's outputs too.

        A writer killed between two renames (the mask in place, the probabilities
        still a temporary file) would leave half a case beside a summary that says
        it failed: a failed case keeps none of its files. A write that never
        started has written nothing (what is there is an earlier run's).
        """
        writer = self._out.writer
        writer.discard_partial(task.item, self._out)
        if started and task.args[0] is _write_task:
            for target in writer.targets(task.item, self._out).values():
                target.unlink(missing_ok=True)

    def cancel_pending(self) -> None:
        for task in self._live.values():
            if task.future is not None:
                task.future.cancel()

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)


def run_in_workers(
    open_predictor: Callable[[], Predictor],
    spec: PreprocessSpec,
    items: Sequence[InputItem],
    out: OutputOptions,
    *,
    on_result: Callable[[CaseResult], None] | None = None,
    results: list[CaseResult] | None = None,
    meter: Meter | None = None,
    reader: Reader = NIFTI_READER,
    register: RegisterStage | None = None,
) -> list[CaseResult]:
    """Segment ``items`` with reading/writing in worker processes and the model here.

    Args:
        open_predictor: Returns the network (loading it when needed); called
            once the first volumes are being read. It runs only in this process.
        spec: The model's preprocessing spec.
        items: Inputs in output order.
        out: Output folder, the run's options (``workers`` >= 1, ``prefetch``,
            ``batch_size``, ``resample``, what to write) and the writer.
        on_result: Called with each finished result, in input order.
        results: Finished results are appended here as they complete, so an
            interrupted caller still has them.
        meter: Traffic counter of a remote model (see ``pipeline.infer_case``).
        reader: Reads each input in the workers.
        register: The registration stage, run in the workers (``None``: none).

    Returns:
        ``results``: one :class:`CaseResult` per input, in order.
    """
    options = out.options
    if options.workers < 1:
        raise ValueError(f"workers must be >= 1, got {options.workers}")
    results = [] if results is None else results
    todo = deque(items)
    preparing: deque[_Task] = deque()
    writing: deque[_Task] = deque()
    pool = _Pool(options.workers, out)

    def prepare_died(item: InputItem) -> Callable[[str], PreparedVolume]:
        return lambda why: PreparedVolume(item, CaseResult(input=str(item.path)).fail(item.path,
                                                                                     why))

    def write_died(prep: PreparedVolume) -> Callable[[str], CaseResult]:
        return lambda why: prep.result.fail(prep.item.path, why)

    def collect(keep: int) -> None:
        while len(writing) > keep:
            result = pool.result(writing.popleft())
            results.append(result)
            if on_result is not None:
                on_result(result)

    def submit_prepares() -> None:
        while todo and len(preparing) < options.workers + options.prefetch:
            item = todo.popleft()
            preparing.append(pool.submit(item, (_prepare_task, item, spec, options.resample,
                                                reader, register), prepare_died(item)))

    try:
        submit_prepares()
        predict = open_predictor()  # the model loads while the workers read
        while preparing:
            prep = pool.result(preparing.popleft())
            submit_prepares()
            grid = infer_case(predict, spec, prep, options.batch_size, meter)
            args = (_write_task, grid, prep, spec, out)
            if grid is None:  # failed before writing: known without a worker
                task = pool.known(prep.item, args, write_died(prep))
                task.finish(prep.result)
            else:
                task = pool.submit(prep.item, args, write_died(prep))
            writing.append(task)
            collect(keep=options.workers)
        collect(keep=0)
    except BaseException:
        # Interrupted (or a bug): start nothing new; cases being written finish.
        pool.cancel_pending()
        pool.close(wait=True)
        for task in writing:
            if task.done:
                results.append(task.value)
                continue
            if _succeeded(task.future):
                assert task.future is not None
                results.append(task.future.result())
        raise
    pool.close()
    return results
