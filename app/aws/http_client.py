"""The one HTTP client the sidecar sends to AWS through: ``httpx.AsyncClient`` on
httpx's own transport (httpcore), with a ceiling on what AWS may answer.

One client for the process, made by ``create_client`` and closed by the lifespan.
Redirects are never followed, and httpx's transports keep their default of
``retries=0`` (httpcore's connect retries): the sidecar's retry policy
(``app.runtime.retry``) is the only one, so every attempt is counted and paced.
httpcore brings what the sidecar's own client lacked: Happy Eyeballs (anyio's
``connect_tcp``), ``1xx`` answers skipped before the final one, a limit on an
answer's head (100 KiB, h11), proxies.

**Proxies**, exactly as httpx reads them: ``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY`` and ``NO_PROXY`` (either case), through ``trust_env=True``. httpx
reads them only when it builds its own transports, which is why the client is
given no ``transport=``. botocore (the credential chain's STS and container
calls) reads the same variables through ``urllib.request``; checked against
httpx 0.28.1 and botocore 1.44, they agree on ``NO_PROXY`` hostnames (a suffix
on a label boundary, any case), exact IPv4 addresses, ``host:port`` entries,
``localhost`` and a lone ``*``. Where they differ:

- ``ALL_PROXY``: httpx sends through it; botocore ignores it.
- ``NO_PROXY=.example.com``: botocore bypasses ``example.com`` itself too;
  httpx only its subdomains.
- ``NO_PROXY=internal,*``: httpx bypasses every host once ``*`` is anywhere in
  the list; botocore only when the whole value is ``*``.
- ``NO_PROXY=::1`` bypasses ``[::1]`` in httpx, not in botocore; the bracketed
  ``[::1]`` stops httpx from making a client at all, and the sidecar then
  refuses to start, saying which variables to look at.
- Neither honours a CIDR range (``10.0.0.0/8``) or ``*.example.com``.
- A ``socks5://`` proxy needs the ``socksio`` package, which is not installed:
  refused at start (botocore has no SOCKS support either). botocore's
  ``proxies_config`` (a proxy's own CA bundle or client certificate) is client
  configuration in code, not environment; it has no equivalent here, and an
  ``https://`` proxy's certificate is checked against the same trust as AWS's.

**TLS trust**, one ``ssl.SSLContext`` built at start: ``AWS_CA_BUNDLE`` (or
``ca_bundle`` in the AWS config file, as botocore reads it), else
``SSL_CERT_FILE``, else the bundle botocore itself uses
(``botocore.httpsession.get_cert_path(True)``: certifi's). botocore does not read
``SSL_CERT_FILE`` when certifi is installed; httpx does, and so does the sidecar.
``SSL_CERT_DIR``, which httpx reads only when it builds the context itself, is
not read. A bundle that cannot be loaded fails the start.

**A ceiling on AWS's answers**: ``MAX_ANSWER_BYTES`` (AWS's answers are a few
KiB). A ``response`` event hook refuses an answer whose ``Content-Length`` is
over it, or that is compressed (the client asks for ``identity``; a compressed
body could expand past any ceiling), before a byte of the body is read, and
wraps the body's stream so that a read stops once more than the ceiling has
arrived. Every read of the body goes through that stream: the auth flow's,
which classifies an error answer, and ``AsyncClient.send``'s own. A request whose
answer is legitimately larger and bounded by the request itself (SQS's
ReceiveMessage: so many messages of at most so many bytes) names its own
ceiling in its ``ANSWER_CEILING`` extension (``app.aws.sqs``). The refusal is
an ``httpx.TransportError`` (``AnswerRefused``), mapped like any other failure
to reach AWS (``transport_errors``, here, used by every call to AWS); the
connection is closed, never reused. Cookies are neither stored nor sent: the jar
refuses them all.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator

import botocore.exceptions
import botocore.session
import httpx
from botocore.httpsession import get_cert_path

from app import __version__
from app.config import Settings
from app.metering.errors import UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("app.upstream")

USER_AGENT = f"metering-sidecar/{__version__}"
# AWS Marketplace Metering's answers (and SQS's, but for ReceiveMessage) are a few
# KiB at most.
MAX_ANSWER_BYTES = 1024 * 1024
# The request extension by which one request names its own answer's ceiling, in bytes.
ANSWER_CEILING = "metering_answer_ceiling"
PROXY_VARIABLES = "HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY"


class OutboundSettingsError(RuntimeError):
    """The environment asks for outbound HTTP the client cannot be made for (a proxy
    variable httpx cannot read, a CA bundle that cannot be loaded). Raised at start."""


class AnswerRefused(httpx.RemoteProtocolError):
    """An answer the sidecar will not read: larger than ``MAX_ANSWER_BYTES`` or
    compressed. A transport error: the call maps it to ``UpstreamUnavailable``."""


def create_timeout(settings: Settings) -> httpx.Timeout:
    """Explicit timeouts for every phase of an attempt."""
    return httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        pool=settings.pool_timeout,
    )


def ca_bundle() -> tuple[str, str]:
    """(where the trusted CA certificates come from, the file): see the module docstring."""
    try:
        configured = botocore.session.Session().get_config_variable("ca_bundle")
    except botocore.exceptions.ProfileNotFound:
        # The credential chain will say so; trust is read from the environment alone.
        configured = os.environ.get("AWS_CA_BUNDLE")
    if configured:
        from_env = os.environ.get("AWS_CA_BUNDLE") == configured
        return "AWS_CA_BUNDLE" if from_env else "ca_bundle in the AWS config", str(configured)
    cert_file = os.environ.get("SSL_CERT_FILE")
    if cert_file:
        return "SSL_CERT_FILE", cert_file
    return "botocore's default bundle", str(get_cert_path(True))


def create_ssl_context() -> ssl.SSLContext:
    """The one TLS context for AWS (and for an ``https://`` proxy), verifying against
    ``ca_bundle()``."""
    source, path = ca_bundle()
    try:
        context = ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutboundSettingsError(
            f"{source}: cannot load CA certificates from {path} ({reason})"
        ) from None
    log.info("trusting CA certificates for AWS", extra={"source": source, "path": path})
    return context


def create_client(settings: Settings) -> httpx.AsyncClient:
    """The client every request to AWS goes through (see the module docstring)."""
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=30.0,
    )
    verify = create_ssl_context()
    try:
        return httpx.AsyncClient(
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            cookies=http.cookiejar.CookieJar(
                policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
            ),
            verify=verify,
            timeout=create_timeout(settings),
            limits=limits,
            follow_redirects=False,
            trust_env=True,
            event_hooks={"response": [refuse_unbounded_answer]},
        )
    except (httpx.InvalidURL, ValueError, ImportError) as exc:
        # The value itself is not repeated: a proxy URL may carry a password.
        raise OutboundSettingsError(
            f"httpx cannot use the proxy settings in {PROXY_VARIABLES} "
            f"(or their lower-case forms): {type(exc).__name__}"
        ) from None


async def refuse_unbounded_answer(response: httpx.Response) -> None:
    """The ``response`` hook: refuse what could be larger than the ceiling before the
    body is read, and cap the body's stream."""
    encoding = response.headers.get("content-encoding", "")
    if any(part.strip().lower() not in ("", "identity") for part in encoding.split(",")):
        raise AnswerRefused(
            "the answer is compressed (a Content-Encoding other than identity, "
            "which the sidecar does not ask for)",
            request=response.request,
        )
    ceiling = answer_ceiling(response.request)
    length = response.headers.get("content-length", "").strip()
    if length.isdigit() and int(length) > ceiling:
        raise AnswerRefused(
            f"the answer announces {int(length):,} bytes, over the {ceiling:,}-byte ceiling",
            request=response.request,
        )
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = CappedStream(response.stream, ceiling, response.request)


def answer_ceiling(request: httpx.Request) -> int:
    """The most bytes the answer to ``request`` may have: its ``ANSWER_CEILING``
    extension when it names a positive whole number, else ``MAX_ANSWER_BYTES``."""
    ceiling = request.extensions.get(ANSWER_CEILING)
    if isinstance(ceiling, int) and not isinstance(ceiling, bool) and ceiling > 0:
        return ceiling
    return MAX_ANSWER_BYTES


class CappedStream(httpx.AsyncByteStream):
    """A response body that raises ``AnswerRefused`` once more than ``limit`` bytes
    have arrived: at most one read past the ceiling is ever held."""

    def __init__(self, stream: httpx.AsyncByteStream, limit: int, request: httpx.Request) -> None:
        self._stream = stream
        self._limit = limit
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self._stream:
            received += len(chunk)
            if received > self._limit:
                raise AnswerRefused(
                    f"the answer ran past the {self._limit:,}-byte ceiling and was cut off",
                    request=self._request,
                )
            yield chunk

    async def aclose(self) -> None:
        """Close the body (and with an unfinished one, its connection)."""
        await self._stream.aclose()


@contextlib.contextmanager
def transport_errors(action: str) -> Iterator[None]:
    """Every failure to get an answer from AWS, mapped once: ``UpstreamTimeout`` when
    AWS did not answer in time, ``UpstreamUnavailable`` when it could not be reached,
    hung up, or answered what the client refuses to read (``AnswerRefused``)."""
    try:
        yield
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise UpstreamTimeout(f"AWS did not answer {action} in time") from exc
    except AnswerRefused as exc:
        raise UpstreamUnavailable(f"AWS's answer to {action} was refused: {exc}") from exc
    except httpx.TransportError as exc:
        raise UpstreamUnavailable(
            f"could not reach AWS for {action} ({type(exc).__name__}{_tls_reason(exc)})"
        ) from exc


def _tls_reason(exc: BaseException) -> str:
    """``: <why>`` when a TLS certificate check is behind ``exc``, else nothing."""
    cause: BaseException | None = exc
    # httpx's error is raised from httpcore's, which is raised from ssl's.
    for _ in range(4):
        if cause is None:
            break
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f": AWS's TLS certificate is not trusted ({cause.verify_message}); "
                "see AWS_CA_BUNDLE"
            )
        cause = cause.__cause__ or cause.__context__
    return ""
