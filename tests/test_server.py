"""The two listeners and their limits, over real sockets to the real process (and the
protocol's bookkeeping in process, where a real client cannot set the scene)."""

from __future__ import annotations

import asyncio
import re
import resource
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings
from app.server.guard import guarded_protocol
from tests.conftest import PRODUCT
from tests.sidecar import Sidecar, run_sidecar

TOKEN = "tok-7f3a9c2e"
SANDBOX = {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _rss_kb(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1))


def _closed(sockets: list[socket.socket], wait: float = 0.2) -> list[socket.socket]:
    """The ``sockets`` the server has closed by now (after whatever it answered)."""
    readable, _, _ = select.select(sockets, [], [], wait)
    closed = []
    for sock in readable:
        sock.settimeout(0.5)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            continue  # it answered and is still open
        closed.append(sock)
    return closed


def _read_all(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection (or ``limit``)."""
    sock.settimeout(limit)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A sandbox sidecar with a token from a file and small limits."""
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(f"  {TOKEN}\n")
    env = {
        **SANDBOX,
        "METERING_AUTH_TOKEN_FILE": str(token_file),
        "METERING_MAX_REQUEST_HEADER_BYTES": "16384",
        "METERING_REQUEST_HEADER_TIMEOUT": "1.5",
        "METERING_REQUEST_BODY_TIMEOUT": "2",
        "METERING_KEEPALIVE_TIMEOUT": "1",
        "METERING_MAX_CLIENT_CONNECTIONS": "40",
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


def test_the_operations_listener_serves_probes_and_metrics_without_the_token(
    guarded: Sidecar,
) -> None:
    assert guarded.ops_url is not None
    with httpx.Client(base_url=guarded.ops_url, timeout=10) as ops:
        assert ops.get("/healthz").status_code == 200
        ready = ops.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        metrics = ops.get("/metrics")
        assert metrics.status_code == 200
        assert "metering_http_requests_total" in metrics.text
        # Nothing else is served there: no API, no documentation.
        for path in ("/v1/usage-records", "/docs", "/openapi.json"):
            assert ops.get(path).status_code == 404, path
        assert ops.post("/v1/meter-usage").status_code == 404


def test_the_api_listener_needs_the_token_for_all_but_the_probes(guarded: Sidecar) -> None:
    client = guarded.client
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/usage-records"):
        refused = client.get(path)
        assert refused.status_code == 401, path
        assert refused.json()["code"] == "Unauthorized"
        allowed = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200, path
    assert client.get("/metrics", headers={"X-Metering-Token": TOKEN}).status_code == 200


def test_the_token_from_a_file_is_in_no_argument_and_no_environment(guarded: Sidecar) -> None:
    pid = guarded.process.pid
    assert TOKEN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert TOKEN.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    assert TOKEN not in guarded.log()


def test_an_oversize_header_is_cut_off_and_memory_does_not_grow(guarded: Sidecar) -> None:
    pid = guarded.process.pid
    before = _rss_kb(pid)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            chunk = b"a" * 65536
            try:
                while sent < 64 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            answer = _read_all(sock)
        # Refused long before 64 MB were taken in.
        assert sent < 8 * 1024 * 1024, sent
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
    assert _rss_kb(pid) - before < 8 * 1024
    # Headers under the limit, and a body far over it, still pass.
    headers = {"X-Metering-Token": TOKEN, "X-Pad": "p" * 12000}
    assert guarded.client.get("/readyz", headers=headers).status_code == 200
    large = {"UsageRecords": [{"CustomerAWSAccountId": "1", "Dimension": "d" * 200}] * 2000}
    response = guarded.client.post("/v1/usage-records", json=large, headers=headers)
    assert response.status_code in (413, 422), response.text


def test_a_header_trickled_slowly_is_cut_off_at_the_timeout(guarded: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for n in range(20):
            time.sleep(0.5)
            try:
                sock.sendall(f"X-Slow-{n}: y\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sock.settimeout(0.01)
            try:
                if sock.recv(1024, socket.MSG_PEEK):
                    closed = True
                    break
            except TimeoutError:
                pass
        elapsed = time.monotonic() - started
        answer = _read_all(sock, 2)
    assert closed, "the trickling connection was never closed"
    assert 1.2 < elapsed < 4, elapsed
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]


def test_idle_keepalive_connections_are_closed(guarded: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        # The server closes it after METERING_KEEPALIVE_TIMEOUT (1 s).
        assert _read_all(sock, 5) == b""
        assert time.monotonic() - started < 3


def test_a_taken_operations_port_fails_the_start_loudly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited"):  # noqa: SIM117
            with run_sidecar({**SANDBOX, "METERING_OPS_PORT": str(port)}, startup_timeout=20):
                pass


# --- Limits on heads, bodies and pipelining (guarded: 16 KiB heads, 2 s bodies) -----


def _head(size: int, path: str = "/healthz") -> bytes:
    """A GET head of exactly ``size`` bytes, that asks to close after the answer."""
    start = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: ".encode()
    pad = size - len(start) - len(b"\r\n\r\n")
    return start + b"p" * pad + b"\r\n\r\n"


def test_a_head_over_the_limit_in_one_write_is_431_and_one_at_the_limit_passes(
    guarded: Sidecar,
) -> None:
    port = _port(guarded.url)
    for size, status in ((16384, b"200"), (16385, b"431"), (17 * 1024, b"431")):
        head = _head(size)
        assert len(head) == size
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head)
            answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 " + status), (size, answer[:80])


def _trickle_until_closed(
    sock: socket.socket, every: float, limit: float
) -> tuple[bytes, float, int]:
    """Send a body byte every ``every`` seconds until the server closes the connection
    (or ``limit``); what it answered, the seconds it took, the bytes trickled."""
    started = time.monotonic()
    answer = b""
    trickled = 0
    sock.settimeout(every)
    while time.monotonic() - started < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            try:
                sock.sendall(b"x")
                trickled += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        answer += chunk
    return answer, time.monotonic() - started, trickled


def test_a_body_trickled_is_cut_off_at_the_body_deadline(guarded: Sidecar) -> None:
    with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
        sock.sendall(
            b"POST /v1/usage-records HTTP/1.1\r\nHost: x\r\nX-Metering-Token: "
            + TOKEN.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 999999\r\n\r\n{"
        )
        answer, seconds, trickled = _trickle_until_closed(sock, every=0.3, limit=30)
    # METERING_REQUEST_BODY_TIMEOUT is 2 s: the bytes trickled do not extend it.
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert trickled >= 3, trickled
    assert seconds < 20, seconds


@pytest.mark.parametrize(
    ("token", "length", "status"),
    [(None, b"999999", b"401"), (TOKEN, b"2000000", b"413")],
    ids=["401", "413"],
)
def test_a_body_trickled_after_an_early_answer_is_cut_off(
    guarded: Sidecar, token: str | None, length: bytes, status: bytes
) -> None:
    auth = b"X-Metering-Token: " + token.encode() + b"\r\n" if token else b""
    with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
        sock.sendall(
            b"POST /v1/usage-records HTTP/1.1\r\nHost: x\r\n"
            + auth
            + b"Content-Length: "
            + length
            + b"\r\n\r\n{"
        )
        # Faster than the keep-alive timeout (1 s), which every byte read restarts.
        answer, seconds, trickled = _trickle_until_closed(sock, every=0.3, limit=30)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert trickled >= 3, trickled
    assert seconds < 20, seconds


def _answers(sock: socket.socket, count: int, limit: float = 10) -> list[bytes]:
    """The X-Request-Id of ``count`` answers read in order from ``sock``."""
    sock.settimeout(limit)
    received = b""
    while received.count(b"HTTP/1.1 ") < count or not received.endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return re.findall(rb"x-request-id: (\S+)\r\n", received)


@pytest.mark.parametrize("count", [2, 3, 12])
def test_pipelined_requests_get_every_answer_in_order(guarded: Sidecar, count: int) -> None:
    ids = [f"pipelined-{count}-{n}".encode() for n in range(count)]
    with socket.create_connection(("127.0.0.1", _port(guarded.url))) as sock:
        sock.sendall(
            b"".join(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + i + b"\r\n\r\n" for i in ids
            )
        )
        assert _answers(sock, count) == ids


def test_the_operations_listener_refuses_bodies_without_waiting_for_them(
    guarded: Sidecar,
) -> None:
    assert guarded.ops_url is not None
    port = _port(guarded.ops_url)
    for declared in (b"Content-Length: 999999", b"Transfer-Encoding: chunked"):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /healthz HTTP/1.1\r\nHost: x\r\n" + declared + b"\r\n\r\n")
            # Answered and closed with no byte of the body sent.
            answer = _read_all(sock, 10)
        assert answer.startswith(b"HTTP/1.1 413"), (declared, answer[:80])
    # A GET that declares an empty body is still a GET.
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert _read_all(sock).startswith(b"HTTP/1.1 200")


# --- Floods against the default connection cap (512) --------------------------------


@pytest.fixture(scope="module")
def crowded() -> Iterator[Sidecar]:
    """A sandbox sidecar with a token and the default limits, but a 3 s body deadline."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # 600 sockets of the test's own, and as many accepted by the sidecar (which
    # inherits the limit).
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    env = {**SANDBOX, "METERING_AUTH_TOKEN": TOKEN, "METERING_REQUEST_BODY_TIMEOUT": "3"}
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


def test_a_flood_of_idle_connections_makes_room_for_newcomers(crowded: Sidecar) -> None:
    port = _port(crowded.url)
    flood: list[socket.socket] = []
    try:
        for _ in range(600):
            flood.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(0.5)
        # Each newcomer over 512 closed the connection that had waited longest on
        # its client (none had sent anything): the oldest ones, and no one was refused.
        closed = _closed(flood)
        assert flood[0] in closed
        assert flood[-1] not in closed
        assert len(closed) >= 88, len(closed)
        # A probe gets in, and the oldest still open makes room for it.
        survivors = [sock for sock in flood if sock not in closed]
        with httpx.Client(base_url=crowded.url, timeout=10) as probe:
            assert probe.get("/healthz").status_code == 200
        assert survivors[0] in _closed(survivors)
    finally:
        for sock in flood:
            sock.close()


def _trickle_flood(
    port: int, head: bytes, *, probe_url: str, sockets: int, every: float, seconds: float
) -> tuple[list[int], list[bytes], float]:
    """``sockets`` connections that send ``head`` and then a byte every ``every``
    seconds, those closed opened anew each round, for ``seconds``; ``/healthz`` at
    ``probe_url`` polled meanwhile, each on a new connection as kubelet's probes are.

    The probes' statuses (0: no answer), the first line of each answer a trickling
    connection got before it was closed, and the longest a trickler was held open.
    """
    open_since: dict[socket.socket, float] = {}
    received: dict[socket.socket, bytes] = {}
    statuses: list[int] = []
    answers: list[bytes] = []
    longest = 0.0

    def close(sock: socket.socket) -> None:
        nonlocal longest
        longest = max(longest, time.monotonic() - open_since.pop(sock))
        answers.append(received.pop(sock).split(b"\r\n", 1)[0])
        sock.close()

    started = time.monotonic()
    next_round = next_poll = started
    try:
        while time.monotonic() - started < seconds:
            now = time.monotonic()
            if now >= next_round:
                next_round = now + every
                for sock in list(open_since):
                    try:
                        sock.send(b"x")
                    except OSError:
                        close(sock)
                while len(open_since) < sockets:
                    sock = socket.create_connection(("127.0.0.1", port))
                    sock.setblocking(False)
                    sock.send(head)
                    open_since[sock] = time.monotonic()
                    received[sock] = b""
            if now >= next_poll:
                next_poll = now + 0.5
                try:
                    statuses.append(httpx.get(probe_url + "/healthz", timeout=10).status_code)
                except httpx.TransportError:
                    statuses.append(0)
            readable, _, _ = select.select(list(open_since), [], [], 0.05)
            for sock in readable:
                try:
                    chunk = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    received[sock] += chunk
                else:
                    close(sock)
    finally:
        for sock in list(open_since):
            sock.close()
    return statuses, answers, longest


def test_bodies_trickled_on_the_operations_port_never_lock_out_the_probes(
    crowded: Sidecar,
) -> None:
    assert crowded.ops_url is not None
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n"
    statuses, answers, _ = _trickle_flood(
        _port(crowded.ops_url),
        head,
        probe_url=crowded.ops_url,
        sockets=600,
        every=3,
        # Three rounds of 600: each is refused at once, so more rounds show nothing new.
        seconds=9,
    )
    assert len(statuses) >= 5
    assert set(statuses) == {200}, statuses
    # Answered at once: the operations listener takes no body. (One the cap closed
    # before its head was read got no answer.)
    refused = [answer for answer in answers if answer]
    assert len(refused) >= 500, len(refused)
    assert set(refused) == {b"HTTP/1.1 413 Content Too Large"}, set(refused)


def test_bodies_trickled_on_the_api_port_are_cut_off_at_the_deadline(crowded: Sidecar) -> None:
    head = (
        b"POST /v1/usage-records HTTP/1.1\r\nHost: x\r\nX-Metering-Token: "
        + TOKEN.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 999999\r\n\r\n"
    )
    statuses, answers, longest = _trickle_flood(
        _port(crowded.url), head, probe_url=crowded.url, sockets=600, every=1, seconds=12
    )
    assert len(statuses) >= 3
    assert set(statuses) == {200}, statuses
    # 88 over the cap made room by closing the oldest (408, or nothing if its head
    # had not been read yet); the rest met the 3 s deadline, with 408.
    timed_out = [answer for answer in answers if answer]
    assert len(timed_out) >= 500, len(timed_out)
    assert set(timed_out) == {b"HTTP/1.1 408 Request Timeout"}, set(timed_out)
    assert longest < 3 + 10, longest
    # The requests cut off are no errors of the sidecar's.
    log = crowded.log()
    for sign in ("Traceback", "unhandled error", "Exception in ASGI application"):
        assert sign not in log, sign


def test_a_pipelining_flood_does_not_grow_memory(crowded: Sidecar) -> None:
    pid = crowded.process.pid
    port = _port(crowded.url)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    flood_bytes = request * (250 * 1024 // len(request))
    with httpx.Client(base_url=crowded.url, timeout=10) as client:
        for _ in range(50):
            assert client.get("/healthz").status_code == 200
    before = _rss_kb(pid)
    peak = before
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        unsent = dict.fromkeys(flood, flood_bytes)
        for sock in flood:
            sock.setblocking(False)
        deadline = time.monotonic() + 10
        while unsent and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(unsent), [], 0.1)
            for sock in writable:
                try:
                    sent = sock.send(unsent[sock])
                except OSError:
                    sent = len(unsent[sock])
                unsent[sock] = unsent[sock][sent:]
                if not unsent[sock]:
                    del unsent[sock]
            peak = max(peak, _rss_kb(pid))
        # Whatever the sidecar read of it, in the time it had, the answers unread.
        for _ in range(20):
            time.sleep(0.1)
            peak = max(peak, _rss_kb(pid))
        assert peak - before < 40 * 1024, (before, peak)
        with httpx.Client(base_url=crowded.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        for sock in flood:
            sock.close()


# --- The connection cap's choice, in process -----------------------------------------


class _Transport(asyncio.Transport):
    """Just enough of a transport for uvicorn's protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def write(self, data: Any) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class _Listener:
    """A listener's protocol class and state, with an app that answers each request
    (its path as the body) once ``go`` is set."""

    def __init__(self, max_connections: int) -> None:
        settings = Settings(mode="sandbox", max_client_connections=max_connections)
        self.protocol = guarded_protocol(settings)
        self.state = ServerState()
        self.go = asyncio.Event()
        self.started: list[str] = []
        self.protocols: dict[_Transport, HttpToolsProtocol] = {}
        self.config = uvicorn.Config(
            self.app, http=self.protocol, log_config=None, interface="asgi3", proxy_headers=False
        )

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.started.append(scope["path"])
        await self.go.wait()
        body = scope["path"].encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def connect(self) -> _Transport:
        transport = _Transport()
        protocol = self.protocol(config=self.config, server_state=self.state, app_state={})
        protocol.connection_made(transport)
        self.protocols[transport] = protocol
        return transport

    def send(self, transport: _Transport, data: bytes) -> None:
        self.protocols[transport].data_received(data)


async def test_over_the_cap_the_longest_waiting_connection_makes_room() -> None:
    listener = _Listener(max_connections=3)
    served = listener.connect()
    listener.send(served, b"GET /served HTTP/1.1\r\nHost: x\r\n\r\n")
    idle = listener.connect()
    await asyncio.sleep(0.01)
    trickling = listener.connect()
    listener.send(trickling, b"GET /slow HTTP/1.1\r\nHost: x\r\n")
    await asyncio.sleep(0.01)
    # Over the cap: the connection idle longest goes, silently; the one being
    # served, the one whose head is arriving and the newcomer stay.
    newcomer = listener.connect()
    assert idle.closed
    assert idle.written == b""
    assert not served.closed
    assert not trickling.closed
    assert not newcomer.closed
    # Next, the head that has waited longest: 408, as its request has begun.
    last = listener.connect()
    assert trickling.closed
    assert trickling.written.startswith(b"HTTP/1.1 408")
    assert not newcomer.closed
    assert not last.closed
    listener.go.set()
    await asyncio.sleep(0.01)
    assert served.written.startswith(b"HTTP/1.1 200")


async def test_a_newcomer_is_refused_only_when_every_connection_is_being_served() -> None:
    listener = _Listener(max_connections=2)
    first, second = listener.connect(), listener.connect()
    for n, transport in enumerate((first, second)):
        listener.send(transport, f"GET /{n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    newcomer = listener.connect()
    assert newcomer.closed
    assert newcomer.written.startswith(b"HTTP/1.1 503")
    assert b"retry-after: 1\r\n" in newcomer.written
    assert not first.closed
    assert not second.closed
    listener.go.set()
    await asyncio.sleep(0.01)
    # Answered: the two wait on their clients again, and make room.
    assert not listener.connect().closed


async def test_pipelined_requests_are_parsed_one_ahead_and_all_answered() -> None:
    listener = _Listener(max_connections=10)
    transport = listener.connect()
    paths = [f"/{n}" for n in range(50)]
    listener.send(
        transport, b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths)
    )
    # One request served, one parsed and waiting; the rest unparsed, and no more read.
    await asyncio.sleep(0)
    assert listener.started == ["/0"]
    assert len(listener.protocols[transport].pipeline) == 1
    assert not transport.reading
    listener.go.set()
    for _ in range(200):
        await asyncio.sleep(0)
    bodies = re.findall(rb"content-length: \d+\r\n\r\n(/\d+)", bytes(transport.written))
    assert [b.decode() for b in bodies] == paths
    assert listener.started == paths
    assert transport.reading
    assert not transport.closed


def _exchange(sidecar: Sidecar, *writes: bytes) -> bytes:
    """Send ``writes`` one by one (a pause between them, so each is a read of its own)
    and read the one answer."""
    with socket.create_connection(("127.0.0.1", _port(sidecar.url))) as sock:
        for write in writes:
            sock.sendall(write)
            time.sleep(0.03)
        sock.settimeout(5)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


_UPGRADE_BODY = b'{"UsageDimension": "users", "UsageQuantity": 3}'
_UPGRADE_HEAD = (
    b"POST /v1/meter-usage HTTP/1.1\r\nHost: x\r\nX-Metering-Token: " + TOKEN.encode() + b"\r\n"
    b"Content-Type: application/json\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    b"Content-Length: " + str(len(_UPGRADE_BODY)).encode() + b"\r\n\r\n"
)


_AT = _UPGRADE_HEAD.index(b"Upgrade:")


@pytest.mark.parametrize(
    "writes",
    [
        (_UPGRADE_HEAD + _UPGRADE_BODY,),
        (_UPGRADE_HEAD, _UPGRADE_BODY),
        # The header's name split by a read boundary, and its line's start alone.
        (
            _UPGRADE_HEAD[: _UPGRADE_HEAD.index(b"Upgrade:") + 4],
            _UPGRADE_HEAD[_UPGRADE_HEAD.index(b"Upgrade:") + 4 :] + _UPGRADE_BODY,
        ),
        (
            _UPGRADE_HEAD[: _UPGRADE_HEAD.index(b"Upgrade:")],
            _UPGRADE_HEAD[_UPGRADE_HEAD.index(b"Upgrade:") :] + _UPGRADE_BODY,
        ),
        (
            _UPGRADE_HEAD[: _AT - 2],
            *(bytes([b]) for b in _UPGRADE_HEAD[_AT - 2 : _AT + 12]),
            _UPGRADE_HEAD[_AT + 12 :] + _UPGRADE_BODY,
        ),
    ],
    ids=["one-write", "head-then-body", "name-split", "line-start-split", "trickled"],
)
def test_an_offered_upgrade_is_ignored_and_the_request_answered_with_its_body(
    guarded: Sidecar, writes: tuple[bytes, ...]
) -> None:
    """Java's HttpClient offers h2c on every http:// request; httptools would take the
    body for the other protocol and the call would be answered without it."""
    answer = _exchange(guarded, *writes)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"MeteringRecordId"' in answer


def test_upgrade_in_a_header_value_is_left_as_it_is(guarded: Sidecar) -> None:
    # The value starts a read, not a line: it is no header of its own.
    answer = _exchange(
        guarded,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: ",
        b"upgrade:kept\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"x-request-id: upgrade:kept\r\n" in answer
