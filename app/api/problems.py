"""RFC 9457 problem responses, and the handlers that turn every error into one."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.api.rendering import json_response
from app.metering.errors import (
    FieldError,
    MeteringError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestInvalid,
    field_errors,
)
from app.runtime.logs import request_id_var

PROBLEM_TYPE_BASE = "urn:metering-sidecar:problem:"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    # Extension members are fields here (ClientToken, Timestamp): one a handler sets
    # that is not declared would fail loudly, not vanish.
    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        description="urn:metering-sidecar:problem:<code>. docs/troubleshooting.md has a "
        "section for each: search it for this URN to learn what the problem means, what "
        "to check, and which metric and log line show it."
    )
    title: str
    status: int
    detail: str
    code: str = Field(
        description="AWS's exception name (e.g. ThrottlingException) or the sidecar's own "
        "(ValidationError, CredentialsUnavailable, UpstreamTimeout, ...)."
    )
    retryable: bool = Field(description="Whether sending the same request later may succeed.")
    aws_request_id: str | None = Field(None, description="Present when AWS answered.")
    request_id: str | None = Field(None, description="The sidecar's request id (X-Request-Id).")
    instance: str | None = None
    errors: list[FieldError] | None = Field(
        None, description="Each violated constraint (422 only)."
    )
    ClientToken: str | None = Field(
        None,
        description="POST /v1/meter-usage, retryable problems only: the ClientToken the "
        "sidecar sent. Resend it with the same Timestamp, so AWS treats the resend as the "
        "same request and cannot bill twice.",
    )
    Timestamp: str | None = Field(
        None,
        description="POST /v1/meter-usage, retryable problems only: the Timestamp the "
        "sidecar sent (resend it with the ClientToken).",
    )


def problem(
    error: MeteringError, instance: str | None = None, *, request_id: str | None = None
) -> Problem:
    """The problem document for ``error`` (the request being served names its id)."""
    return Problem(
        type=PROBLEM_TYPE_BASE + error.code,
        title=error.title,
        status=error.status,
        detail=error.detail,
        code=error.code,
        retryable=error.retryable,
        aws_request_id=error.aws_request_id,
        request_id=request_id or request_id_var.get(),
        instance=instance,
        errors=error.errors if isinstance(error, RequestInvalid) else None,
        **error.extensions,
    )


def problem_response(error: MeteringError, instance: str | None = None) -> Response:
    """``error`` as an ``application/problem+json`` response, with ``Retry-After`` if known."""
    headers: dict[str, str] = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.aws_request_id:
        headers["X-Amzn-RequestId"] = error.aws_request_id
    return json_response(
        problem(error, instance),
        status=error.status,
        headers=headers,
        media_type=PROBLEM_MEDIA_TYPE,
    )


def unreadable_body(cause: BaseException | None) -> str | None:
    """Why a body the JSON parser refused, beyond syntax, is not JSON; None if it was not that.

    FastAPI answers these with a bare 400; they are bad input like any other.
    """
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid JSON: it is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "the body is not valid JSON: it is nested too deeply"
    if isinstance(cause, ValueError):
        # Python reads integers of at most 4,300 digits (sys.int_max_str_digits).
        too_long = "digits" in str(cause)
        return "the body is not valid JSON" + (
            ": it holds a number of over 4,300 digits" if too_long else ""
        )
    return None


def _allowed_methods(routers: Sequence[APIRouter], path: str) -> str:
    # Starlette names only the first route whose path matched; a path served
    # by several routes (GET and POST /v1/usage-records) allows all of theirs.
    methods: set[str] = set()
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path_regex.match(path):
                methods |= route.methods or set()
    return ", ".join(sorted(methods))


def install_problem_handlers(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Make every error leave the app as a problem document."""

    async def on_metering_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, MeteringError)
        return problem_response(exc, request.url.path)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_response(RequestInvalid(field_errors(exc.errors())), request.url.path)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        error: MeteringError
        unreadable = unreadable_body(exc.__cause__) if exc.status_code == 400 else None
        if unreadable is not None:
            error = RequestInvalid([FieldError("", unreadable)])
        elif exc.status_code == 404:
            error = NotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        elif exc.status_code == 413:
            error = PayloadTooLarge(str(exc.detail))
        else:
            error = MeteringError(str(exc.detail))
            error.status = exc.status_code
            error.code = f"Http{exc.status_code}"
            error.title = str(exc.detail)
        response = problem_response(error, request.url.path)
        if exc.status_code == 405:
            response.headers["Allow"] = _allowed_methods(routers, request.url.path)
        return response

    app.add_exception_handler(MeteringError, on_metering_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
