"""Clients of a Triton server (``dunet-infer --triton-url [--server-side]``).

* :class:`TritonRunner` (client side): preprocessing and the native-space inverse
  stay in the client; only slabs travel. ``infer`` splits a batch into requests of
  at most ``request_batch`` slabs and keeps up to ``in_flight`` of them on the wire
  at once (one client per worker thread, since tritonclient's clients are not
  thread-safe), so the server's dynamic batcher can merge requests from this and
  other clients.
* :func:`segment_server_side`: each file's bytes go to ``dunet_volume``, which runs
  the whole pipeline; the returned ``.nii.gz`` masks are written atomically.

Both wait for *model* readiness (with a timeout) before the first request, so a
client started while the server is still loading does not fail on a 404, both
count the bytes they put on the wire and receive (:func:`meter_wire`,
``summary.json``), and both record what the server really runs (backend and
precision resolved there, e.g. OpenVINO bf16 under ``precision auto``).

The server-side path sends the run's :class:`InferenceOptions` with every file
(request parameter :data:`OPTIONS_PARAMETER`); ``dunet_volume`` applies the
fields in :data:`SERVER_SIDE_FIELDS` and refuses any other that is not its
default (:func:`check_server_side`), so no option is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError, first_line, one_line
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.options import InferenceOptions
from dunet_deploy.runtime.serve import SPEC_OUTPUT, spec_model_name

#: How long a client waits for its model to answer ready before the first request.
READY_TIMEOUT_S = 60.0
VOLUME_MODEL = "dunet_volume"
#: Request parameter of ``dunet_volume`` that carries the run's options (JSON object).
OPTIONS_PARAMETER = "dunet_options"
#: Options a server-side run applies: the first four on the server, ``recursive`` in
#: the client's input search.
SERVER_SIDE_FIELDS = ("tta", "min_lesion_mm3", "resample", "batch_size", "recursive",
                      "register", "bias_correct")
#: Why each other option cannot apply when the server runs the whole pipeline.
_NOT_SERVER_SIDE = {
    "backend": "the server decides how its model runs",
    "precision": "the server decides how its model runs",
    "device": "the server decides how its model runs",
    "threads": "the server decides how its model runs",
    "cuda_graph": "the server decides how its model runs",
    "save_prob": "the server returns masks only, no probability maps",
    "prob_dtype": "the server returns masks only, no probability maps",
    "workers": "the server reads and writes; the client only sends files",
    "prefetch": "the server reads and writes; the client only sends files",
    "series": "the server reads NIfTI files only",
    "dicom_seg": "the server returns the NIfTI mask only",
}


def check_server_side(options: InferenceOptions) -> None:
    """Refuse options a server-side run cannot apply (set to other than their default).

    Raises:
        DunetError: ``"<option> <value>: not possible server-side (<why>)"``,
            with ``option`` set so a command prints its flag.
    """
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in SERVER_SIDE_FIELDS or value == f.default:
            continue
        why = _NOT_SERVER_SIDE.get(f.name, "not applied by the server")
        raise DunetError(f"{f.name} {value!r}: not possible server-side ({why})",
                         option=f.name)


def check_remote(options: InferenceOptions) -> None:
    """Refuse options a client of a remote model (:class:`TritonRunner`) cannot apply.

    The server loads and runs the model: ``backend``, ``precision``, ``device``,
    ``threads`` and ``cuda_graph`` are its settings, not the client's.

    Raises:
        DunetError: ``"<option> <value>: set by the Triton server ..."``.
    """
    for name in ("backend", "precision", "device", "threads", "cuda_graph"):
        value = getattr(options, name)
        if value != InferenceOptions.__dataclass_fields__[name].default:
            raise DunetError(f"{name} {value!r}: set by the Triton server that runs the "
                             "model, not by its client", option=name)


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` or ``grpc://host:port`` -> (protocol, ``host:port``).

    Raises:
        DunetError: ``url '...': expected ...`` (``option="url"``).
    """
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:  # a port out of range or not a number
        port = None
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or not port:
        raise DunetError(f"url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT",
                         option="url")
    return parsed.scheme, f"{parsed.hostname}:{port}"


def check_url(url: str) -> str:
    """Check ``url`` and that its protocol's client is installed, before any work.

    Returns:
        The protocol, ``http`` or ``grpc``.

    Raises:
        DunetError: a malformed URL or no tritonclient (``option="url"``).
    """
    protocol, _ = parse_url(url)
    _module(protocol)
    return protocol


def _module(protocol: str) -> Any:
    try:
        if protocol == "http":
            import tritonclient.http as th

            return th
        import tritonclient.grpc as tg

        return tg
    except ImportError:
        raise DunetError(f"url {protocol}://...: needs tritonclient: pip install "
                         "'dunet-deploy[serve]'", option="url") from None


def make_client(protocol: str, address: str, timeout_s: float) -> Any:
    """A tritonclient ``InferenceServerClient`` for ``http`` or ``grpc``."""
    mod = _module(protocol)
    if protocol == "http":
        return mod.InferenceServerClient(address, connection_timeout=timeout_s,
                                         network_timeout=timeout_s)
    return mod.InferenceServerClient(address)


def thread_client(local: threading.local, protocol: str, address: str, timeout_s: float) -> Any:
    """This thread's client in ``local`` (tritonclient's clients are not thread-safe)."""
    client = getattr(local, "client", None)
    if client is None:
        client = local.client = make_client(protocol, address, timeout_s)
    return client


def check_listening(url: str, timeout_s: float = 5.0) -> None:
    """Fail at once when nothing accepts connections at ``url`` (issue 19.8).

    The model-ready wait is for a server that is up and still loading; a refused
    or unreachable address would only make it wait its whole timeout.

    Raises:
        DunetError: ``Triton server URL: connection refused on HOST:PORT (...)``.
    """
    import socket

    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or 0
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        why = "connection refused" if isinstance(e, ConnectionRefusedError) else (
            e.strerror or str(e) or type(e).__name__).lower()  # "timed out", "no route ..."
        raise DunetError(f"Triton server {url}: {why} on {host}:{port} (is dunet-serve "
                         "running there? check --triton-url)") from None


def wait_model_ready(client: Any, url: str, model: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll until ``model`` answers ready (a server still loading is not an error).

    Raises:
        DunetError: nothing listens at ``url`` (at once, :func:`check_listening`), or
            not ready within ``timeout_s`` (naming the server and the model).
    """
    check_listening(url)
    deadline = time.monotonic() + timeout_s
    last = "not ready"
    while True:
        try:
            if client.is_model_ready(model):
                return
            last = "not ready"
        except Exception as e:  # connection refused/reset while the server starts
            last = first_line(e)
        if time.monotonic() >= deadline:
            raise DunetError(f"Triton server {url}: model {model!r} not ready after "
                             f"{timeout_s:.0f} s ({last[:200]})")
        time.sleep(0.2)


class TritonRunner(Runner):
    """Runner over a remote Triton model served by ``dunet-serve``.

    Args:
        url: ``http://HOST:PORT`` or ``grpc://HOST:PORT``; the scheme picks the protocol.
        expected: the description of the model the caller means to run; the
            server's must have the same spec digest, model name and arguments.
        model_name: Triton model name.
        request_batch: slabs per request.
        in_flight: concurrent requests.
        timeout_s: per-request network timeout.

    Shapes: ``infer(float32[N, C, S, S]) -> float32[N, 1, S, S]``.
    """

    backend = "triton"

    def __init__(
        self,
        url: str,
        expected: ArtifactInfo | None = None,
        model_name: str = "dunet",
        request_batch: int = 8,
        in_flight: int = 4,
        timeout_s: float = 60.0,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.protocol, self.address = parse_url(url)
        self.model_name = model_name
        self.request_batch = max(1, int(request_batch))
        self.in_flight = max(1, int(in_flight))
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="triton-client")
        self._lock = threading.Lock()
        self._sent = self._received = 0
        try:
            for model in (spec_model_name(model_name), model_name):
                wait_model_ready(self._client(), url, model, ready_timeout_s)
            info = self._fetch_info()
            if expected is not None:
                self._check(info, expected)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        super().__init__(url, info)

    # -- connection -----------------------------------------------------------
    def _client(self) -> Any:
        client = thread_client(self._local, self.protocol, self.address, self.timeout_s)
        if not hasattr(client, WIRE_ATTR):
            meter_wire(client, self.protocol)
        return client

    def _module(self) -> Any:
        return _module(self.protocol)

    @property
    def traffic(self) -> tuple[int, int]:
        """Wire bytes (sent, received) so far: the inference requests and responses
        (:func:`meter_wire`; model-readiness and description calls not counted)."""
        with self._lock:
            return self._sent, self._received

    def _call(self, model: str, inputs: list[Any]) -> Any:
        kwargs: dict[str, Any] = {}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        try:
            return self._client().infer(model, inputs, **kwargs)
        except Exception as e:  # connection refused/reset, timeouts, server-side errors
            msg = first_line(e)
            raise DunetError(f"Triton server {self.url} failed: {msg[:200]}") from None

    def _fetch_info(self) -> ArtifactInfo:
        mod = self._module()
        req = mod.InferInput("request", [1], "INT32")
        req.set_data_from_numpy(np.zeros(1, np.int32))
        res = self._call(spec_model_name(self.model_name), [req])
        raw = res.as_numpy(SPEC_OUTPUT)
        try:
            doc = json.loads(bytes(raw.reshape(-1)[0]))
        except (ValueError, TypeError, IndexError):
            raise DunetError(f"Triton server {self.url}: unreadable model description") from None
        return ArtifactInfo.from_json_dict(doc, f"Triton server {self.url}")

    def _check(self, got: ArtifactInfo, expected: ArtifactInfo) -> None:
        if got.spec.digest() != expected.spec.digest():
            raise DunetError(
                f"Triton server {self.url} serves a model with another preprocessing spec "
                f"(digest {got.spec.digest()} != {expected.spec.digest()})"
            )
        if (got.model_name, got.model_args) != (expected.model_name, expected.model_args):
            raise DunetError(
                f"Triton server {self.url} serves {got.model_name!r} {got.model_args}, "
                f"not {expected.model_name!r} {expected.model_args}"
            )

    # -- Runner interface -----------------------------------------------------
    def _request(self, chunk: np.ndarray) -> np.ndarray:
        mod = self._module()
        inp = mod.InferInput(INPUT_NAME, list(chunk.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(chunk, dtype=np.float32))
        out = self._call(self.model_name, [inp]).as_numpy(OUTPUT_NAME)
        sent, received = getattr(self._client(), WIRE_ATTR)  # this thread's client
        if out is None or out.shape != (chunk.shape[0], 1, *chunk.shape[2:]):
            raise DunetError(f"Triton server {self.url} returned a malformed '{OUTPUT_NAME}'")
        with self._lock:
            self._sent += sent
            self._received += received
        return out

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        s = self.spec.image_size
        return (None, self.spec.in_channels, s, s)

    @property
    def server_runtime(self) -> dict[str, str]:
        """What the server runs: ``backend``, ``precision``, ``device`` (resolved there).

        From the description the server returns; a server that does not say
        (an older ``dunet-serve``) gives the model's own precision, backend unknown.
        """
        runtime = self.info.extra.get("runtime")
        if isinstance(runtime, dict) and runtime.get("precision"):
            return {k: str(runtime.get(k, "unknown")) for k in ("backend", "precision", "device")}
        return {"backend": "unknown", "precision": self.info.precision, "device": "unknown"}

    @property
    def precision(self) -> str:
        return self.server_runtime["precision"]

    @property
    def device(self) -> str:
        return f"triton {self.url}"

    def describe(self) -> dict[str, Any]:
        """:meth:`Runner.describe` with the URL as the path and what the server runs."""
        runtime = self.server_runtime
        return {**super().describe(), "path": self.url, "server_backend": runtime["backend"],
                "server_device": runtime["device"]}

    def _run(self, slabs: np.ndarray) -> np.ndarray:
        # Several requests in flight let the server batch across chunks and clients.
        chunks = [slabs[i : i + self.request_batch]
                  for i in range(0, len(slabs), self.request_batch)]
        return np.concatenate(list(self._pool.map(self._request, chunks)), axis=0)

    def close(self) -> None:
        """Stop the worker threads (requests in flight finish first)."""
        if not self._closed:
            self._pool.shutdown(wait=True)
        super().close()


# ---------------------------------------------------------------- server side
def _server_params(client: Any, protocol: str, model: str) -> dict[str, str]:
    """A served model's string parameters (its ``config.pbtxt``), via the model-config API."""
    if protocol == "http":
        cfg = client.get_model_config(model)
    else:
        cfg = client.get_model_config(model, as_json=True).get("config", {})
    params = cfg.get("parameters", {}) or {}
    return {str(k): str((v or {}).get("string_value", "")) for k, v in params.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary name in the same folder (mode from the umask) and rename."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: Attribute of a metered tritonclient client: ``(sent, received)`` of its last inference.
WIRE_ATTR = "dunet_wire_bytes"


def meter_wire(client: Any, protocol: str) -> None:
    """Make ``client`` record the bytes its inference requests put on the wire.

    After each ``infer``, ``getattr(client, WIRE_ATTR)`` is ``(sent, received)``:
    for HTTP the request body posted and the response body's ``Content-Length``;
    for gRPC the serialized ``ModelInferRequest`` and ``ModelInferResponse``
    (``ByteSize()`` of the messages handed to and returned by the stub; the
    transport adds a 5-byte prefix and HTTP/2 framing). It wraps tritonclient's
    transport call (``_post`` / ``_client_stub``): tests check the figures
    against a loopback proxy that parses the traffic.
    """
    setattr(client, WIRE_ATTR, (0, 0))
    if protocol == "http":
        post = client._post

        def metered_post(request_uri: str, request_body: bytes, headers: Any,
                         query_params: Any) -> Any:
            response = post(request_uri, request_body, headers, query_params)
            length = response.get("Content-Length")
            setattr(client, WIRE_ATTR, (len(request_body), int(length) if length else 0))
            return response

        client._post = metered_post
        return
    client._client_stub = _MeteredStub(client._client_stub, client)


class _MeteredStub:
    """A gRPC service stub whose ``ModelInfer`` records its message sizes on ``owner``."""

    def __init__(self, stub: Any, owner: Any) -> None:
        self._stub, self._owner = stub, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)

    def ModelInfer(self, request: Any, **kwargs: Any) -> Any:  # gRPC's method name
        response = self._stub.ModelInfer(request=request, **kwargs)
        setattr(self._owner, WIRE_ATTR, (request.ByteSize(), response.ByteSize()))
        return response


class ServerSideClient:
    """Sends whole NIfTI files to ``dunet_volume`` and writes the masks it returns.

    Args:
        url: ``http://HOST:PORT`` or ``grpc://HOST:PORT``.
        expected: the model the caller means (the server's spec digest must match).
        model_name: the volume model's name.
        in_flight: files on the wire at once.
        timeout_s: per-request network timeout (a whole volume).
        ready_timeout_s: how long to wait for the model to answer ready.
    """

    def __init__(self, url: str, expected: ArtifactInfo | None = None,
                 model_name: str = VOLUME_MODEL, in_flight: int = 2,
                 timeout_s: float = 600.0, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.url = url
        self.protocol, self.address = parse_url(url)
        self.model_name = model_name
        self.in_flight = max(1, int(in_flight))
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        client = self._client()
        wait_model_ready(client, url, model_name, ready_timeout_s)
        try:
            params = _server_params(client, self.protocol, model_name)
        except Exception as e:  # tritonclient's exception tree
            raise DunetError(f"Triton server {url} failed: {first_line(e)[:200]}") from None
        self.info = ArtifactInfo.from_metadata(params, f"Triton server {url} {model_name}")
        if expected is not None and self.info.spec.digest() != expected.spec.digest():
            raise DunetError(
                f"Triton server {url} serves a model with another preprocessing spec "
                f"(digest {self.info.spec.digest()} != {expected.spec.digest()})"
            )

    def _client(self) -> Any:
        client = thread_client(self._local, self.protocol, self.address, self.timeout_s)
        if not hasattr(client, WIRE_ATTR):
            meter_wire(client, self.protocol)
        return client

    def request(self, data: bytes, name: str, options: InferenceOptions | None = None,
                ) -> tuple[bytes, dict[str, Any], tuple[int, int]]:
        """One file's bytes -> (mask ``.nii.gz`` bytes, the server's summary, wire bytes).

        ``options`` go with the file as the request parameter
        :data:`OPTIONS_PARAMETER` (``None``: the server's defaults).

        The wire bytes are ``(sent, received)``: the HTTP request and response
        bodies, or the serialized gRPC request and response messages
        (:func:`meter_wire`).

        Raises:
            DunetError: the server refused the file (its one-line reason, without
                the file name) or could not be reached.
        """
        mod = _module(self.protocol)
        inp = mod.InferInput("nifti", [1], "BYTES")
        inp.set_data_from_numpy(np.array([data], dtype=np.object_))
        kwargs: dict[str, Any] = {"request_id": name}
        if options is not None:
            kwargs["parameters"] = {OPTIONS_PARAMETER: json.dumps(options.to_dict())}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        try:
            res = self._client().infer(self.model_name, [inp], **kwargs)
        except Exception as e:  # refused files, connection refused/reset, timeouts
            status = str(e.status()) if hasattr(e, "status") and e.status() else ""
            text = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
            text = one_line(text or first_line(e), 300)
            if text.startswith(f"{name}: "):  # the server's own message about this file
                raise DunetError(f"{text[len(name) + 2:]} ({self.model_name} on {self.url})"
                                 ) from None
            raise DunetError(f"Triton server {self.url} failed: {status} {text}".strip()
                             ) from None
        wire = getattr(self._client(), WIRE_ATTR)
        mask, summary = res.as_numpy("mask"), res.as_numpy("summary")
        if mask is None or summary is None or mask.size != 1 or summary.size != 1:
            raise DunetError(f"Triton server {self.url} returned a malformed response")
        blob, raw = bytes(mask.reshape(-1)[0]), bytes(summary.reshape(-1)[0])
        try:
            doc = json.loads(raw)
        except ValueError:
            raise DunetError(f"Triton server {self.url} returned an unreadable summary") from None
        return blob, doc, wire


def _server_side_case(client: ServerSideClient, item: Any, out: Path,
                      options: InferenceOptions | None) -> Any:
    """Read, send, check and write one input; errors go into its result."""
    from dunet_deploy.data.nifti import load_nifti_bytes
    from dunet_deploy.runtime.pipeline import MASK_SUFFIX, CaseResult, output_stem

    result = CaseResult(input=str(item.path))
    if item.error is not None:
        return result.fail(item.path, item.error)
    try:
        t0 = time.perf_counter()
        if not item.path.is_file():
            raise DunetError(f"{item.path}: no such file")
        data = item.path.read_bytes()
        t1 = time.perf_counter()
        blob, doc, (sent, received) = client.request(data, item.path.name, options)
        t2 = time.perf_counter()
        mask = load_nifti_bytes(blob, f"mask of {item.path} from {client.url}")
        if list(mask.shape) != list(doc.get("shape", [])):
            raise DunetError(f"Triton server {client.url} returned a mask of shape "
                             f"{list(mask.shape)} for a volume of shape {doc.get('shape')}")
        target = out / f"{output_stem(item.path)}{MASK_SUFFIX}"
        _write_atomic(target, blob)
        t3 = time.perf_counter()
    except (DunetError, OSError) as exc:
        return result.fail(item.path, exc)
    result.mask = str(target)
    result.shape = [int(n) for n in doc["shape"]]
    result.zooms = [float(z) for z in doc["zooms"]]
    result.lesion_voxels = int(doc["lesion_voxels"])
    result.lesion_volume_mm3 = float(doc["lesion_volume_mm3"])
    result.times.update(read=t1 - t0, infer=t2 - t1, write=t3 - t2)
    result.bytes_sent, result.bytes_received = sent, received
    result.registration = doc.get("registration")
    result.warnings = [str(w) for w in doc.get("warnings") or []]
    result.server = doc
    return result


def segment_server_side(
    url: str,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    expected: ArtifactInfo | None = None,
    model_name: str = VOLUME_MODEL,
    in_flight: int = 2,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[Any], None] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    options: InferenceOptions | None = None,
) -> dict[str, Any]:
    """Segment files on the server (``dunet-infer --triton-url URL --server-side``).

    Each file's bytes go to ``model_name`` (``in_flight`` at once, in input order
    for the results); the returned masks are checked and written atomically as
    ``OUT/<name>_mask.nii.gz``; ``OUT/summary.json`` has a case per input with the
    bytes sent and received and the server's own summary.

    Args:
        url: the server.
        inputs: files, folders or globs (see :func:`dunet_deploy.runtime.pipeline.expand_inputs`).
        out_dir: output folder (created when missing).
        expected: the local model's description; the server's spec must match.
        model_name: the volume model.
        in_flight: concurrent requests.
        on_start: called with the number of inputs once the server is ready.
        on_result: called with each :class:`~dunet_deploy.runtime.pipeline.CaseResult`.
        ready_timeout_s: how long to wait for the model to answer ready.
        options: the run's options, sent with every file: the server applies
            ``tta``, ``min_lesion_mm3``, ``resample``, ``register``,
            ``bias_correct`` and ``batch_size`` (``None``: the server model's
            defaults); recorded in the summary.

    Returns:
        The summary document.

    Raises:
        DunetError: bad URL, an option the server cannot apply
            (:func:`check_server_side`), a server that is not ready or serves
            another spec, an output folder that cannot be created (per-file
            problems go in the summary).
    """
    from dunet_deploy import __version__
    from dunet_deploy.artifacts import write_json
    from dunet_deploy.machine import machine_info
    from dunet_deploy.runtime.pipeline import SUMMARY_NAME, expand_inputs, prepare_output_dir

    if options is not None:
        check_server_side(options)
    t_start = time.perf_counter()
    out = Path(out_dir)
    client = ServerSideClient(url, expected, model_name=model_name, in_flight=in_flight,
                              ready_timeout_s=ready_timeout_s)
    prepare_output_dir(out)
    items = expand_inputs(inputs, recursive=options is not None and options.recursive)
    if on_start is not None:
        on_start(len(items))
    results = []
    with ThreadPoolExecutor(client.in_flight, thread_name_prefix="triton-volume") as pool:
        for result in pool.map(lambda item: _server_side_case(client, item, out, options),
                               items):
            results.append(result)
            if on_result is not None:
                on_result(result)
    runtime = next((dict(r.server["runtime"]) for r in results
                    if r.ok and isinstance(r.server, dict) and r.server.get("runtime")), {})
    summary = {
        "dunet_deploy": __version__,
        "model": {"path": url, "model_name": client.info.model_name,
                  "model_precision": client.info.precision,
                  "spec_digest": client.info.spec.digest(), "server_model": model_name},
        "backend": "triton-server-side",
        "device": f"triton {url}",
        # What the server ran (its answers say; the model's precision when none came back).
        "precision": runtime.get("precision", client.info.precision),
        "server": runtime or None,
        "machine": machine_info(),
        "wall_s": round(time.perf_counter() - t_start, 6),
        "total": len(results),
        "ok": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
        "bytes_sent": sum(r.bytes_sent or 0 for r in results),
        "bytes_received": sum(r.bytes_received or 0 for r in results),
        "options": None if options is None else options.to_dict(),
        "options_fingerprint": None if options is None else options.fingerprint(),
        "cases": [r.to_dict() for r in results],
    }
    write_json(out / SUMMARY_NAME, summary)
    return summary
