"""What the OpenAPI document says about errors: the problem shape and each status."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from app.metering.errors import FieldError


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


def problem_example(
    status: int, code: str, title: str, detail: str, **extra: Any
) -> dict[str, Any]:
    """A problem document as the sidecar sends it, for the OpenAPI examples."""
    return {
        "type": f"urn:metering-sidecar:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        "retryable": extra.pop("retryable", False),
        **extra,
        "request_id": "6c2e1f3a790647739b34766a53bea3f4",
    }


def problem_response(description: str, example: dict[str, Any]) -> dict[str, Any]:
    """One documented error response: the Problem schema and an example of it.

    ``model`` registers the Problem schema; FastAPI also files it under the
    route's own media type (application/json), which ``install_openapi`` removes.
    Use it for statuses ERROR_RESPONSES lacks, e.g. ``{404: problem_response(
    "No such record.", problem_example(404, "NotFound", "Not found", "..."))}``.
    """
    return {
        "model": Problem,
        "description": description,
        "content": {
            "application/problem+json": {
                "schema": {"$ref": "#/components/schemas/Problem"},
                "example": example,
            }
        },
    }


_AWS_REQUEST_ID = "f502d452-5b43-4ea0-8951-6ba30ae743f4"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_response(
        "AWS refused the request (Invalid*Exception, TimestampOutOfBounds, ...).",
        problem_example(
            400,
            "InvalidUsageDimensionException",
            "AWS refused the request",
            "The usageDimension 'users' is not valid for product prod-demo.",
            aws_request_id=_AWS_REQUEST_ID,
        ),
    ),
    401: problem_response(
        "Missing or wrong sidecar token.",
        problem_example(
            401,
            "Unauthorized",
            "Missing or wrong sidecar token",
            "this sidecar requires 'Authorization: Bearer <token>' or 'X-Metering-Token: <token>' "
            "(AWS SDKs: the token as access key id)",
        ),
    ),
    403: problem_response(
        "CustomerNotEntitledException, DisabledApiException.",
        problem_example(
            403,
            "CustomerNotEntitledException",
            "AWS refused the request",
            "The customer is not entitled to the product.",
            aws_request_id=_AWS_REQUEST_ID,
        ),
    ),
    409: problem_response(
        "DuplicateRequestException, IdempotencyConflictException.",
        problem_example(
            409,
            "DuplicateRequestException",
            "AWS refused the request",
            "A usage record with another quantity exists for this product, dimension and hour.",
            aws_request_id=_AWS_REQUEST_ID,
        ),
    ),
    413: problem_response(
        "Body over 1 MiB.",
        problem_example(
            413, "PayloadTooLarge", "Request body too large", "the body is over 1048576 bytes"
        ),
    ),
    422: problem_response(
        "The request breaks the API's constraints; nothing was sent.",
        problem_example(
            422,
            "ValidationError",
            "Request breaks the API's constraints",
            "UsageAllocations: allocations sum to 2, but the quantity is 5",
            errors=[
                {
                    "field": "UsageAllocations",
                    "message": "allocations sum to 2, but the quantity is 5",
                }
            ],
        ),
    ),
    429: problem_response(
        "Still throttled after the sidecar's retries; see Retry-After.",
        problem_example(
            429,
            "ThrottlingException",
            "AWS throttled the request",
            "Rate exceeded",
            retryable=True,
            aws_request_id=_AWS_REQUEST_ID,
        ),
    ),
    502: problem_response(
        "AWS failed, could not be reached, or refused the sidecar's credentials.",
        problem_example(
            502,
            "UpstreamUnavailable",
            "AWS could not be reached",
            "could not reach AWS for MeterUsage (ConnectError)",
            retryable=True,
        ),
    ),
    503: problem_response(
        "No AWS credentials can be had.",
        problem_example(
            503,
            "CredentialsUnavailable",
            "No AWS credentials available",
            "no AWS credentials could be obtained from the provider chain "
            "(no provider in the chain had credentials)",
            retryable=True,
        ),
    ),
    504: problem_response(
        "AWS did not answer in time.",
        problem_example(
            504,
            "UpstreamTimeout",
            "AWS did not answer in time",
            "AWS did not answer MeterUsage in time",
            retryable=True,
        ),
    ),
}


def _drop_default_media_type(document: dict[str, Any]) -> None:
    for item in document.get("paths", {}).values():
        for operation in item.values():
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[:1] in "45" and len(content) > 1 and "application/json" in content:
                    content.pop("application/json")


def install_openapi(app: FastAPI) -> None:
    """Serve an OpenAPI document whose error bodies have only their real media type.

    FastAPI files a response's ``model`` under the route's media type as well
    (application/json), but the sidecar's errors are application/problem+json
    (``/v1``) or application/x-amz-json-1.1 (``POST /``). The document is built
    once, then cached.
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _drop_default_media_type(build())
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def not_found_response(description: str, detail: str) -> dict[str, Any]:
    """A documented 404 of a route that looks something up."""
    return problem_response(description, problem_example(404, "NotFound", "Not found", detail))


def request_examples(**examples: dict[str, Any]) -> dict[str, Any]:
    """``openapi_extra`` for a route: named examples of its JSON request body."""
    return {
        "requestBody": {
            "content": {
                "application/json": {
                    "examples": {name: {"value": value} for name, value in examples.items()}
                }
            }
        }
    }


METER_USAGE_EXAMPLES = request_examples(
    minimal={"UsageDimension": "users", "UsageQuantity": 3},
    allocated={
        "UsageDimension": "users",
        "UsageQuantity": 5,
        "Timestamp": "2026-11-26T12:40:15Z",
        "UsageAllocations": [
            {"AllocatedUsageQuantity": 3, "Tags": [{"Key": "team", "Value": "a"}]},
            {"AllocatedUsageQuantity": 2, "Tags": [{"Key": "team", "Value": "b"}]},
        ],
    },
)
BATCH_METER_USAGE_EXAMPLES = request_examples(
    concurrent_agreements={
        "UsageRecords": [
            {
                "Timestamp": "2026-11-26T12:40:15Z",
                "CustomerAWSAccountId": "123456789012",
                "LicenseArn": "arn:aws:license-manager::123456789012:license:l-0123456789abcdef",
                "Dimension": "gigabytes",
                "QuantityAsDecimal": "2.5",
            }
        ]
    },
    customer_identifier={
        "ProductCode": "prod-demo",
        "UsageRecords": [
            {
                "Timestamp": "2026-11-26T12:40:15Z",
                "CustomerIdentifier": "cust-7ab2c3d4e5f",
                "Dimension": "users",
                "Quantity": 12,
            }
        ],
    },
)
RESOLVE_CUSTOMER_EXAMPLES = request_examples(
    token={"RegistrationToken": "token-from-the-buyers-browser"}
)
REGISTER_USAGE_EXAMPLES = request_examples(
    at_launch={"Nonce": "launch-1"},
    explicit={"ProductCode": "prod-demo", "PublicKeyVersion": 1, "Nonce": "launch-2"},
)
# SaaS mode (the default). In container mode (METERING_QUEUE_MODE=container)
# records name no customer: {"UsageRecords": [{"Dimension": "users", "Quantity": 3}]}.
USAGE_RECORDS_EXAMPLES = request_examples(
    saas={
        "AcceptPartial": True,
        "UsageRecords": [
            {
                "IdempotencyKey": "order-4711",
                "Timestamp": "2026-11-26T12:40:15Z",
                "CustomerAWSAccountId": "123456789012",
                "LicenseArn": "arn:aws:license-manager::123456789012:license:l-0123456789abcdef",
                "Dimension": "gigabytes",
                "QuantityAsDecimal": "2.5",
            }
        ],
    },
)


class ReadinessCheck(BaseModel):
    """One readiness condition."""

    ok: bool
    detail: str
    blocking: bool = Field(
        True, description="Whether a failure makes the sidecar unready (false: only degraded)."
    )


class Readiness(BaseModel):
    """What ``/readyz`` answers: ready or degraded (200), or not ready (503)."""

    status: Literal["ready", "degraded", "not ready"]
    checks: dict[str, ReadinessCheck]


READYZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "Not ready; `checks` says why.",
        "content": {
            "application/json": {
                "example": {
                    "status": "not ready",
                    "checks": {
                        "credentials": {
                            "ok": False,
                            "detail": "no provider in the chain had credentials",
                        },
                        "endpoint": {
                            "ok": True,
                            "detail": "https://metering.marketplace.us-east-1.amazonaws.com",
                        },
                        "queue": {"ok": True, "detail": "writable"},
                    },
                }
            }
        },
    }
}


class AwsError(BaseModel):
    """An error in AWS's JSON 1.1 shape, as the wire-protocol route answers it."""

    model_config = ConfigDict(populate_by_name=True)

    type: str = Field(alias="__type", description="AWS's exception name.")
    message: str


_WIRE_CONTENT_TYPE = "application/x-amz-json-1.1"


def _wire_error(description: str, code: str, message: str) -> dict[str, Any]:
    return {
        "model": AwsError,
        "description": description,
        "content": {
            _WIRE_CONTENT_TYPE: {
                "schema": {"$ref": "#/components/schemas/AwsError"},
                "example": {"__type": code, "message": message},
            }
        },
    }


WIRE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _wire_error(
        "AWS's client errors, and the sidecar's own checks (ValidationException).",
        "ValidationException",
        "1 validation error detected: UsageDimension: Field required",
    ),
    403: _wire_error(
        "Wrong sidecar token (as UnrecognizedClientException), or AWS's 403s.",
        "UnrecognizedClientException",
        "this sidecar requires 'Authorization: Bearer <token>' or 'X-Metering-Token: <token>' "
        "(AWS SDKs: the token as access key id)",
    ),
    413: _wire_error("Body over 1 MiB.", "PayloadTooLarge", "the body is over 1048576 bytes"),
    429: _wire_error(
        "Still throttled after the sidecar's retries.", "ThrottlingException", "Rate exceeded"
    ),
    500: _wire_error("The sidecar failed.", "InternalFailure", "see the sidecar's log"),
    502: _wire_error(
        "AWS failed or could not be reached.",
        "UpstreamUnavailable",
        "could not reach AWS for MeterUsage (ConnectError)",
    ),
    503: _wire_error(
        "No AWS credentials can be had.",
        "CredentialsUnavailable",
        "no AWS credentials could be obtained from the provider chain",
    ),
    504: _wire_error(
        "AWS did not answer in time.", "UpstreamTimeout", "AWS did not answer MeterUsage in time"
    ),
}

WIRE_OPENAPI_EXTRA: dict[str, Any] = {
    "parameters": [
        {
            "name": "X-Amz-Target",
            "in": "header",
            "required": True,
            "description": "The action, as AWS SDKs send it.",
            "schema": {
                "type": "string",
                "enum": [
                    "AWSMPMeteringService.MeterUsage",
                    "AWSMPMeteringService.BatchMeterUsage",
                    "AWSMPMeteringService.ResolveCustomer",
                    "AWSMPMeteringService.RegisterUsage",
                ],
            },
            "example": "AWSMPMeteringService.MeterUsage",
        }
    ],
    "requestBody": {
        "required": True,
        "description": "The action's input in AWS's JSON 1.1 shape (timestamps as epoch seconds).",
        "content": {
            _WIRE_CONTENT_TYPE: {
                "schema": {"type": "object"},
                "examples": {
                    "MeterUsage": {
                        "value": {
                            "ProductCode": "prod-demo",
                            "Timestamp": 1795696815,
                            "UsageDimension": "users",
                            "UsageQuantity": 3,
                        }
                    },
                    "RegisterUsage": {"value": {"ProductCode": "prod-demo", "PublicKeyVersion": 1}},
                },
            }
        },
    },
}
