"""One pure-ASGI middleware for what every request needs, in one pass and cheaply.

Request id (an incoming ``X-Request-Id`` is kept when sane), the sidecar
token on ``/v1``, the body limit, the sandbox marker, metrics by route
template, one JSON access line, and a last-resort handler so that a bug is
a problem document with a request id, never a stack trace to the caller.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from collections.abc import Mapping

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.aws_errors import wire_error
from app.api.fast import FastRoute
from app.api.problems import problem_response
from app.logs import request_id_var
from app.metering.errors import MeteringError, PayloadTooLarge, Unauthorized
from app.metrics import Metrics

MAX_BODY_BYTES = 1024 * 1024
# With a token set, only these answer without it on the API listener (kubelet's
# probes may reach it through a port-forward or a loopback exec); /metrics and
# the documentation need the token there, and are open on the operations listener.
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_SIGV4_CREDENTIAL_PREFIX = b"AWS4-HMAC-SHA256 Credential="
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

access_log = logging.getLogger("app.access")
error_log = logging.getLogger("app.error")


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body reader passes it on."""

    def __init__(self) -> None:
        super().__init__(413, f"the body is over {MAX_BODY_BYTES} bytes")


class RequestContextMiddleware:
    """Wraps the whole app; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        auth_token: str | None,
        sandbox: bool,
        access_log_enabled: bool,
        fast: Mapping[str, FastRoute] | None = None,
    ) -> None:
        self.app = app
        # POST routes served past FastAPI's per-request machinery (app.api.fast).
        self.fast: Mapping[str, FastRoute] = fast or {}
        self.metrics = metrics
        self.auth_token = auth_token.encode() if auth_token else None
        self.sandbox = sandbox
        self.access_log_enabled = access_log_enabled

    def _authorized(self, scope: Scope) -> bool:
        if self.auth_token is None:
            return True
        for name, value in scope["headers"]:
            candidate: bytes | None = None
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                candidate = value[7:].strip()
            elif name == b"authorization" and value.startswith(_SIGV4_CREDENTIAL_PREFIX):
                # AWS SDKs on the wire protocol: the token is their access key id.
                # It travels as openly as a bearer token would, on loopback.
                credential = value[len(_SIGV4_CREDENTIAL_PREFIX) :]
                candidate = credential.split(b"/", 1)[0].strip()
            elif name == b"x-metering-token":
                candidate = value.strip()
            if candidate is not None and hmac.compare_digest(candidate, self.auth_token):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        content_length = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if _REQUEST_ID.match(text):
                    request_id = text
            elif name == b"content-length":
                content_length = value
        # 128 random bits in hex, as uuid4().hex is, without building a UUID.
        request_id = request_id or os.urandom(16).hex()
        token = request_id_var.set(request_id)
        status = 500
        response_started = False
        extra_headers = [(b"x-request-id", request_id.encode())]
        if self.sandbox:
            extra_headers.append((b"x-metering-sandbox", b"true"))

        aws_request_id: str | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started, aws_request_id
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", []))
                for name, value in headers:
                    if name.lower() == b"x-amzn-requestid":
                        aws_request_id = value.decode("latin-1")
                message["headers"] = headers + extra_headers
            await send(message)

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            return message

        path: str = scope["path"]
        if path.startswith("/v1/") and scope["method"] == "POST":
            scope = _as_json(scope)
        try:
            error: MeteringError | None = None
            if path not in _OPEN_PATHS and not self._authorized(scope):
                error = Unauthorized(
                    "this sidecar requires 'Authorization: Bearer <token>' or "
                    "'X-Metering-Token: <token>' (AWS SDKs: the token as access key id); "
                    "only /healthz and /readyz are open"
                )
            elif content_length is not None and _over_limit(content_length):
                error = PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes")
            if error is not None:
                await _error_response(error, path)(scope, receive, send_wrapper)
            elif (fast := self.fast.get(path) if scope["method"] == "POST" else None) is not None:
                await fast.serve(scope, receive_wrapper, send_wrapper, self.app)
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except _BodyTooLarge:
            if not response_started:
                await _error_response(
                    PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes"), path
                )(scope, receive, send_wrapper)
        except Exception:
            error_log.exception("unhandled error", extra={"path": path})
            if not response_started:
                await unexpected_error(path)(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            self.metrics.http_requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.http_duration.labels(template).observe(elapsed)
            if self.access_log_enabled:
                access_log.info(
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "route": template,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "aws_request_id": aws_request_id,
                    },
                )
            request_id_var.reset(token)


def unexpected_error(path: str) -> Response:
    """The answer to a request a bug broke: a problem document, never a stack trace."""
    return _error_response(MeteringError("the sidecar failed unexpectedly; see its log"), path)


def _error_response(error: MeteringError, path: str) -> Response:
    # The wire-protocol route answers in AWS's error shape, so SDKs can parse it.
    return wire_error(error) if path == "/" else problem_response(error, path)


def _as_json(scope: Scope) -> Scope:
    """The REST API only takes JSON: read the body as JSON whatever Content-Type says
    (``curl -d`` sends form encoding), so nobody gets a puzzling "not an object"."""
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _over_limit(content_length: bytes) -> bool:
    try:
        return int(content_length) > MAX_BODY_BYTES
    except ValueError:
        return False
