"""A loopback TCP proxy that keeps every byte it forwards, and parsers for what it kept.

An independent measure of what a Triton client puts on the wire: HTTP/1.1 message
bodies (``Content-Length`` framing) and gRPC messages (HTTP/2 DATA frames per stream,
less the 5-byte gRPC message prefix).
"""

from __future__ import annotations

import socket
import threading


class Proxy:
    """``127.0.0.1:<port>`` -> ``target``; ``connections``: (client->server, server->client)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[tuple[bytearray, bytearray]] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            logs = (bytearray(), bytearray())
            self.connections.append(logs)
            for src, dst, log in ((conn, upstream, logs[0]), (upstream, conn, logs[1])):
                t = threading.Thread(target=self._pump, args=(src, dst, log), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, log: bytearray) -> None:
        try:
            while chunk := src.recv(1 << 16):
                log += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()


def http_bodies(stream: bytes) -> list[tuple[str, int]]:
    """(start line, body length) of each HTTP/1.1 message in one direction of a connection."""
    out, pos = [], 0
    while pos < len(stream):
        end = stream.index(b"\r\n\r\n", pos)
        head = stream[pos:end].decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, v in
                  (line.split(":", 1) for line in head[1:])}
        assert "chunked" not in fields.get("transfer-encoding", ""), head
        length = int(fields.get("content-length", "0"))
        out.append((head[0], length))
        pos = end + 4 + length
    return out


def grpc_messages(stream: bytes, client_side: bool) -> dict[int, int]:
    """HTTP/2 stream id -> gRPC message bytes (DATA payloads less the 5-byte prefix)."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    pos = len(preface) if client_side else 0
    if client_side:
        assert stream.startswith(preface)
    data: dict[int, int] = {}
    while pos + 9 <= len(stream):
        length = int.from_bytes(stream[pos:pos + 3], "big")
        kind, flags = stream[pos + 3], stream[pos + 4]
        sid = int.from_bytes(stream[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        payload = stream[pos + 9:pos + 9 + length]
        if kind == 0:  # DATA
            pad = payload[0] + 1 if flags & 0x8 else 0
            data[sid] = data.get(sid, 0) + len(payload) - pad
        pos += 9 + length
    return {sid: n - 5 for sid, n in data.items() if n >= 5}
