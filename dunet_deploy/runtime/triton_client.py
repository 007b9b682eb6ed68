"""A runner whose model lives in a Triton server (``dunet-infer --triton-url``).

Preprocessing and the native-space inverse stay in the client; only slabs
travel. ``infer`` splits a batch into requests of at most ``request_batch``
slabs and keeps up to ``in_flight`` of them on the wire at once (one client per
worker thread, since tritonclient's clients are not thread-safe), so the
server's dynamic batcher can merge requests from this and other clients.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dunet_deploy.artifacts import INPUT_NAME, OUTPUT_NAME, ArtifactInfo
from dunet_deploy.errors import DunetError, first_line
from dunet_deploy.runtime.base import Runner
from dunet_deploy.runtime.serve import SPEC_OUTPUT, spec_model_name


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` or ``grpc://host:port`` -> (protocol, ``host:port``)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or not parsed.port:
        raise DunetError(f"--triton-url {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


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
    ) -> None:
        self.url = url
        self.protocol, self.address = parse_url(url)
        self.model_name = model_name
        self.request_batch = max(1, int(request_batch))
        self.in_flight = max(1, int(in_flight))
        self.timeout_s = float(timeout_s)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="triton-client")
        try:
            info = self._fetch_info()
            if expected is not None:
                self._check(info, expected)
        except BaseException:
            self._pool.shutdown(wait=False)
            raise
        super().__init__(url, info)

    # -- connection -----------------------------------------------------------
    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "http":
                import tritonclient.http as th

                client = th.InferenceServerClient(
                    self.address, connection_timeout=self.timeout_s,
                    network_timeout=self.timeout_s,
                )
            else:
                import tritonclient.grpc as tg

                client = tg.InferenceServerClient(self.address)
            self._local.client = client
        return client

    def _module(self) -> Any:
        if self.protocol == "http":
            import tritonclient.http as th

            return th
        import tritonclient.grpc as tg

        return tg

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
        if out is None or out.shape != (chunk.shape[0], 1, *chunk.shape[2:]):
            raise DunetError(f"Triton server {self.url} returned a malformed '{OUTPUT_NAME}'")
        return out

    @property
    def input_shape(self) -> tuple[int | None, int, int, int]:
        s = self.spec.image_size
        return (None, self.spec.in_channels, s, s)

    @property
    def precision(self) -> str:
        return self.info.precision

    @property
    def device(self) -> str:
        return f"triton {self.url}"

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
