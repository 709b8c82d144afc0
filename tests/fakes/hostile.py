"""A hostile (or merely unusual) upstream on a raw socket, for what no HTTP server
framework will send: ``1xx`` before the answer, an endless chunked body, a
``Content-Length`` it never delivers, a compressed body nobody asked for.

Each request is read (head, then the body by ``Content-Length``), recorded, checked
by the independent SigV4 verifier when a key registry is given, and answered by the
current ``answer``: one of the ``Answer`` factories below. Everything listens on
127.0.0.1 only, and every answer is bounded in bytes and time.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .keys import KeyRegistry
from .metering import SIGNING_NAME
from .sigv4 import SignatureFailure, verify_request

__all__ = [
    "Answer",
    "HostileRequest",
    "HostileUpstream",
    "announce_and_stall",
    "compressed",
    "continue_then",
    "endless_chunked",
    "hostile_upstream",
    "metering_answer",
    "plain",
]

_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024


@dataclass
class HostileRequest:
    """One request as it arrived, and what the upstream did with the connection."""

    request_line: str
    headers: list[tuple[str, str]]
    body: bytes
    signature_valid: bool
    # Body bytes written for this request's answer before the peer went away.
    sent: int = 0
    # Seconds from the first byte of the answer until the peer closed (or the cap).
    held: float = 0.0

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or ``None``."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k == wanted), None)


# Writes one answer to the connection; returns whether the connection may be reused.
Answer = Callable[[socket.socket, HostileRequest], bool]


def metering_answer(record_id: str = "hostile-record", extra: str = "") -> bytes:
    """A complete, valid ``200`` MeterUsage answer (``extra``: more header lines)."""
    body = json.dumps({"MeteringRecordId": record_id}).encode()
    return (
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
        f"x-amzn-RequestId: 00000000-0000-0000-0000-000000000001\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def plain(answer: bytes) -> Answer:
    """Send ``answer`` as it is; keep the connection."""

    def send(sock: socket.socket, request: HostileRequest) -> bool:
        sock.sendall(answer)
        return True

    return send


def continue_then(answer: bytes, informational: int = 1) -> Answer:
    """``informational`` times ``100 Continue``, then ``answer``."""
    return plain(b"HTTP/1.1 100 Continue\r\n\r\n" * informational + answer)


def compressed() -> Answer:
    """A valid MeterUsage answer, gzip-compressed, though the client asked for identity."""
    body = gzip.compress(json.dumps({"MeteringRecordId": "gzip-record"}).encode())
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return plain(head + body)


def endless_chunked(max_bytes: int = 512 * 1024 * 1024, max_seconds: float = 20.0) -> Answer:
    """A ``200`` whose chunked body never ends: 64 KiB chunks as fast as the peer takes
    them, until it closes the connection (or the caps, which a sane client never meets)."""

    def send(sock: socket.socket, request: HostileRequest) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = f"{_CHUNK:x}\r\n".encode() + b"x" * _CHUNK + b"\r\n"
        started = time.monotonic()
        sock.settimeout(2.0)
        try:
            while request.sent < max_bytes and time.monotonic() - started < max_seconds:
                sock.sendall(chunk)
                request.sent += _CHUNK
        except OSError:
            pass  # the client closed the connection: what a bounded client does
        request.held = time.monotonic() - started
        return False

    return send


def announce_and_stall(announced: int, send_bytes: int = 1024, hold: float = 10.0) -> Answer:
    """A ``200`` announcing ``announced`` bytes, sending ``send_bytes`` of them, then
    holding the connection open, silent, until the peer closes it (or ``hold`` passes)."""

    def send(sock: socket.socket, request: HostileRequest) -> bool:
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
            + f"Content-Length: {announced}\r\n\r\n".encode()
            + b"x" * send_bytes
        )
        request.sent = send_bytes
        started = time.monotonic()
        sock.settimeout(0.05)
        while time.monotonic() - started < hold:
            try:
                if not sock.recv(4096):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        request.held = time.monotonic() - started
        return False

    return send


@dataclass
class HostileUpstream:
    """The running upstream: its URL, what it received, and the answer it gives now."""

    url: str
    answer: Answer
    registry: KeyRegistry | None
    region: str = "us-east-1"
    requests: list[HostileRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def received(self) -> list[HostileRequest]:
        """A snapshot of the requests so far."""
        with self.lock:
            return list(self.requests)

    def serve_connection(self, sock: socket.socket) -> None:
        """Read requests off ``sock`` and answer each, until either side is done."""
        buffer = b""
        with sock:
            sock.settimeout(10.0)
            while True:
                try:
                    request, buffer = self._read_request(sock, buffer)
                except (OSError, ValueError):
                    return
                if request is None:
                    return
                with self.lock:
                    self.requests.append(request)
                    answer = self.answer
                try:
                    if not answer(sock, request):
                        return
                except OSError:
                    return

    def _read_request(
        self, sock: socket.socket, buffer: bytes
    ) -> tuple[HostileRequest | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > _MAX_HEAD:
                raise ValueError("request head too large")
            data = sock.recv(65536)
            if not data:
                return None, b""
            buffer += data
        head, _, buffer = buffer.partition(b"\r\n\r\n")
        line, *fields = head.decode("latin-1").split("\r\n")
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (f.partition(":") for f in fields)
        ]
        length = int(next((v for k, v in headers if k == "content-length"), "0"))
        while len(buffer) < length:
            data = sock.recv(65536)
            if not data:
                return None, b""
            buffer += data
        body, buffer = buffer[:length], buffer[length:]
        request = HostileRequest(line, headers, body, signature_valid=False)
        if self.registry is not None:
            method, target, _ = line.split(" ", 2)
            path, _, query = target.partition("?")
            try:
                verify_request(
                    method, path, query, headers, body, self.registry, self.region, SIGNING_NAME
                )
                request.signature_valid = True
            except SignatureFailure:
                pass
        return request, buffer


@contextmanager
def hostile_upstream(
    answer: Answer, registry: KeyRegistry | None = None
) -> Iterator[HostileUpstream]:
    """Serve on a free 127.0.0.1 port, a thread per connection, until the block exits."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    upstream = HostileUpstream(f"http://127.0.0.1:{port}", answer, registry)
    stopping = threading.Event()

    def accept() -> None:
        while not stopping.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=upstream.serve_connection, args=(sock,), daemon=True, name="hostile-conn"
            ).start()

    thread = threading.Thread(target=accept, daemon=True, name=f"hostile-{port}")
    thread.start()
    try:
        yield upstream
    finally:
        stopping.set()
        thread.join(5)
        listener.close()
