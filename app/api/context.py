"""One pure-ASGI middleware for what every request needs, in one pass and cheaply.

Request id (an incoming ``X-Request-Id`` is kept when sane), the sidecar
token on ``/v1``, the body limit, the sandbox marker, metrics by route
template, one JSON access line, and a last-resort handler so that a bug is
a problem document with a request id, never a stack trace to the caller.

``install_request_context`` adds it the ordinary way (``add_middleware``):
inside Starlette's ``ServerErrorMiddleware``, outside its ``ExceptionMiddleware``
and router, so every route runs through FastAPI with its dependencies. The
router records the matched route in the scope this middleware passes down,
which is where the metrics read the route template from.

A client that goes away before its body is in (or that the server cuts off at
the body deadline, ``app.server.listeners``) is no error: nothing can be answered, and
the request is counted and logged with status 499 ("client closed request",
as nginx names it).
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem_response
from app.api.wire_errors import wire_error
from app.metering.errors import MeteringError, PayloadTooLarge, Unauthorized
from app.runtime.logs import request_id_var
from app.runtime.metrics import Metrics

MAX_BODY_BYTES = 1024 * 1024
# With a token set, only these answer without it on the API listener (kubelet's
# probes may reach it through a port-forward or a loopback exec); /metrics and
# the documentation need the token there, and are open on the operations listener.
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_SIGV4_CREDENTIAL_PREFIX = b"AWS4-HMAC-SHA256 Credential="
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# nginx's status for a request whose client went away before it could be answered.
CLIENT_CLOSED = 499

access_log = logging.getLogger("app.access")
error_log = logging.getLogger("app.error")


class _BodyTooLarge(StarletteHTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body reader passes it on
    (to ``_on_body_too_large``) rather than making it a 400."""

    def __init__(self) -> None:
        super().__init__(413, f"the body is over {MAX_BODY_BYTES} bytes")


def install_request_context(
    app: FastAPI,
    *,
    metrics: Metrics,
    auth_token: str | None,
    sandbox: bool,
    access_log_enabled: bool,
) -> None:
    """Add the request context to ``app``, with the handlers that answer for it."""
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        auth_token=auth_token,
        sandbox=sandbox,
        access_log_enabled=access_log_enabled,
    )
    app.add_exception_handler(_BodyTooLarge, _on_body_too_large)
    # Starlette's ServerErrorMiddleware, outside the request context, answers with
    # this only for an error of the request context itself (uvicorn then logs it).
    app.add_exception_handler(Exception, _on_unexpected)


async def _on_body_too_large(request: Request, exc: Exception) -> Response:
    # Here rather than the app's HTTPException handler: the wire route's 413 is
    # in AWS's shape.
    return _error_response(
        PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes"), request.scope["path"]
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    return unexpected_error(request.scope["path"])


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
    ) -> None:
        self.app = app
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
        body_complete = False
        client_gone = False

        async def receive_wrapper() -> Message:
            nonlocal received, body_complete, client_gone
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise _BodyTooLarge
                body_complete = not message.get("more_body", False)
            elif not body_complete:
                # http.disconnect before the body was in. After it, a disconnect
                # is what a streaming response listens for, and no loss.
                client_gone = True
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
            else:
                await self.app(scope, receive_wrapper, send_wrapper)
        except Exception:
            # A route reading its own body (the wire route) meets the disconnect as
            # ClientDisconnect; FastAPI's body reader makes it a 400 nobody receives.
            if not client_gone:
                error_log.exception("unhandled error", extra={"path": path})
                if not response_started:
                    await unexpected_error(path)(scope, receive, send_wrapper)
        finally:
            if client_gone:
                status = CLIENT_CLOSED
            # The router's match, written into the scope passed down.
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
