"""Errors in AWS's own JSON 1.1 shape, for the wire-protocol route and anything answering
on its behalf (the middleware's refusals): ``__type``, ``message``,
``x-amzn-ErrorType``, ``x-amzn-RequestId``, so every SDK raises its own typed
exception.
"""

from __future__ import annotations

import uuid

from starlette.responses import Response

from app.api.rendering import wire_response
from app.metering.errors import (
    AwsServiceError,
    FieldError,
    MeteringError,
    RequestInvalid,
    Unauthorized,
)


def aws_error(status: int, code: str, message: str, request_id: str | None) -> Response:
    """An AWS-shaped error response."""
    request_id = request_id or str(uuid.uuid4())
    return wire_response(
        {"__type": code, "message": message},
        status=status,
        headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": code},
    )


def wire_error(error: MeteringError) -> Response:
    """A sidecar error as AWS would have shaped it."""
    if isinstance(error, AwsServiceError):
        # AWS's own status, so SDKs classify it as they would AWS's answer.
        return aws_error(error.upstream_status, error.code, error.detail, error.aws_request_id)
    if isinstance(error, RequestInvalid):
        return aws_error(400, "ValidationException", _validation_message(error.errors), None)
    if isinstance(error, Unauthorized):
        # What AWS says of an unknown access key; SDKs raise it as such.
        return aws_error(403, "UnrecognizedClientException", error.detail, None)
    if type(error) is MeteringError:
        return aws_error(500, "InternalFailure", error.detail, None)
    return aws_error(error.status, error.code, error.detail, error.aws_request_id)


def _validation_message(errors: list[FieldError]) -> str:
    count = len(errors)
    parts = [f"{e.field or 'body'}: {e.message}" for e in errors]
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun} detected: " + "; ".join(parts)
