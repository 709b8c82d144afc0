"""The HTTP servers: the API listener and the operations listener, one process, one loop.

The API listener (``METERING_HOST``, loopback by default) serves everything;
the operations listener (``METERING_OPS_HOST``/``METERING_OPS_PORT``) serves
only ``/healthz``, ``/readyz`` and ``/metrics``, without the token, so kubelet
probes and Prometheus reach them while the API stays private. Both share the
running sidecar's state.

Both run uvicorn over httptools with limits uvicorn does not have itself,
each a setting:

- request line and headers larger than ``max_request_header_bytes``: 431, and
  the connection closed before more is buffered;
- a request line and headers not complete within ``request_header_timeout``
  (a client trickling a header a second): 408, closed;
- idle keep-alive connections closed after ``keepalive_timeout``;
- more than ``max_client_connections`` open at once: 503 with ``Retry-After``,
  closed at once, so that idle connections cannot pile up.

The API listener owns the signals: on SIGTERM it drains and runs the
lifespan's shutdown while the operations listener keeps answering probes;
then that one stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings
from app.lifetime import ShutdownDeadline

log = logging.getLogger("app.server")

# Seconds a caller refused for too many connections is told to wait.
BUSY_RETRY_AFTER = 1


def _response(status: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 0\r\nconnection: close\r\n" + extra + b"\r\n"
    )


def guarded_protocol(settings: Settings) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the sidecar's limits (see the module docstring)."""
    max_header_bytes = settings.max_request_header_bytes
    header_timeout = settings.request_header_timeout
    max_connections = settings.max_client_connections
    too_large = _response(b"431 Request Header Fields Too Large")
    too_slow = _response(b"408 Request Timeout")
    busy = _response(
        b"503 Service Unavailable", b"retry-after: " + str(BUSY_RETRY_AFTER).encode() + b"\r\n"
    )

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """Counts header bytes and time while a request's head arrives."""

        _in_head = True
        _head_bytes = 0
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("connection refused: too many open", extra={"open": max_connections})
                self._refuse(busy)
                return
            self._start_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
                self._start_head_timer()
            super().data_received(data)
            # Bytes that completed the head may carry body too: only a head still
            # incomplete after them is too large.
            if self._in_head and self._head_bytes > max_header_bytes:
                self._refuse(too_large)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._stop_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            # The request's body is in: what comes next is the next request's head,
            # counted from its first byte (until then the keep-alive timeout applies).
            # Not at the response's end: an early answer (413) may come while the
            # body is still arriving, and body bytes are no head.
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

        def _start_head_timer(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._in_head and (self.cycle is None or self.cycle.response_complete):
                self._refuse(too_slow)

        def _refuse(self, response: bytes) -> None:
            self._stop_head_timer()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    return GuardedHttpToolsProtocol


class _ApiServer(uvicorn.Server):
    """The API listener: owns the signals, and starts the shutdown deadline's clock."""

    def __init__(self, config: uvicorn.Config, deadline: ShutdownDeadline | None) -> None:
        super().__init__(config)
        self._deadline = deadline

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is not None:
            self._deadline.begin()
        super().handle_exit(sig, frame)


class _OpsServer(uvicorn.Server):
    """The operations listener: the API listener owns the signals and says when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _config(app: Any, settings: Settings, host: str, port: int, **options: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=guarded_protocol(settings),
        access_log=False,
        log_config=None,
        server_header=False,
        # Callers are on the pod's loopback or network: no proxy in front whose
        # X-Forwarded-* headers should rewrite the client (and one layer less).
        proxy_headers=False,
        timeout_keep_alive=math.ceil(settings.keepalive_timeout),
        **options,
    )


def _bind(host: str, port: int) -> socket.socket:
    """The operations listener's socket, bound now: a port in use fails the start loudly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve(app: Any, ops_app: Any | None, settings: Settings) -> None:
    """Serve the API (and the operations listener, if on) until SIGTERM has drained them."""
    # The drain of in-flight requests may spend half the shutdown budget; the rest
    # is the queue's (its last cycle, the partial hour in container mode, the store).
    deadline: ShutdownDeadline | None = getattr(app.state, "shutdown", None)
    api = _ApiServer(
        _config(
            app,
            settings,
            settings.host,
            settings.port,
            lifespan="on",
            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout / 2)),
        ),
        deadline,
    )
    if ops_app is None or settings.ops_port == 0:
        await api.serve()
        return
    sock = _bind(settings.ops_host, settings.ops_port)
    ops = _OpsServer(
        _config(ops_app, settings, settings.ops_host, settings.ops_port, lifespan="off")
    )
    ops_task = asyncio.create_task(ops.serve(sockets=[sock]), name="ops-listener")
    try:
        await api.serve()
    finally:
        ops.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await ops_task
        sock.close()


def run(app: Any, ops_app: Any | None, settings: Settings) -> None:
    """Run both listeners on uvloop until the process is told to stop."""
    # A Config only for its loop factory: without log_config it leaves logging alone.
    config = uvicorn.Config(app, loop="uvloop", log_config=None)
    asyncio_run(serve(app, ops_app, settings), loop_factory=config.get_loop_factory())
