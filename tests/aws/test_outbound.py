"""Outbound HTTP as operators configure it and as a hostile upstream tests it: proxies
(``HTTP_PROXY``, ``NO_PROXY``), TLS trust (``AWS_CA_BUNDLE``, ``SSL_CERT_FILE``), a
ceiling on AWS's answers, ``1xx`` answers, cookies. Every HTTP test runs the real
sidecar process; the client's own settings are checked in-process."""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import ipaddress
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import pytest
from botocore.httpsession import get_cert_path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.aws.http_client import (
    MAX_ANSWER_BYTES,
    USER_AGENT,
    OutboundSettingsError,
    ca_bundle,
    create_client,
)
from app.config import Settings
from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import FakeMetering, IssuedKey, serve
from tests.fakes.hostile import (
    HostileUpstream,
    announce_and_stall,
    compressed,
    continue_then,
    endless_chunked,
    hostile_upstream,
    metering_answer,
    plain,
)
from tests.sidecar import Sidecar, run_sidecar

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer"}
    | {"transfer-encoding", "upgrade"}
)


def _meter() -> dict[str, Any]:
    return {"UsageDimension": f"dim-{uuid.uuid4().hex[:10]}", "UsageQuantity": 1}


# --- proxies -----------------------------------------------------------------------


class _ForwardProxy(http.server.ThreadingHTTPServer):
    """A plain HTTP forward proxy that records each request line it is sent."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.lines: list[str] = []

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ForwardProxy

    def do_POST(self) -> None:
        self.server.lines.append(self.requestline)
        target = urlsplit(self.path)  # absolute-form, as a client speaks to a proxy
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=10)
        try:
            # Host, the signature and every other end-to-end header as the client sent them.
            upstream.putrequest(
                "POST", target.path or "/", skip_host=True, skip_accept_encoding=True
            )
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders(body)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response_only(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads ``lines``."""


@pytest.fixture
def proxy() -> Iterator[_ForwardProxy]:
    """A running recording forward proxy on loopback."""
    server = _ForwardProxy()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)
    server.server_close()


def test_http_proxy_carries_the_call(
    proxy: _ForwardProxy, fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    env = aws_mode_env(fake_aws.url, static_key, HTTP_PROXY=proxy.url, **FAST_RETRIES)
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    assert proxy.lines == [f"POST {fake_aws.url}/ HTTP/1.1"]
    (request,) = fake_aws.metering.requests
    # The fake checked the signature on what came through the proxy.
    assert request.signature_valid
    assert request.access_key_id == static_key.access_key_id


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,{netloc}", "*"])
def test_no_proxy_covering_the_endpoint_goes_direct(
    proxy: _ForwardProxy, fake_aws: FakeAws, static_key: IssuedKey, no_proxy: str
) -> None:
    no_proxy = no_proxy.format(netloc=urlsplit(fake_aws.url).netloc)
    env = aws_mode_env(
        fake_aws.url, static_key, HTTP_PROXY=proxy.url, NO_PROXY=no_proxy, **FAST_RETRIES
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    assert proxy.lines == []
    assert fake_aws.metering.requests[0].signature_valid


def test_a_proxy_setting_httpx_cannot_read_fails_the_start_without_repeating_it(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    env = aws_mode_env(
        fake_aws.url, static_key, HTTPS_PROXY="ftp://user:proxy-password@127.0.0.1:9"
    )
    with pytest.raises(RuntimeError, match="exited") as failure:  # noqa: SIM117
        with run_sidecar(env, startup_timeout=20):
            pass
    assert "cannot use the proxy settings in HTTPS_PROXY" in str(failure.value)
    assert "proxy-password" not in str(failure.value)


# --- TLS trust ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Pki:
    """A private CA (``ca``) and a certificate for 127.0.0.1 it signed (``chain``, ``key``)."""

    ca: Path
    chain: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("metering-sidecar test CA"))
        .issuer_name(_name("metering-sidecar test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    paths = _Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths.ca.write_bytes(ca.public_bytes(pem))
    paths.chain.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    paths.key.write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


@pytest.fixture(scope="module")
def tls_aws(pki: _Pki, fake_aws_session: FakeAws) -> Iterator[FakeAws]:
    """A second fake AWS, over TLS with the private CA's certificate, trusting the same keys."""
    metering = FakeMetering(fake_aws_session.registry, region="us-east-1")
    with serve(metering, tls=(str(pki.chain), str(pki.key))) as server:
        yield FakeAws(fake_aws_session.registry, metering, server)


@pytest.fixture
def tls_fake(tls_aws: FakeAws) -> FakeAws:
    """The TLS fake, reset for this test."""
    tls_aws.metering.quiet()
    tls_aws.metering.reset()
    return tls_aws


def _call_over_tls(fake: FakeAws, key: IssuedKey, **trust: str) -> httpx.Response:
    env = aws_mode_env(fake.url, key, **trust, **FAST_RETRIES)
    with run_sidecar(env, wait_ready=True) as sidecar:
        return sidecar.client.post("/v1/meter-usage", json=_meter())


def test_tls_with_an_unknown_ca_is_a_clear_502(tls_fake: FakeAws, static_key: IssuedKey) -> None:
    assert tls_fake.url.startswith("https://")
    response = _call_over_tls(tls_fake, static_key)
    assert response.status_code == 502, response.text
    problem = response.json()
    assert problem["code"] == "UpstreamUnavailable"
    assert "TLS certificate is not trusted" in problem["detail"]
    assert "AWS_CA_BUNDLE" in problem["detail"]
    # No handshake completed: nothing reached the fake.
    assert tls_fake.metering.requests == []


@pytest.mark.parametrize("variable", ["AWS_CA_BUNDLE", "SSL_CERT_FILE"])
def test_tls_trusting_the_ca_bundle_succeeds(
    tls_fake: FakeAws, static_key: IssuedKey, pki: _Pki, variable: str
) -> None:
    response = _call_over_tls(tls_fake, static_key, **{variable: str(pki.ca)})
    assert response.status_code == 200, response.text
    (request,) = tls_fake.metering.requests
    assert request.signature_valid


def test_aws_ca_bundle_comes_before_ssl_cert_file(
    tls_fake: FakeAws, static_key: IssuedKey, pki: _Pki
) -> None:
    response = _call_over_tls(
        tls_fake, static_key, AWS_CA_BUNDLE=str(get_cert_path(True)), SSL_CERT_FILE=str(pki.ca)
    )
    assert response.status_code == 502, response.text
    assert "not trusted" in response.json()["detail"]


def test_a_ca_bundle_that_cannot_be_read_fails_the_start(
    fake_aws: FakeAws, static_key: IssuedKey, tmp_path: Path
) -> None:
    env = aws_mode_env(fake_aws.url, static_key, AWS_CA_BUNDLE=str(tmp_path / "missing.pem"))
    with pytest.raises(RuntimeError, match="exited") as failure:  # noqa: SIM117
        with run_sidecar(env, startup_timeout=20):
            pass
    assert f"AWS_CA_BUNDLE: cannot load CA certificates from {tmp_path}" in str(failure.value)


# --- hostile answers ---------------------------------------------------------------


@pytest.fixture
def hostile(fake_aws_session: FakeAws) -> Iterator[HostileUpstream]:
    """A raw-socket upstream that checks signatures with the session's keys."""
    with hostile_upstream(plain(metering_answer()), fake_aws_session.registry) as upstream:
        yield upstream


@pytest.fixture
def hostile_sidecar(hostile: HostileUpstream, static_key: IssuedKey) -> Iterator[Sidecar]:
    """A sidecar forwarding to the hostile upstream."""
    with run_sidecar(aws_mode_env(hostile.url, static_key, **FAST_RETRIES), wait_ready=True) as s:
        yield s


def _socket_buffers() -> int:
    """The most a loopback connection's receive and send buffers may grow to together."""
    return sum(
        int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        for name in ("tcp_rmem", "tcp_wmem")
    )


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_an_endless_chunked_answer_is_cut_off_at_the_ceiling(
    hostile: HostileUpstream, hostile_sidecar: Sidecar
) -> None:
    # A normal call first: the process has loaded everything a call needs.
    for _ in range(3):
        assert hostile_sidecar.client.post("/v1/meter-usage", json=_meter()).status_code == 200
    before = _rss_mb(hostile_sidecar.process.pid)
    hostile.answer = endless_chunked()
    started = time.monotonic()
    response = hostile_sidecar.client.post("/v1/meter-usage", json=_meter())
    elapsed = time.monotonic() - started
    grown = _rss_mb(hostile_sidecar.process.pid) - before
    assert response.status_code == 502, response.text
    problem = response.json()
    assert problem["code"] == "UpstreamUnavailable"
    assert f"ran past the {MAX_ANSWER_BYTES:,}-byte ceiling" in problem["detail"]
    # Bounded by the ceiling, not by the answer (endless: unbounded, it took 1.38 GB
    # before); the allocator's own growth under a loaded machine is the slack.
    assert grown <= 64, f"RSS grew by {grown:.1f} MB"
    assert elapsed < 5
    endless = hostile.received()[3:]
    # Every attempt (FAST_RETRIES: 4) was cut off by the client's close, long before
    # the upstream's own 512 MiB cap: past the ceiling (and one 64 KiB read), the
    # upstream got rid of only what the two sockets' buffers could hold.
    assert len(endless) == 4
    assert all(r.signature_valid for r in endless)
    most = MAX_ANSWER_BYTES + 64 * 1024 + _socket_buffers()
    for request in endless:
        assert MAX_ANSWER_BYTES <= request.sent <= most, (request.sent, most)


def test_a_content_length_over_the_ceiling_is_refused_unread(
    hostile: HostileUpstream, hostile_sidecar: Sidecar
) -> None:
    hostile.answer = announce_and_stall(5 * 1024**3)
    started = time.monotonic()
    response = hostile_sidecar.client.post("/v1/meter-usage", json=_meter())
    elapsed = time.monotonic() - started
    assert response.status_code == 502, response.text
    problem = response.json()
    assert problem["code"] == "UpstreamUnavailable"
    assert "announces 5,368,709,120 bytes" in problem["detail"]
    # Refused on the head: had the body been awaited, each attempt would have sat
    # out the 1 s read timeout and the call would have ended 504 at its 4 s deadline.
    assert elapsed < 3.5
    assert len(hostile.received()) == 4
    assert all(r.held < 1 for r in hostile.received())


def test_a_compressed_answer_is_refused(hostile: HostileUpstream, hostile_sidecar: Sidecar) -> None:
    hostile.answer = compressed()
    response = hostile_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "UpstreamUnavailable"
    assert "compressed" in response.json()["detail"]
    (first, *_) = hostile.received()
    assert first.header("accept-encoding") == "identity"


@pytest.mark.parametrize("informational", [1, 3])
def test_100_continue_then_200_is_a_success(
    hostile: HostileUpstream, hostile_sidecar: Sidecar, informational: int
) -> None:
    hostile.answer = continue_then(metering_answer("after-continue"), informational)
    response = hostile_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    assert response.json()["MeteringRecordId"] == "after-continue"
    # One request: the 100 was not taken as the answer, nor the call resent.
    assert len(hostile.received()) == 1


def test_cookies_are_neither_kept_nor_sent(
    hostile: HostileUpstream, hostile_sidecar: Sidecar
) -> None:
    hostile.answer = plain(metering_answer(extra="Set-Cookie: AWSALB=sticky; Path=/\r\n"))
    for _ in range(2):
        assert hostile_sidecar.client.post("/v1/meter-usage", json=_meter()).status_code == 200
    first, second = hostile.received()
    assert second.header("cookie") is None
    assert first.header("user-agent") == USER_AGENT
    assert first.signature_valid
    assert second.signature_valid


# --- the client's own settings -------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No proxy, CA bundle or AWS profile from the host."""
    for name in ("AWS_CA_BUNDLE", "AWS_PROFILE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    return monkeypatch


def _settings() -> Settings:
    return Settings(mode="aws", max_connections=7, connect_timeout=2.5, read_timeout=6)


def _pool(transport: httpx.AsyncBaseTransport | None) -> httpcore.AsyncConnectionPool:
    assert isinstance(transport, httpx.AsyncHTTPTransport)
    return transport._pool


async def test_the_client_is_httpx_own_with_no_retries_and_no_redirects(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    async with create_client(_settings()) as client:
        assert client.follow_redirects is False
        assert client.trust_env is True
        assert client.headers["Accept-Encoding"] == "identity"
        assert client.headers["User-Agent"] == USER_AGENT
        assert client.timeout == httpx.Timeout(connect=2.5, read=6, write=6, pool=3)
        # The direct transport and the proxy's: httpcore's, and neither retries.
        assert _pool(client._transport)._retries == 0
        (proxied,) = client._mounts.values()
        assert _pool(proxied)._retries == 0
        assert _pool(client._transport)._max_connections == 7


def test_ca_bundle_reads_as_botocore_then_ssl_cert_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert ca_bundle() == ("botocore's default bundle", get_cert_path(True))
    clean_env.setenv("SSL_CERT_FILE", "/certs/ssl.pem")
    assert ca_bundle() == ("SSL_CERT_FILE", "/certs/ssl.pem")
    # botocore's own reading: the config file's ca_bundle, under AWS_PROFILE ...
    (tmp_path / "aws-config").write_text("[profile p]\nca_bundle = /certs/profile.pem\n")
    clean_env.setenv("AWS_PROFILE", "p")
    assert ca_bundle() == ("ca_bundle in the AWS config", "/certs/profile.pem")
    # ... and AWS_CA_BUNDLE above it.
    clean_env.setenv("AWS_CA_BUNDLE", "/certs/aws.pem")
    assert ca_bundle() == ("AWS_CA_BUNDLE", "/certs/aws.pem")
    # A profile that does not exist fails the credentials, not the trust.
    clean_env.setenv("AWS_PROFILE", "missing")
    clean_env.delenv("AWS_CA_BUNDLE")
    assert ca_bundle() == ("SSL_CERT_FILE", "/certs/ssl.pem")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("NO_PROXY", "[::1]"), ("HTTPS_PROXY", "socks5://user:proxy-password@127.0.0.1:1080")],
)
def test_proxy_settings_httpx_refuses_are_named_not_repeated(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    clean_env.setenv(variable, value)
    with pytest.raises(OutboundSettingsError, match="HTTPS_PROXY, HTTP_PROXY") as failure:
        create_client(_settings())
    assert "proxy-password" not in str(failure.value)
