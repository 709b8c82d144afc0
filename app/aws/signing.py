"""SigV4 as an ``httpx.Auth``, signed by botocore's ``SigV4Auth``.

What botocore teaches holds: one frozen snapshot of the credentials per signature
(the key, secret and token can never straddle a refresh), and exactly the headers
that matter are signed: ``Host``, ``Content-Type`` and ``X-Amz-Target`` as the
request carries them, plus what ``SigV4Auth`` adds (``X-Amz-Date``,
``X-Amz-Security-Token``, ``Authorization``). Headers a proxy or the HTTP layer
may change (``User-Agent``, ``Accept-Encoding``, ``Connection``,
``Content-Length``) are left unsigned, as botocore leaves them.

Nothing here is particular to one service: the signing name and region are
parameters, and the protocol's headers (target, content type) come with the request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Generator

import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from app.aws.classify import classify
from app.aws.credentials import CredentialProvider
from app.metering.errors import Fault
from app.metering.protocol import parse_error

# Signed as the request carries them (each only if present).
SIGNED_HEADERS = ("Host", "Content-Type", "X-Amz-Target")
# What SigV4Auth sets; all of them replaced on a re-signed resend.
SIGNATURE_HEADERS = ("X-Amz-Date", "X-Amz-Security-Token", "Authorization")


def sign(
    request: httpx.Request, credentials: ReadOnlyCredentials, *, service: str, region: str
) -> None:
    """Sign ``request`` (its body read) in place with botocore's ``SigV4Auth``."""
    signed = AWSRequest(
        method=request.method,
        url=str(request.url),
        data=request.content,
        headers={name: request.headers[name] for name in SIGNED_HEADERS if name in request.headers},
    )
    SigV4Auth(credentials, service, region).add_auth(signed)
    for name in SIGNATURE_HEADERS:
        value = signed.headers.get(name)
        if value is None:
            # A resend signed with credentials that have no token must not carry
            # the previous ones'.
            request.headers.pop(name, None)
        else:
            request.headers[name] = value


class CredentialsAuth(httpx.Auth):
    """SigV4 as an ``httpx.Auth``: signs each request with the provider's current
    credentials for ``service`` in ``region`` and, when AWS refuses the credentials
    themselves (whatever HTTP status it used), refreshes them once and resends the
    request re-signed.

    One per call: ``refreshed`` says whether this call has spent its refresh,
    ``resent`` whether the refreshed credentials were sent.
    ``before_resend`` decides whether the resend may go (it is an attempt of the
    call under the one retry policy, and takes another quota slot): when it says
    no, the refusal stands as AWS's answer. ``on_refused`` hears the refusal (a
    metric, a log line).
    """

    requires_request_body = True
    requires_response_body = True

    def __init__(
        self,
        credentials: CredentialProvider,
        *,
        service: str,
        region: str,
        before_resend: Callable[[], Awaitable[bool]] | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._credentials = credentials
        self._service = service
        self._region = region
        self._before_resend = before_resend
        self._on_refused = on_refused
        self.refreshed = False
        self.resent = False

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        """The sidecar sends asynchronously only."""
        raise NotImplementedError("CredentialsAuth is async only")
        yield request  # pragma: no cover

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        """Sign, send; on a refusal of the credentials, refresh once, re-sign, resend.

        The flow is ``AsyncClient``'s to drive. httpx honours ``requires_*_body``
        only in its own flows, so this one reads both bodies itself; the answer's
        read goes through the client's ceiling (``app.aws.http_client``).
        """
        await request.aread()
        credentials = self._credentials.current()
        self._sign(request, credentials)
        response = yield request
        await response.aread()
        if response.status_code == 200 or self.refreshed:
            return
        code, _ = parse_error(response.status_code, response.headers, response.content)
        if classify(code, response.status_code) is not Fault.CREDENTIALS:
            return
        self.refreshed = True
        if self._on_refused is not None:
            self._on_refused(code)
        await self._credentials.force_refresh(credentials)
        if self._before_resend is not None and not await self._before_resend():
            return
        self._sign(request, self._credentials.current())
        self.resent = True
        yield request

    def _sign(self, request: httpx.Request, credentials: ReadOnlyCredentials) -> None:
        sign(request, credentials, service=self._service, region=self._region)
