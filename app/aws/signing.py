"""SigV4 for the one request shape the sidecar sends, computed once per request, cheaply.

Every call is a ``POST`` of a JSON body to one endpoint, with the same three
headers besides the date and the session token. So the canonical request is
assembled from constants, and the signing key (four HMACs) is derived once
per secret and day instead of per request. botocore's ``SigV4Auth`` does the
same arithmetic for any request, at several times the cost; the tests check
that both sign identically (``tests/aws/test_signing.py``).

What botocore teaches still holds: one frozen snapshot of the credentials per
request (the key, secret and token can never straddle a refresh), and exactly
the headers that are sent are signed.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator
from datetime import UTC, datetime

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from app.aws.classify import classify
from app.aws.credentials import CredentialProvider
from app.metering.errors import Fault
from app.metering.protocol import CONTENT_TYPE, SIGNING_NAME, TARGET_PREFIX, parse_error

_ALGORITHM = "AWS4-HMAC-SHA256"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class RequestSigner:
    """Signs the sidecar's requests to one endpoint and region."""

    def __init__(self, url: str, host: str, region: str, service: str = SIGNING_NAME) -> None:
        self.host = host
        self._region = region
        self._service = service
        self._scope_tail = f"/{region}/{service}/aws4_request"
        self._path = _canonical_path(url, host)
        # (secret, day) -> signing key: one derivation a day per secret.
        self._key_for: tuple[str, str] | None = None
        self._key = b""

    def sign(
        self,
        *,
        action: str,
        body: bytes,
        credentials: ReadOnlyCredentials,
        now: datetime | None = None,
    ) -> dict[str, str]:
        """The headers of a signed ``POST`` of ``body`` for ``action``: exactly these are
        sent, and all of them are signed."""
        moment = now or datetime.now(UTC)
        amz_date = moment.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        target = f"{TARGET_PREFIX}.{action}"
        token = credentials.token
        if token:
            signed = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
            canonical_headers = (
                f"content-type:{CONTENT_TYPE}\nhost:{self.host}\nx-amz-date:{amz_date}\n"
                f"x-amz-security-token:{token.strip()}\nx-amz-target:{target}\n"
            )
        else:
            signed = "content-type;host;x-amz-date;x-amz-target"
            canonical_headers = (
                f"content-type:{CONTENT_TYPE}\nhost:{self.host}\nx-amz-date:{amz_date}\n"
                f"x-amz-target:{target}\n"
            )
        canonical = (
            f"POST\n{self._path}\n\n{canonical_headers}\n{signed}\n"
            f"{hashlib.sha256(body).hexdigest()}"
        )
        scope = day + self._scope_tail
        to_sign = (
            f"{_ALGORITHM}\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.new(
            self._signing_key(credentials.secret_key, day), to_sign.encode(), hashlib.sha256
        ).hexdigest()
        headers = {
            "Host": self.host,
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": target,
            "X-Amz-Date": amz_date,
            "Authorization": (
                f"{_ALGORITHM} Credential={credentials.access_key}/{scope}, "
                f"SignedHeaders={signed}, Signature={signature}"
            ),
        }
        if token:
            headers["X-Amz-Security-Token"] = token
        return headers

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key_for != (secret, day):
            key = _hmac(("AWS4" + secret).encode(), day)
            key = _hmac(key, self._region)
            key = _hmac(key, self._service)
            self._key = _hmac(key, "aws4_request")
            self._key_for = (secret, day)
        return self._key


class CredentialsAuth(httpx.Auth):
    """SigV4 as an ``httpx.Auth``: signs each request with the provider's current
    credentials and, when AWS refuses the credentials themselves (whatever HTTP
    status it used), refreshes them once and resends the request re-signed.

    One per call: ``refreshed`` says whether this call has spent its refresh.
    ``before_resend`` runs before the resend (the call takes another quota
    slot); ``on_refused`` hears the refusal (a metric, a log line).
    """

    requires_response_body = True

    def __init__(
        self,
        signer: RequestSigner,
        credentials: CredentialProvider,
        *,
        before_resend: Callable[[], Awaitable[None]] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._signer = signer
        self._credentials = credentials
        self._before_resend = before_resend
        self._on_refused = on_refused
        self.refreshed = False

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """The sidecar sends asynchronously only."""
        raise NotImplementedError("CredentialsAuth is async only")
        yield request  # pragma: no cover

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Sign, send; on a refusal of the credentials, refresh once, re-sign, resend."""
        credentials = self._credentials.current()
        self._sign(request, credentials)
        response = yield request
        if response.status_code == 200 or self.refreshed:
            return
        code, _ = parse_error(response.status_code, response.headers, response.content)
        if classify(code, response.status_code) is not Fault.CREDENTIALS:
            return
        self.refreshed = True
        if self._on_refused is not None:
            self._on_refused(code)
        await self._credentials.force_refresh(credentials)
        self._sign(request, self._credentials.current())
        if self._before_resend is not None:
            await self._before_resend()
        yield request

    def _sign(self, request: httpx.Request, credentials: ReadOnlyCredentials) -> None:
        action = request.headers["X-Amz-Target"].rpartition(".")[2]
        signed = self._signer.sign(action=action, body=request.content, credentials=credentials)
        # One new header list rather than an update (which searches the list once
        # per header); a re-signed resend replaces every signed header.
        names = {name.lower().encode() for name in signed}
        kept = [(k, v) for k, v in request.headers.raw if k.lower() not in names]
        request.headers = httpx.Headers(
            kept + [(k.encode(), v.encode()) for k, v in signed.items()]
        )


def _canonical_path(url: str, host: str) -> str:
    """The canonical URI of ``url``, as botocore normalizes and encodes it (once)."""
    request = AWSRequest(method="POST", url=url, data=b"", headers={"Host": host})
    signer = SigV4Auth(ReadOnlyCredentials("x", "x", None), SIGNING_NAME, "us-east-1")
    return str(signer.canonical_request(request)).split("\n", 2)[1]
