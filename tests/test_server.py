"""The two listeners and their limits, over real sockets to the real process."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
        assert ops.post("/v1/meter-usage", json={}).status_code == 404


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


def test_a_connection_flood_is_refused_with_retry_after_and_service_goes_on(
    guarded: Sidecar,
) -> None:
    port = _port(guarded.url)
    flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(80)]
    try:
        time.sleep(0.3)
        refused = 0
        for sock in flood:
            sock.settimeout(0.2)
            try:
                head = sock.recv(4096)
            except TimeoutError:
                continue
            if head.startswith(b"HTTP/1.1 503"):
                assert b"retry-after: 1" in head.lower()
                refused += 1
        # 40 are held (METERING_MAX_CLIENT_CONNECTIONS); the rest are refused at once.
        assert refused >= 35, refused
    finally:
        for sock in flood:
            sock.close()
    time.sleep(0.3)
    assert guarded.client.get("/healthz").status_code == 200


def test_a_taken_operations_port_fails_the_start_loudly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="exited"):  # noqa: SIM117
            with run_sidecar({**SANDBOX, "METERING_OPS_PORT": str(port)}, startup_timeout=20):
                pass
