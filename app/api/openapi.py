"""What the OpenAPI document says about errors: the problem shape and each status."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProblemFieldError(BaseModel):
    """One violated constraint."""

    field: str = Field(description="The offending field, e.g. UsageRecords[3].Quantity.")
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    type: str = Field(description="urn:metering-sidecar:problem:<code>")
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
    errors: list[ProblemFieldError] | None = Field(
        None, description="Each violated constraint (422 only)."
    )


def _problem(description: str) -> dict[str, Any]:
    return {
        "model": Problem,
        "description": description,
        "content": {"application/problem+json": {}},
    }


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _problem("AWS refused the request (Invalid*Exception, TimestampOutOfBounds, ...)."),
    401: _problem("Missing or wrong sidecar token."),
    403: _problem("CustomerNotEntitledException, DisabledApiException."),
    409: _problem("DuplicateRequestException, IdempotencyConflictException."),
    413: _problem("Body over 1 MiB."),
    422: _problem("The request breaks the API's constraints; nothing was sent."),
    429: _problem("Still throttled after the sidecar's retries; see Retry-After."),
    502: _problem("AWS failed, could not be reached, or refused the sidecar's credentials."),
    503: _problem("No AWS credentials can be had."),
    504: _problem("AWS did not answer in time."),
}
