"""The sidecar's error tree, and AWS's error codes mapped to HTTP status in one table.

    MeteringError                      every error a caller can see
    ├── RequestInvalid          422    the request breaks the API's constraints (checked locally)
    ├── Unauthorized            401    missing or wrong sidecar token
    ├── NotFound                404    no such route or queued record
    ├── MethodNotAllowed        405
    ├── PayloadTooLarge         413    body over 1 MiB
    ├── Conflict                409    the sidecar's own conflicts (IdempotencyKey reuse)
    ├── QueueUnavailable        503    the usage queue cannot be written
    ├── AwsServiceError         4xx/5xx AWS answered with an error (status from AWS_STATUS)
    ├── CredentialsUnavailable  503    no credentials can be had
    ├── CredentialsRejected     502    AWS refused the sidecar's credentials, even fresh ones
    ├── UpstreamUnavailable     502    AWS could not be reached (connection errors, after retries)
    └── UpstreamTimeout         504    AWS did not answer in time (after retries)

Foreign exceptions (httpx, botocore, pydantic) are converted once, where they
are caught, with ``raise Mapped(...) from exc``; nothing else reaches a caller.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One violated constraint: where (``UsageRecords[3].Quantity``) and why."""

    field: str
    message: str


_LOCATIONS = ("body", "query", "path", "header")


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


class QueueUnavailable(MeteringError):
    """The usage queue cannot be written (disk full, volume gone, database down)."""

    status = 503
    code = "QueueUnavailable"
    title = "The usage queue cannot take records now"
    retryable = True


class CredentialsUnavailable(MeteringError):
    """No AWS credentials can be had from the provider chain."""

    status = 503
    code = "CredentialsUnavailable"
    title = "No AWS credentials available"
    retryable = True


class CredentialsRejected(MeteringError):
    """AWS refused the sidecar's credentials even after a forced refresh."""

    status = 502
    code = "CredentialsRejected"
    title = "AWS refused the sidecar's credentials"
    retryable = True


class UpstreamUnavailable(MeteringError):
    """AWS could not be reached."""

    status = 502
    code = "UpstreamUnavailable"
    title = "AWS could not be reached"
    retryable = True


class UpstreamTimeout(MeteringError):
    """AWS did not answer in time."""

    status = 504
    code = "UpstreamTimeout"
    title = "AWS did not answer in time"
    retryable = True


# AWS's error codes (as in ``__type``, without any namespace) -> HTTP status the
# sidecar answers with. Codes not listed: 4xx from AWS -> 400, 5xx -> 502.
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
    # ResolveCustomer's modelled ExpiredTokenException (HTTP 400) is about the
    # buyer's registration token. The credential one arrives as HTTP 403 and
    # is handled before this table is consulted.
    "ExpiredTokenException": 400,
    "CustomerNotEntitledException": 403,
    "DisabledApiException": 403,
    "AccessDeniedException": 403,
    "UnauthorizedException": 403,
    "DuplicateRequestException": 409,
    "IdempotencyConflictException": 409,
    "ThrottlingException": 429,
    "InternalServiceErrorException": 502,
    "ServiceUnavailableException": 502,
}

# Codes worth another attempt: the call is idempotent as sent, so resending it
# cannot bill twice.
RETRYABLE_AWS_CODES = frozenset(
    {
        "ThrottlingException",
        "InternalServiceErrorException",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)

# HTTP 403 codes by which AWS refuses the credentials themselves (not the
# caller's request): worth one forced refresh and one more attempt.
CREDENTIAL_REJECTION_CODES = frozenset(
    {
        "ExpiredTokenException",
        "ExpiredToken",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "RequestExpired",
    }
)


class AwsServiceError(MeteringError):
    """AWS answered with an error code; the HTTP status comes from ``AWS_STATUS``."""

    title = "AWS refused the request"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        upstream_status: int,
        aws_request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, aws_request_id=aws_request_id, retry_after=retry_after)
        self.code = code
        self.upstream_status = upstream_status
        self.status = AWS_STATUS.get(code, 502 if upstream_status >= 500 else 400)
        self.retryable = code in RETRYABLE_AWS_CODES or upstream_status >= 500
        if self.status == 429:
            self.title = "AWS throttled the request"
        elif self.status >= 500:
            self.title = "AWS failed to process the request"
