"""An HTTP proxy on 127.0.0.1 that adds latency and injects faults, for tests and benchmarks.

Put it in front of an S3 endpoint (a moto server) and point the store's
``endpoint_url`` at it. It speaks just enough HTTP/1.1 to find request and
response boundaries (Content-Length, chunked, HEAD), so faults hit whole
requests: a 503 SlowDown or 500 reply, a reset connection, a truncated body, a
connection that never answers. It runs its own event loop in a daemon thread,
so tests on any loop (or none) can use it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Fault", "FaultProxy", "ProxyStats"]

FaultKind = Literal["status", "reset", "truncate", "stall"]

_REASONS = {500: "Internal Server Error", 503: "Slow Down", 429: "Too Many Requests"}


@dataclass(frozen=True, slots=True)
class Fault:
    """What happens to one request: ``kind`` and, for ``status``, the HTTP status sent."""

    kind: FaultKind
    status: int = 503
    match: str = ""
    """Only requests whose request line contains this text (e.g. ``"GET "``, ``"commit"``)."""


@dataclass(slots=True)
class ProxyStats:
    requests: int = 0
    forwarded: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    heads: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=1000))
    """The request line and headers of the last 1,000 requests, as sent (what a client put on the wire)."""


class FaultProxy:
    """``with FaultProxy(port_of_upstream) as proxy: ... proxy.url ...``; faults are queued per request."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1", latency: float = 0.0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = latency
        self.stats = ProxyStats()
        self.fault_rate = 0.0
        self.random_faults: tuple[Fault, ...] = ()
        self._queue: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-faultproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def inject(self, kind: FaultKind, count: int = 1, *, status: int = 503, match: str = "") -> None:
        """Apply ``kind`` to the next ``count`` requests (that contain ``match`` in their request line)."""
        with self._lock:
            self._queue.extend(Fault(kind, status, match) for _ in range(count))

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self.fault_rate = 0.0

    def _next_fault(self, request_line: str) -> Fault | None:
        with self._lock:
            for i, fault in enumerate(self._queue):
                if fault.match in request_line:
                    del self._queue[i]
                    return fault
            if self.random_faults and random.random() < self.fault_rate:
                return random.choice(self.random_faults)
        return None

    # ------------------------------------------------------------------ serving

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        async with self._server:
            await self._stop.wait()
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if b"\r\nexpect: 100-continue" in head.lower():
                    # Answer the interim response here and forward the request without it.
                    head = _drop_header(head, b"expect")
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    await writer.drain()
                body = await _read_body(reader, head, is_response=False, method=b"")
                self.stats.requests += 1
                self.stats.heads.append(head)
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                if self.latency:
                    await asyncio.sleep(self.latency)
                fault = self._next_fault(line)
                if fault is not None:
                    self.stats.faults[fault.kind] += 1
                if fault is None or fault.kind == "truncate":
                    if not await self._forward(head + body, line, writer, truncate=fault is not None):
                        return
                elif fault.kind == "status":
                    writer.write(_error_response(fault.status, head_only=line.startswith("HEAD ")))
                    await writer.drain()
                elif fault.kind == "reset":
                    _reset(writer)
                    return
                else:  # stall: hold the connection open, answer nothing
                    await reader.read()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _forward(self, request: bytes, line: str, writer: asyncio.StreamWriter, *, truncate: bool) -> bool:
        """Relay one request upstream and its response back; False when the client connection must end."""
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(request)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            method = line.split(" ", 1)[0].encode()
            body = await _read_body(up_reader, head, is_response=True, method=method)
        finally:
            up_writer.close()
        self.stats.forwarded += 1
        if truncate and len(body) > 1:
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            _reset(writer)
            return False
        writer.write(head + body)
        await writer.drain()
        return b"connection: close" not in head.lower()


async def _read_body(reader: asyncio.StreamReader, head: bytes, *, is_response: bool, method: bytes) -> bytes:
    """The message body after ``head`` (raw, chunked framing included), per RFC 9112's length rules."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    if is_response:
        status = int(lines[0].split(" ", 2)[1])
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";", 1)[0], 16)
            out += await reader.readexactly(size + 2)
            if size == 0:
                return bytes(out)
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    return await reader.read() if is_response else b""


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() != name]
    return b"\r\n".join([lines[0], *kept])


def _error_response(status: int, *, head_only: bool = False) -> bytes:
    """An S3 error reply; to a HEAD without its body (a body there would be read as the next reply)."""
    code = "SlowDown" if status == 503 else "InternalError"
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>injected by kvstore's fault proxy</Message></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head if head_only else head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not a clean end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
