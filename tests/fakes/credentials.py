"""Fake credential sources: the ECS/EKS container endpoint and STS web identity.

Both issue keys from the shared :class:`KeyRegistry`, so keys the sidecar
obtains here are exactly the ones the metering fake accepts, revokes and expires.
"""

from __future__ import annotations

import json
import re
import secrets
import string
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

from .asgi import Receive, Scope, Send, header, headers_of, read_body, send_response
from .keys import IssuedKey, KeyRegistry

__all__ = ["STS_NAMESPACE", "FakeContainerCredentials", "FakeSTS", "StsCall", "iso8601"]

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/(?:.*/)?([\w+=,.@-]+)$")
_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")


def iso8601(when: datetime | None) -> str:
    """Format as AWS credential endpoints do: ``2026-01-01T00:00:00Z``."""
    if when is None:
        return ""
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class FakeContainerCredentials:
    """ASGI fake of the container credentials endpoint botocore's ContainerProvider calls.

    Point ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` at ``<server url><path>``; if
    ``token`` is set, ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` must match it.
    """

    def __init__(
        self,
        registry: KeyRegistry,
        path: str = "/creds",
        token: str | None = None,
        lifetime: float = 3600,
        principal: str = "arn:aws:sts::123456789012:assumed-role/task-role/fake-task",
    ) -> None:
        """Configure the endpoint; ``lifetime`` (seconds) applies to each issued key."""
        self.registry = registry
        self.path = path
        self.token = token
        self.lifetime = lifetime
        self.principal = principal
        self.fetch_count = 0
        self.issued_keys: list[IssuedKey] = []
        self.authorizations: list[str | None] = []
        self._failures = 0
        self._lock = threading.Lock()

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` fetches with HTTP 500."""
        with self._lock:
            self._failures += n

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        await read_body(receive)
        json_type = [("content-type", "application/json")]
        if scope["method"] != "GET" or scope["path"] != self.path:
            await send_response(send, 404, b'{"message": "Not Found"}', json_type)
            return
        authorization = header(headers_of(scope), "authorization")
        with self._lock:
            self.fetch_count += 1
            self.authorizations.append(authorization)
            failing = self._failures > 0
            if failing:
                self._failures -= 1
        if failing:
            await send_response(send, 500, b'{"message": "Internal Server Error"}', json_type)
            return
        if self.token is not None and authorization != self.token:
            await send_response(send, 401, b'{"message": "Unauthorized"}', json_type)
            return
        key = self.registry.issue(self.principal, self.lifetime)
        with self._lock:
            self.issued_keys.append(key)
        payload = {
            "RoleArn": self.principal,
            "AccessKeyId": key.access_key_id,
            "SecretAccessKey": key.secret_access_key,
            "Token": key.session_token,
            "Expiration": iso8601(key.expiration),
        }
        await send_response(send, 200, json.dumps(payload).encode(), json_type)


@dataclass(frozen=True)
class StsCall:
    """One AssumeRoleWithWebIdentity call as received."""

    role_arn: str
    session_name: str
    web_identity_token: str
    accepted: bool


def _xml_error(code: str, message: str, kind: str = "Sender") -> bytes:
    return (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n'
        f"  <Error>\n    <Type>{kind}</Type>\n    <Code>{escape(code)}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n  </Error>\n"
        f"  <RequestId>{uuid.uuid4()}</RequestId>\n</ErrorResponse>\n"
    ).encode()


class FakeSTS:
    """ASGI fake of STS (query protocol), enough for ``AssumeRoleWithWebIdentity``.

    Point ``AWS_ENDPOINT_URL_STS`` at the server; tokens in ``accepted_tokens``
    succeed, anything else gets ``InvalidIdentityToken``.
    """

    def __init__(
        self,
        registry: KeyRegistry,
        accepted_tokens: set[str] | None = None,
        lifetime: float = 3600,
        provider: str = (
            "arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/FAKE"
        ),
        audience: str = "sts.amazonaws.com",
        subject: str = "system:serviceaccount:default:metering-sidecar",
    ) -> None:
        """Configure accepted tokens and the identity details echoed in responses."""
        self.registry = registry
        self.accepted_tokens: set[str] = set(accepted_tokens or ())
        self.lifetime = lifetime
        self.provider = provider
        self.audience = audience
        self.subject = subject
        self.calls: list[StsCall] = []
        self.issued_keys: list[IssuedKey] = []
        self._failures = 0
        self._lock = threading.Lock()

    def fail_next(self, n: int) -> None:
        """Answer the next ``n`` calls with HTTP 500 ``InternalFailure``."""
        with self._lock:
            self._failures += n

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        status, payload = self._handle(scope, body)
        await send_response(send, status, payload, [("content-type", "text/xml")])

    def _handle(self, scope: Scope, body: bytes) -> tuple[int, bytes]:
        if scope["method"] != "POST":
            return 400, _xml_error("InvalidAction", "Only POST is supported by this fake.")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8"), keep_blank_values=True).items()}
        if form.get("Action") != "AssumeRoleWithWebIdentity":
            return 400, _xml_error(
                "InvalidAction", f"Could not find operation {form.get('Action')}"
            )
        if form.get("Version") != "2011-06-15":
            return 400, _xml_error("InvalidAction", f"Unsupported version {form.get('Version')}")
        role_arn = form.get("RoleArn", "")
        session_name = form.get("RoleSessionName", "")
        token = form.get("WebIdentityToken", "")
        accepted = token in self.accepted_tokens
        with self._lock:
            self.calls.append(StsCall(role_arn, session_name, token, accepted))
            failing = self._failures > 0
            if failing:
                self._failures -= 1
        if failing:
            return 500, _xml_error("InternalFailure", "An internal error occurred.", "Receiver")
        role = _ROLE_ARN.match(role_arn)
        if role is None:
            return 400, _xml_error("ValidationError", f"{role_arn!r} is not a valid role ARN.")
        if not _SESSION_NAME.match(session_name):
            return 400, _xml_error(
                "ValidationError", f"RoleSessionName {session_name!r} is not valid."
            )
        if not accepted:
            return 400, _xml_error(
                "InvalidIdentityToken", "The web identity token that was passed is not valid."
            )
        duration = form.get("DurationSeconds")
        lifetime = float(duration) if duration and duration.isdigit() else self.lifetime
        key = self.registry.issue(role_arn, lifetime)
        with self._lock:
            self.issued_keys.append(key)
        return 200, self._success_xml(key, role.group(1), role.group(2), session_name)

    def _success_xml(self, key: IssuedKey, account: str, role_name: str, session: str) -> bytes:
        role_id = "AROA" + "".join(
            secrets.choice(string.ascii_uppercase + string.digits) for _ in range(17)
        )
        assumed_arn = f"arn:aws:sts::{account}:assumed-role/{role_name}/{session}"
        return (
            f'<AssumeRoleWithWebIdentityResponse xmlns="{STS_NAMESPACE}">\n'
            "  <AssumeRoleWithWebIdentityResult>\n"
            f"    <SubjectFromWebIdentityToken>{escape(self.subject)}"
            "</SubjectFromWebIdentityToken>\n"
            f"    <Audience>{escape(self.audience)}</Audience>\n"
            "    <AssumedRoleUser>\n"
            f"      <Arn>{escape(assumed_arn)}</Arn>\n"
            f"      <AssumedRoleId>{role_id}:{escape(session)}</AssumedRoleId>\n"
            "    </AssumedRoleUser>\n"
            "    <Credentials>\n"
            f"      <SessionToken>{escape(key.session_token or '')}</SessionToken>\n"
            f"      <SecretAccessKey>{escape(key.secret_access_key)}</SecretAccessKey>\n"
            f"      <Expiration>{iso8601(key.expiration)}</Expiration>\n"
            f"      <AccessKeyId>{key.access_key_id}</AccessKeyId>\n"
            "    </Credentials>\n"
            f"    <Provider>{escape(self.provider)}</Provider>\n"
            "  </AssumeRoleWithWebIdentityResult>\n"
            "  <ResponseMetadata>\n"
            f"    <RequestId>{uuid.uuid4()}</RequestId>\n"
            "  </ResponseMetadata>\n"
            "</AssumeRoleWithWebIdentityResponse>\n"
        ).encode()
