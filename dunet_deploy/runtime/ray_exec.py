"""Ray Data batch inference: ``dunet-infer``'s stages spread over a Ray cluster.

Two layouts (:attr:`ClusterOptions.layout`). ``split``, the default when the
actors hold GPUs::

    driver:  inputs -> rows {index, item}          (one block per volume: each one streams alone)
    CPU tasks:    prepare  read + to_network       -> {index, payload: PreparedVolume}
    actor pool:   InferActor (model loaded once)   -> {index, payload: (PreparedVolume, grid)}
    CPU tasks:    write    finish_prediction + save -> {index, result: CaseResult}
    driver:  one CaseResult per input, put back into input order

so that a GPU never waits for a read. ``fused``, the default on a cluster
without GPUs: one :class:`CaseActor` per CPU (by ``cpus_per_actor``) runs
whole cases, read to write, and only the input's path and the result move
through Ray. There the CPUs are the only resource, and moving each volume
(~28 MB prepared) between processes cost Ray more CPU than our stages do
(benchmarks/results/2026-12-06-amd-epyc-zen3-2c/ray_overhead*.md).

Ray Data's streaming executor keeps only a few volumes in flight per stage
(back-pressure on the object store), so memory stays bounded however long the
cohort. A bad volume fails its own case, as in ``dunet-infer``. An actor that
dies (killed, out of memory, its node lost) is restarted by Ray and the batch
it held is sent again; a write task that dies is retried. Every file is
written to a temporary name and renamed, so a retried case rewrites the same
bytes and never leaves a partial file, and the driver keeps one result per
input.

Every task and actor gets the run's :class:`InferenceOptions` (the object
``dunet-infer`` builds for every path); :class:`ClusterOptions` says where and
how wide. The stage functions are reached through one adapter,
:class:`_Stages`, and each actor loads its model through a
:class:`~dunet_deploy.Segmenter` whose backend gets as many threads as the
actor holds CPUs (unless ``threads`` is set). Ray is imported only when a run
starts (the ``ray`` extra); the actors are plain Python and run without Ray.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from dunet_deploy.artifacts import ArtifactInfo, read_artifact_info
from dunet_deploy.choices import RAY_LAYOUTS
from dunet_deploy.errors import DunetError, one_line
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.core import Predictor
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.pipeline import (
    NIFTI_READER,
    NIFTI_WRITER,
    CaseResult,
    InputItem,
    OutputOptions,
    PreparedVolume,
    Reader,
    Writer,
    infer_case,
    prepare_output_dir,
    prepare_volume,
    write_case,
)
from dunet_deploy.runtime.register_stage import RegisterStage
from dunet_deploy.runtime.segmenter import Segmenter
from dunet_deploy.runtime.shards import Shard
from dunet_deploy.spec import PreprocessSpec

__all__ = [
    "CaseActor",
    "ClusterOptions",
    "InferActor",
    "Pool",
    "RayRun",
    "RunnerFactory",
    "actor_pool",
    "import_ray",
    "run_on_ray",
    "segment_on_ray",
]

RAY_EXTRA = "pip install 'dunet-deploy[ray]'"
_PICKLE = pickle.HIGHEST_PROTOCOL


def import_ray() -> ModuleType:
    """``ray`` with Ray Data, imported on first use.

    Raises:
        DunetError: one line naming the ``ray`` extra when Ray Data cannot be imported.
    """
    try:
        import ray
        import ray.data  # (pyarrow and pandas come with it)
    except ImportError as exc:
        raise DunetError(f"Ray Data is not installed ({one_line(exc)}): {RAY_EXTRA}") from None
    return ray


# ------------------------------------------------------------------- options
@dataclass(frozen=True)
class ClusterOptions:
    """Where and how wide the run goes.

    Attributes:
        address: A running cluster (``"127.0.0.1:6379"``, ``"auto"``);
            ``None``: Ray's own choice (``RAY_ADDRESS``, else a local
            cluster started for this run).
        actors: Model actors (``None``: see :func:`actor_pool`).
        gpus_per_actor: GPUs each actor holds (``None``: 1 on a cluster with
            GPUs, else 0).
        cpus_per_actor: CPUs each actor holds.
        cpus_per_task: CPUs each read/preprocess and postprocess/write task holds
            (``split`` layout).
        layout: One of :data:`RAY_LAYOUTS`: where the stages run.
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    cpus_per_task: float = 1.0
    layout: str = "auto"

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise DunetError(f"actors must be >= 1, got {self.actors}")
        if self.layout not in RAY_LAYOUTS:
            raise DunetError(f"layout must be one of {', '.join(RAY_LAYOUTS)}, "
                             f"got {self.layout!r}")
        for name, value in (("gpus_per_actor", self.gpus_per_actor),
                            ("cpus_per_actor", self.cpus_per_actor),
                            ("cpus_per_task", self.cpus_per_task)):
            if value is not None and not value >= 0:
                raise DunetError(f"{name} must be >= 0, got {value}")


class Pool(NamedTuple):
    """The model actors of a run: how many, GPUs each, and the layout they run in."""

    actors: int
    gpus_per_actor: float
    layout: str


def actor_pool(resources: Mapping[str, float], cluster: ClusterOptions) -> Pool:
    """How many model actors, GPUs each, and which layout, for a cluster's total resources.

    With GPUs, one actor per ``gpus_per_actor`` GPUs (layout ``split`` unless
    asked otherwise). Without: layout ``fused``, one actor per
    ``cpus_per_actor`` CPUs; asked for ``split``, half the CPUs (the other half
    reads and writes). At least one actor.

    Args:
        resources: ``ray.cluster_resources()`` (``"CPU"``, ``"GPU"``).
        cluster: What was asked for.

    Returns:
        The pool.

    Raises:
        DunetError: when the pool cannot fit, or (``split``) leaves no CPU for
            the tasks (the run would wait forever).
    """
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    per = (1.0 if gpus >= 1 else 0.0) if cluster.gpus_per_actor is None else cluster.gpus_per_actor
    layout = cluster.layout if cluster.layout != "auto" else ("split" if per > 0 else "fused")
    if cluster.actors is not None:
        actors = cluster.actors
    elif per > 0:
        actors = int(gpus // per)
    elif layout == "fused":
        per_cpu = cluster.cpus_per_actor or 1.0
        actors = max(1, int(cpus // per_cpu))
    else:
        actors = max(1, int(cpus // 2))
    if per > 0 and actors * per > gpus:
        raise DunetError(f"{actors} actor(s) with gpus_per_actor {per:g} need "
                         f"{actors * per:g} GPUs; the cluster has {gpus:g}")
    if actors < 1:
        raise DunetError(f"gpus_per_actor {per:g}: the cluster's {gpus:g} GPU(s) fit no actor")
    left = cpus - actors * cluster.cpus_per_actor
    if layout == "fused" and left < 0:
        raise DunetError(f"{actors} actor(s) with cpus_per_actor {cluster.cpus_per_actor:g} "
                         f"need {actors * cluster.cpus_per_actor:g} CPUs; the cluster has "
                         f"{cpus:g}")
    if layout == "split" and left < cluster.cpus_per_task:
        raise DunetError(f"{actors} actor(s) with cpus_per_actor {cluster.cpus_per_actor:g} "
                         f"leave {max(left, 0):g} of the cluster's {cpus:g} CPUs for reading "
                         f"and writing; ask for fewer actors")
    return Pool(actors, per, layout)


# ------------------------------------------------------------------- stages
#: Builds the runner from the model path and its metadata instead of a local backend (a
#: Triton client, a stand-in); it must be picklable and importable on every node.
RunnerFactory = Callable[[Path, ArtifactInfo], Runner]


class _Stages:
    """The stage functions this module runs: read+preprocess, network, postprocess+write.

    The one place that knows them; everything else moves their inputs and outputs.

    Args:
        spec: The model's preprocessing spec.
        options: The run's options, with the model's defaults applied.
        reader: Reads each input (NIfTI files, DICOM series).
        register: The registration stage (``None``: none).
        writer: Writes each case's outputs (NIfTI, DICOM SEG).
    """

    def __init__(self, spec: PreprocessSpec, options: InferenceOptions,
                 reader: Reader = NIFTI_READER, register: RegisterStage | None = None,
                 writer: Writer = NIFTI_WRITER) -> None:
        self.spec = spec
        self.options = options
        self.reader = reader
        self.register = register
        self.writer = writer

    def prepare(self, item: InputItem) -> PreparedVolume:
        return prepare_volume(item, self.spec, self.options.resample, reader=self.reader,
                              register=self.register)

    def infer(self, predict: Predictor, prep: PreparedVolume) -> np.ndarray | None:
        return infer_case(predict, self.spec, prep, self.options.batch_size)

    def write(self, grid: np.ndarray | None, prep: PreparedVolume, out_dir: Path) -> CaseResult:
        if grid is None:  # failed before the network or in it
            return prep.result
        out = self.output(out_dir)
        # A try of this case that was killed mid-write (task or actor, its node lost) left
        # its temporary files: this try replaces them.
        self.writer.discard_partial(prep.item, out)
        return write_case(grid, prep, self.spec, out)

    def output(self, out_dir: Path) -> OutputOptions:
        return OutputOptions(out_dir, self.options, self.writer)

    def discard_partial(self, items: Sequence[InputItem], out_dir: Path) -> None:
        """Remove what killed tries of these cases left in ``out_dir`` (temporary files)."""
        if not out_dir.is_dir() or not any(p.name.startswith(".") and ".tmp" in p.name
                                           for p in out_dir.iterdir()):
            return  # (the usual case: one listing, not one per case)
        out = self.output(out_dir)
        for item in items:
            self.writer.discard_partial(item, out)


class _Clock:
    """One stage's cost for one case, measured where it runs (task or actor).

    Wall seconds, CPU seconds of the thread that runs the stage, and the
    seconds of that spent pickling and unpickling the payloads. Each stage
    adds ``[wall, cpu, pickle, end]`` (``end``: ``time.time()`` when it
    finished) under its name to the row's ``timing`` column (JSON), which
    travels with the case to the driver: see :attr:`RayRun.timing`.
    """

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        self.pickle_s = 0.0

    def loads(self, blob: bytes) -> Any:
        t0 = time.perf_counter()
        obj = pickle.loads(blob)
        self.pickle_s += time.perf_counter() - t0
        return obj

    def dumps(self, obj: Any) -> bytes:
        t0 = time.perf_counter()
        blob = pickle.dumps(obj, protocol=_PICKLE)
        self.pickle_s += time.perf_counter() - t0
        return blob

    def add_to(self, timing: str | None, stage: str) -> str:
        doc = json.loads(timing) if timing else {}
        doc[stage] = [time.perf_counter() - self.wall, time.thread_time() - self.cpu,
                      self.pickle_s, time.time()]
        return json.dumps(doc)


#: The stages of :attr:`RayRun.timing`, in pipeline order.
TIMED_STAGES = ("prepare", "infer", "write")


def _prepare_row(row: dict[str, Any], stages: _Stages) -> dict[str, Any]:
    clock = _Clock()
    prep = stages.prepare(clock.loads(row["item"]))
    payload = clock.dumps(prep)
    return {"index": row["index"], "payload": payload,
            "timing": clock.add_to(None, "prepare")}


def _write_row(row: dict[str, Any], stages: _Stages, out_dir: str) -> dict[str, Any]:
    clock = _Clock()
    prep, grid = clock.loads(row["payload"])
    result = stages.write(grid, prep, Path(out_dir))
    blob = clock.dumps(result)
    return {"index": row["index"], "result": blob, "runner": row["runner"],
            "timing": clock.add_to(row.get("timing"), "write")}


def _column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (bytes, str): one Ray Data column."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class _ModelActor:
    """One model load in a Ray actor (or in-process): what both layouts' actors share.

    Args:
        model: The exported model (``.onnx``, or ``.plan`` with its sidecar).
        options: How the model runs (backend, precision, TTA, batch size, ...):
            the same :class:`InferenceOptions` as ``dunet-infer``'s.
        runner_factory: Builds the runner instead of a local backend (see
            :class:`~dunet_deploy.Segmenter`).
        stages: The run's stages (``None``: the model's, reading and writing NIfTI).
    """

    def __init__(self, model: str | os.PathLike[str], options: InferenceOptions,
                 runner_factory: RunnerFactory | None = None,
                 stages: _Stages | None = None) -> None:
        self._segmenter = Segmenter(model, options, runner_factory=runner_factory).open()
        self._stages = stages or _Stages(self._segmenter.spec, self._segmenter.options)
        self._predict = self._segmenter.predictor()
        self._described = json.dumps(self._segmenter.describe(), default=str)

    @property
    def runner(self) -> Runner:
        """The loaded runner."""
        return self._segmenter.runner

    def close(self) -> None:
        """Release the backend."""
        self._segmenter.close()


class InferActor(_ModelActor):
    """The network stage as a Ray actor (layout ``split``): one model load, then any batches.

    Plain Python: ``InferActor(model, options)(batch)`` runs in-process too.
    """

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run the network on a batch of prepared volumes.

        Args:
            batch: ``index`` int ``[B]`` and ``payload`` ``[B]`` pickled
                :class:`PreparedVolume` objects; optionally ``timing`` ``[B]``
                (JSON) the stages' costs so far.

        Returns:
            ``index`` ``[B]``, ``payload`` ``[B]`` pickled ``(PreparedVolume,
            grid or None)``, ``runner`` ``[B]`` the runner's description
            (JSON), for the summary, and ``timing`` ``[B]`` with this stage's
            cost added (see :class:`_Clock`).
        """
        timings = batch.get("timing")
        payloads, timed = [], []
        for i, blob in enumerate(batch["payload"]):
            clock = _Clock()
            prep: PreparedVolume = clock.loads(blob)
            grid = self._stages.infer(self._predict, prep)
            payloads.append(clock.dumps((prep, grid)))
            timed.append(clock.add_to(None if timings is None else timings[i], "infer"))
        return {"index": np.asarray(batch["index"]), "payload": _column(payloads),
                "runner": _column([self._described] * len(payloads)), "timing": _column(timed)}


class CaseActor(_ModelActor):
    """Whole cases in a Ray actor (layout ``fused``): read, preprocess, network, write.

    Only the input (pickled :class:`InputItem`) comes in and the
    :class:`CaseResult` goes out. Plain Python:
    ``CaseActor(model, options, out_dir=...)(batch)`` runs in-process too.

    Args:
        model, options, runner_factory, stages: As :class:`InferActor`.
        out_dir: The run's output folder (absolute; shared by the nodes).
    """

    def __init__(self, model: str | os.PathLike[str], options: InferenceOptions,
                 runner_factory: RunnerFactory | None = None, stages: _Stages | None = None,
                 *, out_dir: str) -> None:
        super().__init__(model, options, runner_factory, stages)
        self._out_dir = Path(out_dir)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Segment a batch of inputs, writing their outputs.

        Args:
            batch: ``index`` int ``[B]`` and ``item`` ``[B]`` pickled :class:`InputItem`.

        Returns:
            ``index`` ``[B]``, ``result`` ``[B]`` pickled :class:`CaseResult`,
            ``runner`` ``[B]`` (JSON) and ``timing`` ``[B]``: ``prepare``,
            ``infer`` and ``write`` measured as in the ``split`` layout.
        """
        results, timed = [], []
        for blob in batch["item"]:
            clock = _Clock()
            prep = self._stages.prepare(clock.loads(blob))
            timing = clock.add_to(None, "prepare")
            clock = _Clock()
            grid = self._stages.infer(self._predict, prep)
            timing = clock.add_to(timing, "infer")
            clock = _Clock()
            results.append(clock.dumps(self._stages.write(grid, prep, self._out_dir)))
            timed.append(clock.add_to(timing, "write"))
        return {"index": np.asarray(batch["index"]), "result": _column(results),
                "runner": _column([self._described] * len(results)), "timing": _column(timed)}


# ---------------------------------------------------------------------- run
@dataclass
class RayRun:
    """What a run on Ray did, for the summary.

    Attributes:
        results: One :class:`CaseResult` per finished input, in input order.
        runner: The actors' runner description (``Runner.describe``), or
            ``{}`` when no volume reached an actor.
        actors: Model actors in the pool.
        gpus_per_actor: GPUs each actor held.
        layout: ``split`` or ``fused`` (see :data:`RAY_LAYOUTS`).
        resources: The cluster's total resources when the run started.
        timing: Per finished input (by index), each stage's cost measured
            inside its task or actor: ``{"prepare" | "infer" | "write":
            [wall s, CPU s, of which pickling s, finished at (time.time())]}``
            (``prepare``: unpickle, read, preprocess, pickle; ``infer``: the
            actor's unpickle, network, pickle; ``write``: unpickle,
            postprocess, write, pickle).
    """

    results: list[CaseResult] = field(default_factory=list)
    runner: dict[str, Any] = field(default_factory=dict)
    actors: int = 0
    gpus_per_actor: float = 0.0
    layout: str = ""
    resources: dict[str, float] = field(default_factory=dict)
    timing: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def stage_seconds(self) -> dict[str, dict[str, float]]:
        """:attr:`timing` summed over the cases: ``{stage: {"wall", "cpu", "pickle"}}`` seconds."""
        return {stage: {key: round(sum(t[stage][i] for t in self.timing.values()
                                       if stage in t), 6)
                        for i, key in enumerate(("wall", "cpu", "pickle"))}
                for stage in TIMED_STAGES}


def _connect(ray: ModuleType, address: str | None) -> bool:
    """Connect to (or start) a cluster; ``True`` when this call did, so it shuts down after.

    ``ray.init`` replaces the process's SIGTERM handler with one that exits at
    once; the caller's handlers are put back, so that a SIGTERM stops the run
    as in every other path (finished cases kept and recorded).
    """
    if ray.is_initialized():
        return False
    held = {}
    if threading.current_thread() is threading.main_thread():
        held = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise DunetError(f"Ray cluster {address}: cannot connect ({one_line(exc)})") from None
    finally:
        for sig, handler in held.items():
            if handler is not None:
                signal.signal(sig, handler)
    # Ray Data reports each dataset's start and end at INFO: a run reports its own cases.
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def run_on_ray(
    model: str | os.PathLike[str],
    items: Sequence[InputItem],
    out_dir: str | os.PathLike[str],
    options: InferenceOptions | None = None,
    cluster: ClusterOptions | None = None,
    *,
    runner_factory: RunnerFactory | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    run: RayRun | None = None,
    reader: Reader = NIFTI_READER,
    register: RegisterStage | None = None,
    writer: Writer = NIFTI_WRITER,
) -> RayRun:
    """Segment ``items`` on a Ray cluster, writing into ``out_dir`` (which every node must see).

    Args:
        model: The exported model; every node reads it at this path.
        items: Inputs (``expand_inputs``), in output order.
        out_dir: Existing output folder (shared by the nodes).
        options: How each stage runs (``tta`` / ``min_lesion_mm3`` left
            ``None`` take the model's defaults); ``workers`` and ``prefetch``
            are not used (Ray's tasks read and write).
        cluster: Where and how wide (default: Ray's own cluster choice).
        runner_factory: Builds each actor's runner instead of a local backend
            (picklable, importable on every node).
        on_result: Called with each finished result, in completion order.
        run: Filled in as results arrive, so an interrupted caller still has
            them (in input order once the run stops).
        reader: Reads each input in the read tasks (NIfTI, DICOM series).
        register: The registration stage, run in the read tasks.
        writer: Writes each case's outputs in the write tasks.

    Returns:
        ``run``, with one result per input in input order.

    Raises:
        DunetError: Ray missing, the cluster unreachable, or a pool that cannot fit.
    """
    ray = import_ray()
    cluster = cluster or ClusterOptions()
    run = RayRun() if run is None else run
    info = read_artifact_info(model)
    spec = info.spec
    options, _ = (options or InferenceOptions()).with_model_defaults(info.inference)
    if not items:
        return run
    stages = _Stages(spec, options, reader, register, writer)
    started = _connect(ray, cluster.address)
    done: dict[int, CaseResult] = {}
    try:
        run.resources = {k: float(v) for k, v in ray.cluster_resources().items()
                         if k in ("CPU", "GPU", "memory", "object_store_memory")}
        pool = actor_pool(run.resources, cluster)
        run.actors, run.gpus_per_actor, run.layout = pool
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        # The tasks and actors run in other folders: they get absolute paths, and the
        # results are given back the paths as this run was given them.
        ds = ray.data.from_items(
            [{"index": i, "item": pickle.dumps(_absolute(item), protocol=_PICKLE)}
             for i, item in enumerate(items)], override_num_blocks=len(items))
        actor_kwargs = {"model": str(Path(model).absolute()),
                        "options": _actor_options(options, cluster),
                        "runner_factory": runner_factory}
        actor_args = {"batch_size": 1, "batch_format": "numpy",
                      "compute": ray.data.ActorPoolStrategy(size=pool.actors),
                      "num_cpus": cluster.cpus_per_actor, "num_gpus": pool.gpus_per_actor}
        out = str(Path(out_dir).absolute())
        if pool.layout == "fused":
            ds = ds.map_batches(CaseActor, fn_constructor_kwargs={
                **actor_kwargs, "stages": stages, "out_dir": out}, **actor_args)
        else:
            # Reading spreads over the nodes. A remote-args function (rather than plain
            # arguments) also keeps Ray Data from fusing this stage into the actors, where
            # it would run before the network in the same process instead of beside it.
            with warnings.catch_warnings():  # deprecated for Ray 2.64; ray is pinned to 2.60
                warnings.filterwarnings("ignore", message=".*ray_remote_args_fn")
                ds = ds.map(_prepare_row, fn_kwargs={"stages": stages},
                            num_cpus=cluster.cpus_per_task, ray_remote_args_fn=_spread)
            ds = ds.map_batches(InferActor, fn_constructor_kwargs=actor_kwargs, **actor_args)
            ds = ds.map(_write_row, fn_kwargs={"stages": stages, "out_dir": out},
                        num_cpus=cluster.cpus_per_task)
        for row in _rows(ray, ds):
            index = int(row["index"])
            if index in done:  # a retried task's second answer
                continue
            result = _as_given(pickle.loads(row["result"]), items[index], Path(out_dir))
            done[index] = result
            if row.get("timing"):
                run.timing[index] = json.loads(row["timing"])
            if not run.runner and row["runner"]:
                run.runner = json.loads(row["runner"])
            if on_result is not None:
                on_result(result)
    finally:
        run.results.extend(done[i] for i in sorted(done))
        if started:
            ray.shutdown()
        stages.discard_partial([_absolute(item) for item in items], Path(out_dir).absolute())
    return run


def _actor_options(options: InferenceOptions, cluster: ClusterOptions) -> InferenceOptions:
    """The options an actor's backend runs with: as many threads as CPUs it holds, unless set.

    (A backend's default, one thread per core of the node, would have several
    actors on one node fight over its cores.)
    """
    if options.threads is not None or cluster.cpus_per_actor < 1:
        return options
    return options.replace(threads=int(cluster.cpus_per_actor))


def _absolute(item: InputItem) -> InputItem:
    return dataclasses.replace(item, path=item.path.absolute())


def _as_given(result: CaseResult, item: InputItem, out_dir: Path) -> CaseResult:
    """A result made from ``_absolute(item)``, with the paths as the run was given them."""
    shipped, given = str(item.path.absolute()), str(item.path)
    if result.message and result.message.startswith(shipped):
        result.message = given + result.message[len(shipped):]
    result.input = given
    for key in ("mask", "prob", "dicom_seg"):
        if getattr(result, key):
            setattr(result, key, str(out_dir / Path(getattr(result, key)).name))
    return result


def _rows(ray: ModuleType, ds: Any) -> Iterator[dict[str, Any]]:
    """``ds.iter_rows()``, a user error raised on the cluster as one line.

    A :class:`DunetError` raised in a task or actor (a node without the model
    file, a backend it lacks) comes back wrapped in Ray's errors; bugs keep
    their traceback.
    """
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as exc:
        cause: BaseException | None = exc
        seen = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, DunetError):
                raise DunetError(f"on the Ray cluster: {one_line(cause)}") from None
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise


def _spread() -> dict[str, Any]:
    return {"scheduling_strategy": "SPREAD"}


class _Described:
    """A runner's description standing in for the runner (which lived in the actors)."""

    def __init__(self, described: Mapping[str, Any]) -> None:
        self._described = dict(described)

    def describe(self) -> dict[str, Any]:
        return dict(self._described)


def segment_on_ray(
    model: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: InferenceOptions | None = None,
    cluster: ClusterOptions | None = None,
    *,
    runner_factory: RunnerFactory | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    shard: Shard | None = None,
    run: RayRun | None = None,
) -> dict[str, Any]:
    """What ``dunet-infer --ray`` does: expand the inputs, run them on Ray, write the summary.

    The same run as ``Segmenter.predict_files`` with the same options (shards
    and ``skip_existing`` included), its stages spread over the cluster. The
    summary has ``dunet-infer``'s shape plus ``"ray"`` (layout, actors, GPUs
    per actor, the cluster's resources, and ``stage_s``: each stage's wall, CPU
    and pickling seconds measured in the tasks and actors, summed over the
    cases; see :meth:`RayRun.stage_seconds`). On Ctrl-C or SIGTERM the finished cases
    are kept, the summary lists them (with ``"interrupted"``) and the
    interrupt is re-raised.

    Args:
        model: The exported model (same path on every node).
        inputs: Files, directories or glob patterns.
        out_dir: Output folder (created if missing; shared by the nodes).
        options: The run's options (see :func:`run_on_ray`).
        cluster: Where and how wide.
        runner_factory: Builds each actor's runner instead of a local backend.
        on_result: Called with each finished result, in completion order.
        shard: Segment only this shard's part of the inputs and write
            ``summary-I-of-N.json``.
        run: Filled in as the run goes (results, each case's
            :attr:`RayRun.timing`), for a caller that wants more than the summary.

    Returns:
        The summary document (also written to ``out_dir``).
    """
    t0 = time.perf_counter()
    seg = Segmenter(model, options, runner_factory=runner_factory, lazy=True)  # metadata only
    opts = seg.options.replace(workers=0)  # (the summary says so: Ray's tasks read and write)
    import_ray()  # before anything is created
    files = seg.plan_files(inputs, out_dir, opts, shard=shard)
    out = prepare_output_dir(out_dir)
    run = RayRun() if run is None else run
    journal = files.plan.journal(out)

    def finished(result: CaseResult) -> None:
        journal.record(result)
        if on_result is not None:
            on_result(result)

    interrupted: KeyboardInterrupt | None = None
    try:
        run_on_ray(model, files.plan.todo, out, opts, cluster, runner_factory=runner_factory,
                   on_result=finished, run=run, reader=files.reader, register=files.register,
                   writer=files.writer)
    except KeyboardInterrupt as exc:
        interrupted = exc
    summary = files.write_summary(
        _Described(run.runner) if run.runner else None,  # type: ignore[arg-type]
        run.results, out, load_s=0.0, wall_s=time.perf_counter() - t0,
        inference=seg.inference_settings(), interrupted=interrupted,
        extra={"ray": {"layout": run.layout, "actors": run.actors,
                       "gpus_per_actor": run.gpus_per_actor,
                       "resources": run.resources, "stage_s": run.stage_seconds()}})
    journal.close()
    if interrupted is not None:
        raise interrupted
    return summary
