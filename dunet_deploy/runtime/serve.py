"""Serve a model through a real Triton Inference Server (PyTriton), torch-free.

The server hosts two Triton models:

* ``<name>`` (default ``dunet``): input ``slabs`` ``FP32[-1, C, S, S]``, output
  ``prob`` ``FP32[-1, 1, S, S]``, with Triton's dynamic batcher in front of
  one :class:`~dunet_deploy.runtime.base.Runner` per instance;
* ``<name>_spec``: no batching; returns the model's
  :class:`~dunet_deploy.artifacts.ArtifactInfo` as JSON (output ``info``,
  ``BYTES[1]``) so clients can check that the server runs what they expect.

For GPU fleets the native model repository written by ``dunet-export --format
triton`` is the better fit; this server is for running our runtime's backends
(OpenVINO bf16 on CPUs, ONNX Runtime, TensorRT) behind Triton's protocol.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError, first_line

SPEC_OUTPUT = "info"


def spec_model_name(model_name: str) -> str:
    """Name of the companion model that returns the served model's description."""
    return f"{model_name}_spec"


def info_document(info: ArtifactInfo) -> dict[str, Any]:
    """What ``<name>_spec`` returns: the artefact description plus the spec digest."""
    return {**info.to_json_dict(), "spec_digest": info.spec.digest()}


def fix_libpython_path(env: MutableMapping[str, str] | None = None) -> None:
    """Make the Triton server load *this* interpreter's libpython.

    PyTriton's Python backend stub links ``libpython3.x.so``; when the running
    interpreter is not the system one, the server would otherwise pick the
    system library and the backend fails to start. The server inherits our
    environment, so prefixing ``LD_LIBRARY_PATH`` with ``LIBDIR`` is enough.
    """
    if env is None:
        env = os.environ
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not ldlib or not (Path(libdir) / ldlib).exists():
        return
    current = env.get("LD_LIBRARY_PATH", "")
    if current.split(":")[0] != libdir:
        env["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


@dataclass(frozen=True)
class ServeConfig:
    """Options of ``dunet-serve``.

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


def _make_infer(runner: Any) -> Callable[..., dict[str, np.ndarray]]:
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        slabs = np.ascontiguousarray(inputs[INPUT_NAME], dtype=np.float32)
        return {OUTPUT_NAME: np.asarray(runner.infer(slabs), dtype=np.float32)}

    return infer


def serve(cfg: ServeConfig, stop: threading.Event | None = None,
          on_ready: Callable[[dict[str, str]], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM (or ``stop`` is set), then shut it down cleanly.

    Args:
        cfg: server options.
        stop: optional event that stops the server when set (tests, embedding).
        on_ready: called with the endpoint URLs once the server accepts requests.

    Raises:
        DunetError: bad model, missing PyTriton, or a server that fails to start.
    """
    from dunet_deploy.runtime.base import open_runner

    if cfg.instances < 1 or cfg.max_batch_size < 1 or cfg.max_queue_delay_us < 0:
        raise DunetError("--instances and --max-batch-size must be >= 1, the delay >= 0")
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise DunetError(
            "dunet-serve needs PyTriton: pip install 'dunet-deploy[serve]'"
        ) from None

    runners = [
        open_runner(cfg.model_path, backend=cfg.backend, threads=cfg.threads,
                    precision=cfg.precision)
        for _ in range(cfg.instances)
    ]
    info: ArtifactInfo = runners[0].info
    spec = info.spec
    s = spec.image_size
    doc = json.dumps(info_document(info)).encode()

    def describe(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        return [{SPEC_OUTPUT: np.array([doc], dtype=object)} for _ in requests]

    fix_libpython_path()
    stop = stop or threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
    triton_cfg = TritonConfig(
        http_address=cfg.host, http_port=cfg.http_port,
        grpc_address=cfg.host, grpc_port=cfg.grpc_port,
        metrics_address=cfg.host, metrics_port=cfg.metrics_port,
        exit_timeout_secs=5,
    )
    preferred = [b for b in (4, 8, 16, 32, 64) if b <= cfg.max_batch_size] or None
    try:
        with Triton(config=triton_cfg) as triton:
            triton.bind(
                model_name=cfg.model_name,
                infer_func=[_make_infer(r) for r in runners],
                inputs=[Tensor(name=INPUT_NAME, dtype=np.float32, shape=(spec.in_channels, s, s))],
                outputs=[Tensor(name=OUTPUT_NAME, dtype=np.float32, shape=(1, s, s))],
                config=ModelConfig(
                    max_batch_size=cfg.max_batch_size,
                    batcher=DynamicBatcher(
                        max_queue_delay_microseconds=cfg.max_queue_delay_us,
                        preferred_batch_size=preferred,
                    ),
                ),
                strict=True,
            )
            triton.bind(
                model_name=spec_model_name(cfg.model_name),
                infer_func=describe,
                inputs=[Tensor(name="request", dtype=np.int32, shape=(1,))],
                outputs=[Tensor(name=SPEC_OUTPUT, dtype=bytes, shape=(1,))],
                config=ModelConfig(batching=False),
            )
            triton.run()
            urls = {
                "http": f"http://{cfg.host}:{cfg.http_port}",
                "grpc": f"grpc://{cfg.host}:{cfg.grpc_port}",
                "metrics": f"http://{cfg.host}:{cfg.metrics_port}/metrics",
            }
            if on_ready is not None:
                on_ready(urls)
            while not stop.wait(0.5):
                if not triton.is_alive():
                    raise DunetError("the Triton server process died; see its log above")
    except DunetError:
        raise
    except Exception as e:  # PyTriton raises its own exception tree for start-up failures
        msg = first_line(e)
        raise DunetError(f"Triton server failed: {msg}") from None
    finally:
        for r in runners:
            r.close()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        sys.stdout.flush()
