"""The limits every connection of both listeners is held to: uvicorn's httptools
protocol with what uvicorn leaves out.

Both run uvicorn over httptools. uvicorn's own ``timeout_keep_alive`` closes
idle keep-alive connections after ``keepalive_timeout``. The rest is added
here (``guarded_protocol``), each piece for a gap uvicorn leaves:

- **Head size**: uvicorn buffers a request line and headers of any size. Here
  the head is counted exactly once complete (request line, header names and
  values with their framing, from the parser's callbacks, however the bytes
  were split into reads) and, while still incomplete, by the reads that carry
  it (httptools holds a header value being trickled until it is complete, out
  of the callbacks' sight). Over ``max_request_header_bytes``: 431, closed.
- **Head deadline**: uvicorn has none (its keep-alive timer is cancelled on
  every read). A connection must send its first head within
  ``request_header_timeout`` of being accepted, and any later head within it
  of that head's first byte: else it is closed, with 408 if part of a head
  had come and nothing on the connection is being answered.
- **Body deadline**: uvicorn has none; a body trickled a byte at a time held a
  connection (and its request) for as long as it trickled. From the end of a
  head to the end of its body, ``request_body_timeout``, also after an early
  answer (a 401 or 413 sent while the body still arrives): past it, 408 if
  nothing has been answered yet, else the connection is just closed.
- **Pipelining**: uvicorn parses all of a read and queues a request cycle for
  every request in it (and reads on after each answer), so memory grew with
  what a client sent unread. Here at most one request is parsed ahead of the
  one being answered: the rest of the read is kept unparsed, as bytes, and
  the connection reads nothing more until an answer makes room. Every
  request is still answered, in order. (httptools has no way to stop between
  two requests of a read; a read that may hold more heads than there is room
  for is parsed line by line, so at most a line of the next request is.)
- **Connection cap**: over ``max_client_connections`` open connections (each
  listener counts its own), the connection that has waited longest on its
  client (idle keep-alive, an incomplete head or body) is closed to make
  room (408 as at a deadline); only when every open connection has a complete
  request being answered is the newcomer refused, 503 with ``Retry-After``. uvicorn's
  ``limit_concurrency`` is not used: it answers 503 to every request once
  that many connections are open, idle ones included, which is the lock-out
  this avoids. Requests in flight are bounded by connections here (one
  served per connection). ``h11_max_incomplete_event_size`` is h11's, not
  httptools'.
- **No bodies on the operations listener**: it serves only ``GET``s; a request
  there that declares a body (``Content-Length`` over 0, or
  ``Transfer-Encoding``) is answered 413 at once and the connection closed,
  without waiting for the body.

A refusal that comes while earlier requests of the connection are still being
answered waits for those answers, so that it arrives in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.config import Settings

log = logging.getLogger("app.server")

# Seconds a caller refused for too many connections is told to wait.
BUSY_RETRY_AFTER = 1

# Where a connection is in reading its next request.
_AWAITING = 0  # no byte of it yet
_HEAD = 1  # its request line and headers are arriving
_BODY = 2  # its head is in, its body is arriving

# "GET" + " " + url + " HTTP/1.1\r\n" + headers + "\r\n": the framing around the
# method and url, and around each header's name and value (": " and "\r\n").
_REQUEST_LINE_FRAMING = len(b"  HTTP/1.1\r\n") + len(b"\r\n")
_HEADER_FRAMING = len(b": \r\n")


# A head's Upgrade header, and the name it is given before the parser sees it (as
# long: a header the parser does not know).
_UPGRADE = b"upgrade:"
_UPGRADE_RENAMED = b"x-upgrd:"
_UPGRADE_LINE = re.compile(rb"(?:^|\n)upgrade:", re.IGNORECASE)


def _response(status: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: 0\r\nconnection: close\r\n" + extra + b"\r\n"
    )


class _FlowControl(FlowControl):
    """uvicorn's flow control, which the protocol can hold paused: uvicorn resumes
    reading after every answer and whenever the app waits for a message."""

    held = False

    def hold(self) -> None:
        """Pause reading until ``release``, whatever uvicorn asks meanwhile."""
        self.held = True
        self.pause_reading()

    def release(self) -> None:
        """Let uvicorn (or the protocol) resume reading again."""
        self.held = False

    def resume_reading(self) -> None:
        if not self.held:
            super().resume_reading()


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def guarded_protocol(settings: Settings, *, bodies: bool = True) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with the sidecar's limits (see the module docstring).

    ``bodies=False``: requests that declare a body are refused (the operations listener).
    """
    max_header_bytes = settings.max_request_header_bytes
    header_timeout = settings.request_header_timeout
    body_timeout = settings.request_body_timeout
    max_connections = settings.max_client_connections
    too_large = _response(b"431 Request Header Fields Too Large")
    too_slow = _response(b"408 Request Timeout")
    no_body = _response(b"413 Content Too Large")
    busy = _response(
        b"503 Service Unavailable", b"retry-after: " + str(BUSY_RETRY_AFTER).encode() + b"\r\n"
    )

    # Connections in the order they were accepted (ties on the loop's clock).
    accepted = itertools.count()

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        """Counts a head's bytes, times heads and bodies, bounds pipelining, makes room."""

        flow: _FlowControl
        _phase = _AWAITING
        # Heads begun on this connection, and the bytes of reads that were all head.
        _heads = 0
        _head_bytes = 0
        _timer: asyncio.TimerHandle | None = None
        # Since when the connection has owed its client no answer (loop time);
        # None while a request received in full is being answered.
        _waiting_since: float | None = None
        _number = 0
        # The cycle being answered (uvicorn's ``cycle`` is the last one parsed).
        _active: RequestResponseCycle | None = None
        # Bytes read but not parsed: they would start a third request in flight.
        _pending = b""
        # The start of a line held back until its line is in (perhaps an Upgrade
        # header; see _read_lines); and whether what was parsed last ended a line.
        _carry = b""
        _line_start = True
        # Set once nothing more is read: what to send after the answers in flight.
        _last_words: bytes | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._number = next(accepted)
            super().connection_made(transport)
            self.flow = _FlowControl(transport)
            self._waiting_since = self.loop.time()
            if len(self.connections) > max_connections and not self._make_room():
                log.warning("connection refused: too many open", extra={"open": max_connections})
                self._close(busy)
                return
            # The first head is due within the head timeout of the connection.
            self._arm(header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            # uvicorn tells only the last cycle parsed; the one being answered must
            # not write to a closed transport either (uvloop raises then).
            for cycle in (self._active, *(queued for queued, _ in self.pipeline)):
                if cycle is not None and not cycle.response_complete:
                    cycle.disconnected = True
                    cycle.message_event.set()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._last_words is not None:
                return
            if self._pending:
                self._pending += data
                return
            self._parse(data)

        def _parse(self, data: bytes) -> None:
            """Parse ``data`` up to where it would start a third request in flight;
            keep the rest, and read no more, until an answer makes room."""
            if self._carry:
                data, self._carry = self._carry + data, b""
            # A head ends with CRLF CRLF, possibly split from an earlier read: when no
            # more heads than there is room for can end in ``data``, parse it whole.
            room = 2 - self._in_flight()
            upgrade = _UPGRADE_LINE.search(data) is not None
            if not upgrade and data.count(b"\r\n\r\n") + (self._phase == _HEAD) <= room:
                cut = data.rfind(b"\n") + 1
                if cut < len(data) and len(data) - cut < len(_UPGRADE):
                    # The read ends in a line's first bytes: perhaps an Upgrade header.
                    if cut:
                        self._read(data[:cut])
                        if self._last_words is not None or self.transport.is_closing():
                            return
                    self._read_tail(data[cut:], at_line_start=cut > 0 or self._line_start)
                else:
                    self._read(data)
                return
            # Else line by line (a head ends at a line's end), stopping once two
            # requests are in flight: at most a line of the next one is parsed.
            start = 0
            while start < len(data):
                if self._in_flight() >= 2:
                    self._pending = data[start:]
                    self.flow.hold()
                    return
                end = data.find(b"\n", start) + 1 or len(data)
                self._read_lines(data[start:end])
                if self._last_words is not None or self.transport.is_closing():
                    return
                start = end

        def _read_lines(self, data: bytes) -> None:
            """``data`` to ``_read``, a head's ``Upgrade`` header renamed.

            httptools (its llhttp) takes everything after a head with ``Connection:
            upgrade`` and ``Upgrade`` for the other protocol, the request's body
            included, and completes the request without it. The sidecar upgrades to
            nothing, and a client offering one (Java's HttpClient offers ``h2c`` on
            every ``http://`` request) must be answered as the HTTP/1.1 request it
            also is: so the header is renamed before the parser sees it, as a header
            the parser does not know. A line start split from its line by a read
            boundary waits for the rest of the line.
            """
            start = 0
            while start < len(data):
                end = data.find(b"\n", start) + 1
                if not end:
                    self._read_tail(data[start:], at_line_start=start > 0 or self._line_start)
                    return
                line = data[start:end]
                if (
                    self._phase != _BODY
                    and (start > 0 or self._line_start)
                    and line[: len(_UPGRADE)].lower() == _UPGRADE
                ):
                    line = _UPGRADE_RENAMED + line[len(_UPGRADE) :]
                self._read(line)
                if self._last_words is not None or self.transport.is_closing():
                    return
                start = end

        def _read_tail(self, tail: bytes, *, at_line_start: bool) -> None:
            """A read's last bytes, which end no line: held back while they may start an
            Upgrade header of a head, else parsed."""
            if self._phase != _BODY and at_line_start:
                if _UPGRADE.startswith(tail.lower()):
                    self._carry = tail
                    return
                if tail[: len(_UPGRADE)].lower() == _UPGRADE:
                    tail = _UPGRADE_RENAMED + tail[len(_UPGRADE) :]
            self._read(tail)

        def _read(self, data: bytes) -> None:
            """``data`` through uvicorn's parser, then the head's size and the deadlines."""
            phase = self._phase
            heads = self._heads
            self._line_start = data.endswith(b"\n")
            super().data_received(data)
            if self._last_words is not None or self.transport.is_closing():
                return
            if self._phase == _HEAD:
                # A read that began this head, or went on with it, was all head (one
                # that also carried an earlier request is left out: at most a read).
                began = self._heads - heads
                if (phase == _HEAD and began == 0) or (phase == _AWAITING and began == 1):
                    self._head_bytes += len(data)
                if self._head_bytes > max_header_bytes:
                    self._stop(too_large)
                    return
                self._arm(header_timeout)
            elif self._phase == _BODY:
                self._arm(body_timeout)

        def _resume(self) -> None:
            if self._last_words is not None or self.transport.is_closing():
                return
            data, self._pending = self._pending, b""
            self.flow.release()
            if data:
                self._parse(data)
            if not self._pending and self._last_words is None:
                self.flow.resume_reading()

        # Once stopped, the rest of the read being parsed reaches uvicorn no more.
        # (httptools stops at an exception from a callback, but reports it as a
        # bad request, which uvicorn answers 400 and logs.)

        def on_message_begin(self) -> None:
            if self._last_words is not None:
                return
            self._phase = _HEAD
            self._heads += 1
            self._head_bytes = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if self._last_words is None:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._last_words is None:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._last_words is not None:
                return
            self._disarm()
            head_bytes = (
                len(self.parser.get_method())
                + len(self.url)
                + _REQUEST_LINE_FRAMING
                + sum(len(name) + len(value) for name, value in self.headers)
                + _HEADER_FRAMING * len(self.headers)
            )
            if head_bytes > max_header_bytes:
                self._stop(too_large)
            elif not bodies and _declares_body(self.headers):
                self._stop(no_body)
            else:
                self._phase = _BODY
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._last_words is None:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if self._last_words is not None:
                return
            self._phase = _AWAITING
            self._disarm()
            if not self.cycle.response_complete:
                self._waiting_since = None
            super().on_message_complete()

        def send_400_response(self, msg: str) -> None:
            # Not after the answer the connection was stopped with.
            if self._last_words is None:
                super().send_400_response(msg)

        def on_response_complete(self) -> None:
            last = not self.pipeline
            super().on_response_complete()
            if self._pending:
                # Parsed on the next turn: not inside the answering task's send.
                self.loop.call_soon(self._resume)
            if not last:
                return
            if self._last_words is not None:
                self._close(self._last_words)
            elif self._waiting_since is None:
                self._waiting_since = self.loop.time()

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            self._active = cycle
            super()._start_asgi_task(cycle, app)

        def _in_flight(self) -> int:
            """Requests parsed and not yet answered in full."""
            active = self._active is not None and not self._active.response_complete
            return len(self.pipeline) + active

        def _arm(self, seconds: float) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            self._give_up()

        def _give_up(self) -> None:
            """Close a connection that kept the server waiting on its client; 408 if
            a request had begun to arrive and nothing on the connection is answering."""
            if self._phase == _HEAD:
                late = self._waiting_since is not None
            elif self._phase == _BODY:
                late = not self.pipeline and not self.cycle.response_started
            else:
                late = False
            self._close(too_slow if late else b"")

        def _make_room(self) -> bool:
            """Close the connection waiting longest on its client; False if none is."""
            oldest: GuardedHttpToolsProtocol | None = None
            since = (math.inf, 0)
            for other in self.connections:
                if other is self or not isinstance(other, GuardedHttpToolsProtocol):
                    continue
                # The loop's clock is read once per turn: connections accepted in one
                # turn tie on it, and the one accepted first is the one waiting longest.
                waiting = other._waiting_since
                if waiting is not None and (waiting, other._number) < since:
                    oldest, since = other, (waiting, other._number)
            if oldest is None:
                return False
            oldest._give_up()
            return True

        def _stop(self, last_words: bytes) -> None:
            """Read and parse no more; send ``last_words`` after the answers in flight, close."""
            self._disarm()
            if self._waiting_since is not None:
                self._close(last_words)
                return
            self._last_words = last_words
            self._pending = b""
            self.flow.hold()

        def _close(self, last_words: bytes) -> None:
            self._disarm()
            self._last_words = last_words
            self._pending = b""
            self._waiting_since = None
            # Out of the count at once: the transport is gone only on the next turn.
            self.connections.discard(self)
            if not self.transport.is_closing():
                if last_words:
                    self.transport.write(last_words)
                self.transport.close()

    return GuardedHttpToolsProtocol
