"""Serve models through a real Triton Inference Server, torch-free; ready means ready.

Two modes, one launcher (:class:`~dunet_deploy.runtime.tritonserver.TritonProcess`):

* :func:`serve_repository` (``dunet-serve --repository DIR``): a native model repository,
  e.g. the one ``dunet-export --format triton`` writes (``dunet`` + ``dunet_volume``);
* :func:`serve` (``dunet-serve --engine MODEL``): writes a temporary repository with two
  python-backend models and serves it:

  - ``<name>`` (default ``dunet``): input ``slabs`` ``FP32[-1, C, S, S]``, output
    ``prob`` ``FP32[-1, 1, S, S]``, Triton's dynamic batcher in front of one
    :class:`~dunet_deploy.runtime.base.Runner` per instance
    (:mod:`dunet_deploy.serving.network_model` on MODEL, in place);
  - ``<name>_spec``: no batching; returns the model's
    :class:`~dunet_deploy.artifacts.ArtifactInfo` as JSON (output ``info``,
    ``BYTES[1]``) so clients can check that the server runs what they expect.

Either way every model is loaded before the endpoints open (Triton's ``none`` model
control mode), so the first 200 from ``/v2/health/ready`` means every model answers, and
``on_ready`` is called only after each model said ready.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dunet_deploy.artifacts import ArtifactInfo
from dunet_deploy.errors import DunetError
from dunet_deploy.runtime.tritonserver import (
    Endpoints,
    TritonProcess,
    stub_safe,
    stub_safe_tempdir,
)

SPEC_OUTPUT = "info"
READY_TIMEOUT_S = 300.0
ReadyCallback = Callable[[dict[str, Any]], None]


def spec_model_name(model_name: str) -> str:
    """Name of the companion model that returns the served model's description."""
    return f"{model_name}_spec"


def info_document(info: ArtifactInfo) -> dict[str, Any]:
    """What ``<name>_spec`` returns: the artefact description plus the spec digest."""
    return {**info.to_json_dict(), "spec_digest": info.spec.digest()}


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``dunet-serve --engine``.

    Attributes:
        model_path: ``.onnx`` or TensorRT ``.plan``.
        backend: runtime backend (``auto``, ``onnxruntime``, ``openvino``, ``tensorrt``).
        host: address every endpoint binds to (loopback by default).
        http_port: HTTP/REST port.
        grpc_port: gRPC port.
        metrics_port: Prometheus metrics port.
        max_batch_size: largest batch the dynamic batcher forms.
        max_queue_delay_us: how long the batcher waits to fill a batch.
        instances: model instances, each with its own runner.
        model_name: Triton model name.
        threads: backend threads per instance (``None``: backend default).
        precision: runtime precision (``auto``, ``fp32``, ``bf16``, ``fp16``).
        verbose: show Triton's own log.
    """

    model_path: Path
    backend: str = "auto"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instances: int = 1
    model_name: str = "dunet"
    threads: int | None = None
    precision: str = "auto"
    verbose: bool = False

    @property
    def endpoints(self) -> Endpoints:
        """Where the server listens."""
        return Endpoints(self.host, self.http_port, self.grpc_port, self.metrics_port)


def serve_repository(
    repository: str | os.PathLike[str],
    endpoints: Endpoints,
    *,
    verbose: bool = False,
    stop: threading.Event | None = None,
    on_ready: ReadyCallback | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Run ``tritonserver`` on a repository until SIGINT/SIGTERM (or ``stop``), then stop it.

    Args:
        repository: a Triton model repository (one folder with a ``config.pbtxt`` per model).
        endpoints: where to listen.
        verbose: show the server's log.
        stop: optional event that stops the server when set (tests, embedding).
        on_ready: called once every model answers ready, with ``{"models": [...],
            "http": URL, "grpc": URL, "metrics": URL}``.
        ready_timeout_s: how long the models may take to load.

    Raises:
        DunetError: a missing/empty repository, a busy port, no ``tritonserver``, or a
            server that fails to start or dies (one line from its log).
    """
    repo = Path(repository)
    if not repo.is_dir():
        raise DunetError(f"{repo}: no such model repository folder")
    if (repo / "config.pbtxt").is_file():
        raise DunetError(f"{repo}: is one model of a repository; serve the repository that "
                         f"holds it: {repo.parent}")
    configs = sorted(p for p in repo.glob("*/config.pbtxt") if p.is_file())
    if not configs:
        raise DunetError(f"{repo}: not a Triton model repository (no */config.pbtxt); "
                         "write one with dunet-export --format triton")
    _check_backends(configs)
    stop = stop or threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if main:
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
    server = TritonProcess(repo, endpoints, verbose=verbose)
    try:
        server.start()
        models = server.wait_ready(ready_timeout_s, stop)
        if models and on_ready is not None:
            on_ready({"models": models, **endpoints.urls()})
        while not stop.wait(0.5):
            server.check_alive()
    finally:
        server.stop()
        if main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


#: Triton platform -> the backend library that runs it.
_PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_CONFIG_KEY = re.compile(r'^\s*(backend|platform)\s*:\s*"([^"]*)"', re.MULTILINE)


def _check_backends(configs: list[Path]) -> None:
    """Refuse, before starting, a model whose Triton backend this tritonserver lacks.

    pytriton's server ships only the python backend; an ``onnx`` or ``trt`` export
    would otherwise fail in Triton's words ("unable to find backend library").

    Raises:
        DunetError: naming the model, the missing backend and the export that works.
    """
    from dunet_deploy.runtime.tritonserver import find_tritonserver

    backends = find_tritonserver().backends
    for config in configs:
        text = config.read_text(errors="replace")
        found = {m.group(1): m.group(2) for m in _CONFIG_KEY.finditer(text)}
        backend = found.get("backend") or _PLATFORM_BACKENDS.get(found.get("platform", ""), "")
        if backend and not (backends / backend).is_dir():
            raise DunetError(
                f"{config.parent}: needs Triton's {backend!r} backend, which this tritonserver "
                f"({backends}) does not have; export a python-backend repository instead: "
                "dunet-export CHECKPOINT -o OUT --format triton --triton-backend python"
            )


def write_engine_repository(cfg: ServeConfig, root: Path) -> ArtifactInfo:
    """The repository ``dunet-serve --engine`` serves: ``<name>`` and ``<name>_spec``.

    Returns:
        The model's description.
    """
    from dunet_deploy.artifacts import read_artifact_info
    from dunet_deploy.export.triton_repo import write_spec_model
    from dunet_deploy.export.triton_repo import write_triton_repo as write_model
    from dunet_deploy.runtime.base import backend_for

    if cfg.instances < 1 or cfg.max_batch_size < 1 or cfg.max_queue_delay_us < 0:
        raise DunetError("--instances and --max-batch-size must be >= 1, the delay >= 0")
    model = cfg.model_path.resolve()
    info = read_artifact_info(model)
    backend_for(model, cfg.backend)  # a backend that cannot run MODEL fails here, at once
    runtime = {"runtime.backend": cfg.backend, "runtime.precision": cfg.precision,
               "runtime.threads": str(cfg.threads or ""),
               "runtime.model_file": str(_model_link(model, root / cfg.model_name / "1"))}
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= cfg.max_batch_size]
    write_model(root, None, info, backend="python", max_batch_size=cfg.max_batch_size,
                preferred_batch_sizes=preferred, max_queue_delay_us=cfg.max_queue_delay_us,
                instances=cfg.instances, name=cfg.model_name, runtime=runtime)
    _link_model(model, Path(runtime["runtime.model_file"]))
    write_spec_model(root, info, spec_model_name(cfg.model_name))
    return info


def _model_link(model: Path, version_dir: Path) -> Path:
    """Where the served model's symlink goes: ``version_dir/model<suffix>``.

    The stub's Python cannot open a path with spaces or ``é``
    (:func:`~dunet_deploy.runtime.tritonserver.stub_safe`); the repository is in a
    plain temporary folder, and the link keeps the suffix that picks the backend.
    """
    suffix = model.suffix if stub_safe(model.suffix) else ""
    return version_dir / f"model{suffix}"


def _link_model(model: Path, link: Path) -> None:
    """``link`` (and its sidecar, for an engine) as symlinks to ``model``."""
    from dunet_deploy.artifacts import sidecar_path

    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(model)
    if sidecar_path(model).is_file():
        sidecar_path(link).symlink_to(sidecar_path(model))


def serve(cfg: ServeConfig, stop: threading.Event | None = None,
          on_ready: ReadyCallback | None = None) -> None:
    """Serve one model file (``dunet-serve --engine``) until SIGINT/SIGTERM or ``stop``.

    Args:
        cfg: server options.
        stop: optional event that stops the server when set.
        on_ready: see :func:`serve_repository`.

    Raises:
        DunetError: bad model, busy port, no server, or a server that fails to start.
    """
    root = stub_safe_tempdir("dunet-serve-repo-")
    try:
        write_engine_repository(cfg, root)
        serve_repository(root, cfg.endpoints, verbose=cfg.verbose, stop=stop,
                         on_ready=on_ready)
    finally:
        shutil.rmtree(root, ignore_errors=True)
