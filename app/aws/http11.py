"""A lean HTTP/1.1 connection pool under httpx's API: the sidecar's default transport.

The sidecar sends one kind of request to one origin: a ``POST`` with a small
JSON body and a small JSON answer. This transport does that and nothing else,
on asyncio's own sockets (TLS included) and httptools' parser, the one
uvicorn uses: a pool of keep-alive connections, at most ``max_connections``
at once, each reused while younger than ``keepalive_expiry`` idle. Measured
here against httpx-aiohttp under the same sidecar (docs/performance.md), it
spends about half the CPU per request and half the added latency.

Failures are httpx's own exceptions, so the backend maps them as for any
transport: ``PoolTimeout``, ``ConnectTimeout``/``ConnectError``,
``ReadTimeout``, ``ReadError`` (the line broke) and ``RemoteProtocolError``
(an answer that is not HTTP). A request whose pooled connection turns out to
have been closed by the server before any byte of an answer came is sent once
more on a new connection at once, as the backend's own retry would, without
its wait.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from typing import Any, cast

import httptools
import httpx


class _Stale(Exception):
    """The pooled connection was closed before any byte of an answer came."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._received = False
        self._headers_done = False
        self._complete = False
        self._status = 0
        self._keep_alive = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but are ones.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._complete:
            # Bytes after the answer, or with no request out: the server spoke out
            # of turn, and the next answer read here could be the wrong one.
            self.close()
            return
        self._received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"AWS's answer is not HTTP/1.1: {exc}"))

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    # -- httptools callbacks ----------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            # A second answer in the same bytes as the first: its parts are
            # ignored below, and the connection is never pooled again.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._complete:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._complete:
            return
        # Read now: the parser forgets both once the message is complete.
        self._headers_done = True
        self._status = self._parser.get_status_code()
        self._keep_alive = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self._complete:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- use ----------------------------------------------------------------

    async def exchange(self, data: bytes, read_timeout: float | None) -> httpx.Response:
        """Send ``data`` (a whole request) and read the whole answer."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._headers, self._body = [], []
        self._received = self._headers_done = self._complete = False
        self.transport.write(data)
        try:
            async with asyncio.timeout(read_timeout):
                await self._waiter
        except TimeoutError as exc:
            self.close()
            raise httpx.ReadTimeout("AWS did not answer in time") from exc
        except BaseException:
            # Cancelled (the call's deadline) or failed: the line is mid-answer.
            self.close()
            raise
        finally:
            self._waiter = None
        if not self._keep_alive:
            self.close()
        return httpx.Response(
            self._status,
            headers=self._headers,
            content=b"".join(self._body),
            extensions={"http_version": b"HTTP/1.1"},
        )

    def close(self) -> None:
        """Close the connection (once)."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _ended(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and not self._complete and not self._delimited():
            # An answer whose body runs until the connection closes.
            self._complete = True
            self._waiter.set_result(None)
        elif not self._received:
            self._fail(_Stale())
        else:
            self._fail(httpx.ReadError(f"AWS closed the connection mid-answer ({exc or 'EOF'})"))

    def _delimited(self) -> bool:
        names = {name.lower() for name, _ in self._headers}
        return b"content-length" in names or b"transfer-encoding" in names

    def _fail(self, exc: BaseException) -> None:
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)


class Http11Transport(httpx.AsyncBaseTransport):
    """See the module docstring."""

    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max = limits.max_connections or 100
        self._expiry = limits.keepalive_expiry
        self._ssl = ssl_context
        self._idle: deque[_Connection] = deque()
        # Made on first use, inside the event loop.
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` on a pooled connection; the answer is read whole."""
        timeout: dict[str, Any] = request.extensions.get("timeout", {})
        data = _serialize(request)
        await self._acquire(timeout.get("pool"))
        try:
            connection = self._pooled()
            if connection is not None:
                try:
                    return await self._exchange(connection, data, timeout.get("read"))
                except _Stale:
                    pass
            connection = await self._connect(request.url, timeout.get("connect"))
            try:
                return await self._exchange(connection, data, timeout.get("read"))
            except _Stale as exc:
                raise httpx.ReadError("AWS closed a new connection without answering") from exc
        finally:
            self._release()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their call ends."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()

    async def _exchange(
        self, connection: _Connection, data: bytes, read_timeout: float | None
    ) -> httpx.Response:
        response = await connection.exchange(data, read_timeout)
        if self._closed:
            connection.close()  # the pool closed while this call was out
        elif not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        return response

    def _pooled(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            if self._expiry is not None and now - connection.idle_since > self._expiry:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self, url: httpx.URL, connect_timeout: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        context = None
        if url.scheme == "https":
            context = self._ssl or _default_context()
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"could not connect to {host}:{port} in time") from exc
        except (OSError, ssl.SSLError) as exc:
            raise httpx.ConnectError(f"could not connect to {host}:{port}: {exc}") from exc
        return connection

    async def _acquire(self, pool_timeout: float | None) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max)
        if not self._slots.locked():
            await self._slots.acquire()  # free: no wait, no timer
            return
        try:
            async with asyncio.timeout(pool_timeout):
                await self._slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout("no connection to AWS came free in time") from exc

    def _release(self) -> None:
        assert self._slots is not None
        self._slots.release()


@functools.cache
def _default_context() -> ssl.SSLContext:
    # The system's trust store, as aiohttp and botocore use; made once.
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def _serialize(request: httpx.Request) -> bytes:
    headers = request.headers
    lines = [request.method.encode(), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    if "host" not in headers:
        lines += [b"Host: ", request.url.netloc, b"\r\n"]
    body = request.content
    if "content-length" not in headers:
        lines += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
    for name, value in headers.raw:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
