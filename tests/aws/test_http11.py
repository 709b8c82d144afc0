"""The sidecar's own HTTP/1.1 pool (app.aws.http11) against real sockets on loopback:
servers that keep connections, drop them, stall, lie, speak TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.aws.http11 import Http11Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
TIMEOUTS = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


def _answer(body: bytes, *, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


async def _request(reader: asyncio.StreamReader) -> bytes:
    """One request's body (requests here always carry Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return await reader.readexactly(length)


class Server:
    """A scripted server: ``handler(reader, writer, n)`` serves connection number ``n``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            # The client went, or the test ended with this connection still open.
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """``handler`` listening on 127.0.0.1."""
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/"
    try:
        yield server
    finally:
        listener.close()


def _transport(connections: int = 4, expiry: float = 30.0) -> Http11Transport:
    return Http11Transport(
        httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=expiry,
        )
    )


async def _post(
    transport: httpx.AsyncBaseTransport, url: str, body: bytes, **timeouts: float
) -> httpx.Response:
    request = httpx.Request(
        "POST",
        url,
        headers={"X-Amz-Target": "AWSMPMeteringService.MeterUsage"},
        content=body,
        extensions={"timeout": {**TIMEOUTS, **timeouts}},
    )
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
    """Answer every request on the connection with its own body."""
    while True:
        body = await _request(reader)
        writer.write(_answer(body))
        await writer.drain()


async def test_requests_share_one_kept_alive_connection() -> None:
    async with serving(echo_forever) as server:
        transport = _transport()
        for n in range(5):
            response = await _post(transport, server.url, f"call {n}".encode())
            assert response.status_code == 200
            assert response.content == f"call {n}".encode()
            assert response.headers["content-type"] == "application/x-amz-json-1.1"
        assert server.connections == 1
        await transport.aclose()


async def test_a_connection_the_server_dropped_while_idle_is_replaced_at_once() -> None:
    async def one_answer_then_hang_up(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        body = await _request(reader)
        writer.write(_answer(body))
        await writer.drain()

    async with serving(one_answer_then_hang_up) as server:
        transport = _transport()
        assert (await _post(transport, server.url, b"first")).content == b"first"
        await asyncio.sleep(0.1)  # the server has closed the pooled connection
        assert (await _post(transport, server.url, b"second")).content == b"second"
        assert server.connections == 2


async def test_connection_close_and_expiry_are_honoured() -> None:
    async def close_after_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        body = await _request(reader)
        writer.write(_answer(body, extra=b"Connection: close\r\n"))
        await writer.drain()
        await asyncio.sleep(1)

    async with serving(close_after_answer) as server:
        transport = _transport()
        for _ in range(3):
            assert (await _post(transport, server.url, b"x")).status_code == 200
        assert server.connections == 3
    async with serving(echo_forever) as server:
        transport = _transport(expiry=0.05)
        await _post(transport, server.url, b"a")
        await asyncio.sleep(0.1)
        await _post(transport, server.url, b"b")
        assert server.connections == 2


async def test_chunked_answers_and_answers_that_end_with_the_connection_are_read_whole() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _request(reader)
        writer.write(
            b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"__t\r\n1b\r\nype":"ThrottlingException"}\r\n0\r\n\r\n'
        )
        await writer.drain()
        await asyncio.sleep(1)

    async def until_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await _request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"MeteringRecordId":')
        await writer.drain()
        writer.write(b'"r-1"}')
        await writer.drain()

    async with serving(chunked) as server:
        response = await _post(_transport(), server.url, b"{}")
        assert response.status_code == 400
        assert response.json() == {"__type": "ThrottlingException"}
    async with serving(until_close) as server:
        response = await _post(_transport(), server.url, b"{}")
        assert response.json() == {"MeteringRecordId": "r-1"}


async def test_bytes_after_an_answer_retire_the_connection() -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while True:
            body = await _request(reader)
            extra = _answer(b"unasked") if n == 1 else b""
            writer.write(_answer(body) + extra)
            await writer.drain()
            if n == 2:
                await asyncio.sleep(0.05)
                writer.write(b"HTTP/1.1 200 OK\r\n")  # later, unasked
                await writer.drain()

    async with serving(chatty) as server:
        transport = _transport()
        for body in (b"one", b"two", b"three"):
            assert (await _post(transport, server.url, body)).content == body
            await asyncio.sleep(0.1)
        # The first connection carried a second answer, the second spoke out of
        # turn while idle: neither was used again.
        assert server.connections == 3


async def test_a_stalled_answer_is_a_read_timeout_and_its_connection_is_never_reused() -> None:
    async def slow_first(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        while True:
            body = await _request(reader)
            if body == b"slow":
                await asyncio.sleep(0.5)  # then answers, late
            writer.write(_answer(body))
            await writer.drain()

    async with serving(slow_first) as server:
        transport = _transport()
        with pytest.raises(httpx.ReadTimeout):
            await _post(transport, server.url, b"slow", read=0.1)
        # Cancelled mid-answer as well (the backend's deadline).
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await _post(transport, server.url, b"slow")
        await asyncio.sleep(0.6)  # the late answers arrive on the abandoned connections
        response = await _post(transport, server.url, b"fresh")
        assert response.content == b"fresh"
        assert server.connections == 3


async def test_broken_answers_are_transport_errors() -> None:
    async def half_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await _request(reader)

    async with serving(half_head) as server:
        with pytest.raises(httpx.ReadError):
            await _post(_transport(), server.url, b"{}")
    async with serving(garbage) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await _post(_transport(), server.url, b"{}")
    async with serving(hang_up) as server:
        # A new connection closed without a word: not retried again.
        with pytest.raises(httpx.ReadError):
            await _post(_transport(), server.url, b"{}")
        assert server.connections == 1
    async with serving(echo_forever) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await _post(_transport(), url, b"{}")


async def test_the_pool_holds_at_most_its_connections_and_waits_its_pool_timeout() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            body = await _request(reader)
            await release.wait()
            writer.write(_answer(body))
            await writer.drain()

    async with serving(held) as server:
        transport = _transport(connections=2)
        first = asyncio.create_task(_post(transport, server.url, b"1"))
        second = asyncio.create_task(_post(transport, server.url, b"2"))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await _post(transport, server.url, b"3", pool=0.1)
        waiting = asyncio.create_task(_post(transport, server.url, b"4"))
        await asyncio.sleep(0.1)
        release.set()
        answers = [r.content for r in await asyncio.gather(first, second, waiting)]
        assert answers == [b"1", b"2", b"4"]
        assert server.connections == 2


async def test_closing_the_pool_closes_connections_idle_and_in_use() -> None:
    release = asyncio.Event()
    hung_up: list[int] = []

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        try:
            while True:
                body = await _request(reader)
                if body == b"held":
                    await release.wait()
                writer.write(_answer(body))
                await writer.drain()
        except asyncio.IncompleteReadError:
            hung_up.append(n)
            raise

    async with serving(held) as server:
        transport = _transport()
        await _post(transport, server.url, b"idle")  # connection 1, then idle
        in_use = asyncio.create_task(_post(transport, server.url, b"held"))  # reuses 1
        await asyncio.sleep(0.05)
        other = asyncio.create_task(_post(transport, server.url, b"x"))  # connection 2
        await asyncio.sleep(0.05)
        await transport.aclose()
        release.set()
        assert (await in_use).content == b"held"
        assert (await other).content == b"x"
        await asyncio.sleep(0.1)
        assert sorted(hung_up) == [1, 2]


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only the server's self-signed cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_tls_is_verified(tmp_path: Path) -> None:
    server_context, client_context = _tls_pair(tmp_path)
    async with serving(echo_forever, tls=server_context) as server:
        trusting = Http11Transport(httpx.Limits(max_connections=2), ssl_context=client_context)
        for body in (b"a", b"b"):
            assert (await _post(trusting, server.url, body)).content == body
        assert server.connections == 1
        # The system's trust store does not know the self-signed certificate.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await _post(_transport(), server.url, b"c")
