"""The sidecar's error tree, and AWS's error codes mapped to HTTP status in one table.

    MeteringError                      every error a caller can see
    ├── RequestInvalid          422    the request breaks the API's constraints (checked locally)
    ├── Unauthorized            401    missing or wrong sidecar token
    ├── NotFound                404    no such route or queued record
    ├── MethodNotAllowed        405
    ├── PayloadTooLarge         413    body over 1 MiB
    ├── Conflict                409    the sidecar's own conflicts (IdempotencyKey reuse)
    ├── CustomerSubscriptionEnded 409  usage for a customer whose subscription has ended
    ├── CustomerFormConflict    409    usage under a second form of one customer in an hour
    ├── EventUnreadable         400    POST /v1/events: the body is no AWS Marketplace event
    ├── Starting                503    the sidecar is still starting (operations listener)
    ├── QueueUnavailable        503    the usage queue cannot be written
    ├── QuotaExhausted          429    AWS's request quota leaves no slot before the deadline
    ├── AwsServiceError         4xx/5xx AWS answered with an error (status from AWS_STATUS)
    ├── CredentialsUnavailable  503    no credentials can be had
    ├── CredentialsRejected     502    AWS refused the sidecar's credentials, even fresh ones
    ├── UpstreamUnavailable     502    AWS could not be reached (connection errors, after retries)
    └── UpstreamTimeout         504    AWS did not answer in time (after retries)

Foreign exceptions (httpx, botocore, pydantic) are converted once, where they
are caught, with ``raise Mapped(...) from exc``; nothing else reaches a caller.

Every error that comes from talking to AWS also carries a ``Fault``: what it
says about the usage behind it (``app.aws.classify`` sorts AWS's codes into
them), which decides whether a call retries and whether queued usage is kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic_core import ErrorDetails


class Fault(StrEnum):
    """The kinds of failure, by what they say about the usage (see the module docstring)."""

    CREDENTIALS = "credentials"
    THROTTLING = "throttling"
    TRANSIENT = "transient"
    CONFIGURATION = "configuration"
    REQUEST = "request"
    UNKNOWN = "unknown"

    @property
    def final_for_queue(self) -> bool:
        """Whether queued usage that met this answer is settled for good."""
        return self is Fault.REQUEST

    @property
    def retry_within_call(self) -> bool:
        """Whether one call tries again (with backoff) after this answer."""
        return self in (Fault.CREDENTIALS, Fault.THROTTLING, Fault.TRANSIENT)

    @property
    def caller_may_retry(self) -> bool:
        """Whether the same call may succeed later unchanged (a problem's ``retryable``)."""
        return self in (Fault.CREDENTIALS, Fault.THROTTLING, Fault.TRANSIENT, Fault.UNKNOWN)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One violated constraint: where (``UsageRecords[3].Quantity``) and why. The one shape
    of it everywhere: in errors, problem documents and the queue's refusals."""

    field: str
    message: str


_LOCATIONS = ("body", "query", "path", "header")


# Pydantic's words for a str holding a lone UTF-16 surrogate, which JSON can spell
# ("\ud800") but UTF-8 cannot encode: the value, or the object with such a key.
NOT_UNICODE = (
    "holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode text "
    "and cannot be encoded as UTF-8"
)


def field_errors(errors: Iterable[ErrorDetails], *, prefix: str = "") -> list[FieldError]:
    """Pydantic's errors as FieldErrors, named as in the request (``prefix`` first, e.g.
    ``UsageRecords[3]``), in the sidecar's words. The one converter of them all; it never
    echoes the input (it may be a token)."""
    converted: list[FieldError] = []
    for error in errors:
        kind = error["type"]
        name = field_name(tuple(error["loc"]))
        if kind == "json_invalid":
            name, message = "", "the body is not valid JSON"
        elif kind == "missing" and not name:
            message = "a JSON object body is required"
        elif kind == "model_attributes_type" or (kind == "dict_type" and not name):
            message = "must be a JSON object"
        elif kind == "extra_forbidden":
            message = "unknown field (AWS's field names are PascalCase)"
        elif kind == "string_unicode":
            message = NOT_UNICODE
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        where = f"{prefix}.{name}" if prefix and name else prefix or name
        converted.append(FieldError(where, message))
    return converted


def field_name(location: tuple[int | str, ...]) -> str:
    """("body", "UsageRecords", 3, "Quantity") -> "UsageRecords[3].Quantity"."""
    parts = list(location[1:] if location and location[0] in _LOCATIONS else location)
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif not isinstance(part, str) or part.startswith(("function-", "function_")):
            continue
        else:
            name += f".{part}" if name else part
    return name


class MeteringError(Exception):
    """Base of every error the sidecar reports to a caller."""

    status: int = 500
    code: str = "InternalError"
    title: str = "Internal error"
    retryable: bool = False
    # What the error says about the usage, for errors met while talking to AWS.
    fault: Fault | None = None

    def __init__(
        self,
        detail: str,
        *,
        aws_request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.aws_request_id = aws_request_id
        self.retry_after = retry_after
        # Extension members of the problem document (RFC 9457), e.g. the
        # ClientToken and Timestamp a retryable MeterUsage was sent with.
        self.extensions: dict[str, Any] = {}


class RequestInvalid(MeteringError):
    """The request breaks a constraint of the API; nothing was sent to AWS."""

    status = 422
    code = "ValidationError"
    title = "Request breaks the API's constraints"

    def __init__(self, errors: list[FieldError]) -> None:
        detail = "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)
        super().__init__(detail)
        self.errors = errors


class Unauthorized(MeteringError):
    """Missing or wrong sidecar token."""

    status = 401
    code = "Unauthorized"
    title = "Missing or wrong sidecar token"


class NotFound(MeteringError):
    """No such route or resource."""

    status = 404
    code = "NotFound"
    title = "Not found"


class MethodNotAllowed(MeteringError):
    """The route exists, not with this method."""

    status = 405
    code = "MethodNotAllowed"
    title = "Method not allowed"


class PayloadTooLarge(MeteringError):
    """The request body is over the limit."""

    status = 413
    code = "PayloadTooLarge"
    title = "Request body too large"


class Conflict(MeteringError):
    """The sidecar's own conflict, such as an IdempotencyKey reused with other content."""

    status = 409
    code = "IdempotencyKeyConflict"
    title = "Conflict"


class CustomerSubscriptionEnded(MeteringError):
    """Usage for a customer whose subscription has ended: its grace after the first ending
    event has passed (its final usage was sent), or AWS said it ended. AWS would take no
    record for it, so none is queued or sent; the detail names the customer and since when.
    """

    status = 409
    code = "CustomerSubscriptionEnded"
    title = "The customer's subscription has ended"


class CustomerFormConflict(MeteringError):
    """Usage under one form of a customer (CustomerIdentifier, or CustomerAWSAccountId with
    LicenseArn) whose dimension and hour already has usage under the other: AWS would bill
    both records. The detail names both forms."""

    status = 409
    code = "CustomerFormConflict"
    title = "The customer is metered under another form in this hour"


class EventUnreadable(MeteringError):
    """``POST /v1/events``: the body is no AWS Marketplace event the sidecar can read."""

    status = 400
    code = "UnreadableEvent"
    title = "The body is no AWS Marketplace event"


class Starting(MeteringError):
    """The sidecar is still starting: nothing is ready to answer yet."""

    status = 503
    code = "Starting"
    title = "The sidecar is starting"
    retryable = True

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=1)


class QueueUnavailable(MeteringError):
    """The usage queue cannot be written (disk full, volume gone, database down).

    Nothing of the call was kept: send it again after ``Retry-After``.
    """

    status = 503
    code = "QueueUnavailable"
    title = "The usage queue cannot take records now"
    retryable = True
    # Long enough for a database failover or a volume to come back, short
    # enough not to hold usage in the caller for long.
    RETRY_AFTER = 5.0

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after=self.RETRY_AFTER)


class CredentialsUnavailable(MeteringError):
    """No AWS credentials can be had from the provider chain."""

    status = 503
    code = "CredentialsUnavailable"
    title = "No AWS credentials available"
    retryable = True
    fault = Fault.CREDENTIALS


class CredentialsRejected(MeteringError):
    """AWS refused the sidecar's credentials even after a forced refresh."""

    status = 502
    code = "CredentialsRejected"
    title = "AWS refused the sidecar's credentials"
    retryable = True
    fault = Fault.CREDENTIALS


class UpstreamUnavailable(MeteringError):
    """AWS could not be reached."""

    status = 502
    code = "UpstreamUnavailable"
    title = "AWS could not be reached"
    retryable = True
    fault = Fault.TRANSIENT


class UpstreamTimeout(MeteringError):
    """AWS did not answer in time."""

    status = 504
    code = "UpstreamTimeout"
    title = "AWS did not answer in time"
    retryable = True
    fault = Fault.TRANSIENT


class QuotaExhausted(MeteringError):
    """AWS's request quota for the action (kept by the sidecar) has no slot before the
    call's deadline. The code is AWS's own, so SDKs on the wire route back off as usual."""

    status = 429
    code = "ThrottlingException"
    title = "AWS's request quota for this action is used up"
    retryable = True
    fault = Fault.THROTTLING


# AWS's error codes (as in ``__type``, without any namespace) -> HTTP status the
# sidecar answers with. Codes not listed go by their fault: throttling 429,
# transient 502, anything else 400 (or 502 if AWS answered with a 5xx).
AWS_STATUS: dict[str, int] = {
    "InvalidProductCodeException": 400,
    "InvalidUsageDimensionException": 400,
    "InvalidTagException": 400,
    "InvalidUsageAllocationsException": 400,
    "InvalidCustomerIdentifierException": 400,
    "InvalidEndpointRegionException": 400,
    "InvalidLicenseException": 400,
    "InvalidTokenException": 400,
    "InvalidRegionException": 400,
    "InvalidPublicKeyVersionException": 400,
    "TimestampOutOfBoundsException": 400,
    "PlatformNotSupportedException": 400,
    "ValidationException": 400,
    # ResolveCustomer's modelled ExpiredTokenException is about the buyer's
    # registration token; it reaches a caller only once fresh credentials got
    # the same answer.
    "ExpiredTokenException": 400,
    "CustomerNotEntitledException": 403,
    "DisabledApiException": 403,
    "AccessDeniedException": 403,
    "UnauthorizedException": 403,
    "DuplicateRequestException": 409,
    "IdempotencyConflictException": 409,
}
_FAULT_STATUS = {Fault.THROTTLING: 429, Fault.TRANSIENT: 502, Fault.CREDENTIALS: 502}


class AwsServiceError(MeteringError):
    """AWS answered with an error code; the HTTP status comes from ``AWS_STATUS``."""

    title = "AWS refused the request"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        upstream_status: int,
        fault: Fault,
        aws_request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, aws_request_id=aws_request_id, retry_after=retry_after)
        self.code = code
        self.upstream_status = upstream_status
        self.fault = fault
        self.status = AWS_STATUS.get(code) or _FAULT_STATUS.get(
            fault, 502 if upstream_status >= 500 else 400
        )
        self.retryable = fault.caller_may_retry
        if self.status == 429:
            self.title = "AWS throttled the request"
        elif self.status >= 500:
            self.title = "AWS failed to process the request"
