"""What the OpenAPI document says about errors: the problem shape and each status."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from app.actions.sandbox import (
    CREDENTIALS_REFUSED,
    REHEARSAL_HEADER,
    TIMEOUT,
    rehearsable,
)
from app.api.problems import Problem, problem
from app.api.wire_errors import wire_error
from app.metering.errors import (
    AwsServiceError,
    CredentialsUnavailable,
    Fault,
    FieldError,
    MeteringError,
    NotFound,
    PayloadTooLarge,
    RequestInvalid,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metering.protocol import ACTIONS

# The request id every example shows.
_EXAMPLE_REQUEST_ID = "6c2e1f3a790647739b34766a53bea3f4"


def problem_example(error: MeteringError) -> dict[str, Any]:
    """``error``'s problem document, exactly as the handlers render it: the examples
    come from the error classes, never restated."""
    return problem(error, request_id=_EXAMPLE_REQUEST_ID).model_dump(mode="json", exclude_none=True)


def problem_response(description: str, example: dict[str, Any]) -> dict[str, Any]:
    """One documented error response: the Problem schema and an example of it.

    ``model`` registers the Problem schema; FastAPI also files it under the
    route's own media type (application/json), which ``install_openapi`` removes.
    Use it for statuses ERROR_RESPONSES lacks, e.g. ``{404: problem_response(
    "No such record.", problem_example(NotFound("...")))}``.
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


def _aws(code: str, message: str, status: int, fault: Fault) -> AwsServiceError:
    return AwsServiceError(
        code, message, upstream_status=status, fault=fault, aws_request_id=_AWS_REQUEST_ID
    )


_INVALID = RequestInvalid(
    [FieldError("UsageAllocations", "allocations sum to 2, but the quantity is 5")]
)
_THROTTLED = _aws("ThrottlingException", "Rate exceeded", 400, Fault.THROTTLING)
_TIMED_OUT = UpstreamTimeout("AWS did not answer MeterUsage in time")
_TIMED_OUT.extensions.update(
    ClientToken="1f0c6f8e-3a4b-4c5d-8e9f-0a1b2c3d4e5f", Timestamp="2026-11-26T12:40:15.123456Z"
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_response(
        "AWS refused the request (Invalid*Exception, TimestampOutOfBounds, ...).",
        problem_example(
            _aws(
                "InvalidUsageDimensionException",
                "The usageDimension 'users' is not valid for product prod-demo.",
                400,
                Fault.REQUEST,
            )
        ),
    ),
    401: problem_response(
        "Missing or wrong sidecar token.",
        problem_example(
            Unauthorized(
                "this sidecar requires 'Authorization: Bearer <token>' or "
                "'X-Metering-Token: <token>' (AWS SDKs: the token as access key id); only "
                "/healthz and /readyz are open"
            )
        ),
    ),
    403: problem_response(
        "CustomerNotEntitledException, DisabledApiException, AccessDeniedException.",
        problem_example(
            _aws(
                "CustomerNotEntitledException",
                "The customer is not entitled to the product.",
                400,
                Fault.CONFIGURATION,
            )
        ),
    ),
    409: problem_response(
        "DuplicateRequestException, IdempotencyConflictException.",
        problem_example(
            _aws(
                "DuplicateRequestException",
                "A usage record with another quantity exists for this product, dimension and hour.",
                400,
                Fault.REQUEST,
            )
        ),
    ),
    413: problem_response(
        "Body over 1 MiB.",
        problem_example(PayloadTooLarge("the body is over 1048576 bytes")),
    ),
    422: problem_response(
        "The request breaks the API's constraints; nothing was sent.",
        problem_example(_INVALID),
    ),
    429: problem_response(
        "Still throttled after the sidecar's retries, or AWS's request quota has no slot "
        "before the call's deadline; see Retry-After.",
        problem_example(_THROTTLED),
    ),
    502: problem_response(
        "AWS failed, could not be reached, or refused the sidecar's credentials.",
        problem_example(UpstreamUnavailable("could not reach AWS for MeterUsage (ConnectError)")),
    ),
    503: problem_response(
        "No AWS credentials can be had, or the usage queue cannot take records now.",
        problem_example(
            CredentialsUnavailable(
                "no AWS credentials could be obtained from the provider chain "
                "(no provider in the chain had credentials)"
            )
        ),
    ),
    504: problem_response(
        "AWS did not answer in time. A retryable MeterUsage problem names the ClientToken "
        "and Timestamp sent: resend exactly those.",
        problem_example(_TIMED_OUT),
    ),
}


# Answered without the token on the API listener, whatever the settings.
_OPEN_PATHS = ("/healthz", "/readyz")


def _declare_the_token(document: dict[str, Any]) -> None:
    """The sidecar's token as security schemes: a bearer token, or the same token in
    X-Metering-Token. Needed only when the sidecar has one (METERING_AUTH_TOKEN), so
    no security is an alternative too; the probes never need it."""
    components = document.setdefault("components", {})
    components["securitySchemes"] = {
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The sidecar's token (METERING_AUTH_TOKEN), when it has one.",
        },
        "meteringToken": {
            "type": "apiKey",
            "in": "header",
            "name": "X-Metering-Token",
            "description": "The same token, in a header of its own.",
        },
    }
    document["security"] = [{"bearerToken": []}, {"meteringToken": []}, {}]
    for path in _OPEN_PATHS:
        for operation in document.get("paths", {}).get(path, {}).values():
            operation["security"] = []


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
            document = build()
            _drop_default_media_type(document)
            _declare_the_token(document)
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def not_found_response(description: str, detail: str) -> dict[str, Any]:
    """A documented 404 of a route that looks something up."""
    return problem_response(description, problem_example(NotFound(detail)))


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


_REHEARSAL_TEXT = (
    "Sandbox mode only (`METERING_MODE=sandbox`; in aws mode the header is ignored): "
    "answer this call as if AWS had answered it with this error code, or as if AWS had "
    f"not answered in time (`{TIMEOUT}`: 504 UpstreamTimeout) or had refused the "
    f"sidecar's credentials (`{CREDENTIALS_REFUSED}`: 502 CredentialsRejected). The "
    "answer is exactly the one the sidecar gives in aws mode after its retries: the "
    "same status, `code`, `retryable` (and, for MeterUsage, the ClientToken and "
    "Timestamp of a retryable problem), at once. A code the action cannot meet is a "
    "422 naming the ones it can. "
)


def rehearsal_header(action: str) -> Any:
    """The ``X-Metering-Sandbox-Error`` header parameter of ``action``'s REST route,
    its allowed values those of ``app.actions.sandbox.rehearsable``."""
    allowed = list(rehearsable(action))

    def one_of_the_allowed(schema: dict[str, Any]) -> None:
        # A header is text when it is there: not "string or null", as the parameter's
        # Python type (absent is None) would have it documented.
        schema.pop("anyOf", None)
        schema.update(type="string", enum=allowed)

    return Header(
        alias=REHEARSAL_HEADER,
        description=_REHEARSAL_TEXT + f"{action} can rehearse: " + ", ".join(allowed) + ".",
        json_schema_extra=one_of_the_allowed,
    )


class ReadinessCheck(BaseModel):
    """One readiness condition."""

    ok: bool
    detail: str
    blocking: Literal[False] | None = Field(
        None,
        description="false when a failure of this check only makes the sidecar degraded; "
        "absent when it makes it unready.",
    )


class Readiness(BaseModel):
    """What ``/readyz`` answers: ready or degraded (200), or not ready (503)."""

    status: Literal["ready", "degraded", "not ready"]
    checks: dict[str, ReadinessCheck]


READYZ_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "Not ready: usage cannot be taken durably at all (the queue cannot "
        "be written; with a shared store, neither the store nor the local spool), or the "
        "RegisterUsage gate is unmet. `checks` says why. Everything else (no credentials, "
        "AWS failing, the shared store lost while the spool takes usage) is 200 "
        "`degraded`.",
        "content": {
            "application/json": {
                "example": {
                    "status": "not ready",
                    "checks": {
                        "credentials": {
                            "ok": True,
                            "detail": "credentials from assume-role-with-web-identity",
                            "blocking": False,
                        },
                        "endpoint": {
                            "ok": True,
                            "detail": "https://metering.marketplace.us-east-1.amazonaws.com",
                        },
                        "queue": {
                            "ok": False,
                            "detail": "the shared store cannot be used since "
                            "2026-11-26T12:03:10+00:00 (OperationalError: connection "
                            "failed); the local spool cannot be written either (the usage "
                            "queue could not write: database or disk is full): usage "
                            "cannot be taken",
                        },
                        "spool": {
                            "ok": False,
                            "detail": "cannot be written: the usage queue could not write: "
                            "database or disk is full",
                            "blocking": False,
                        },
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


def _wire_error(description: str, error: MeteringError) -> dict[str, Any]:
    """A documented wire-protocol error: its example is what ``wire_error`` renders."""
    example = json.loads(bytes(wire_error(error).body))
    return {
        "model": AwsError,
        "description": description,
        "content": {
            _WIRE_CONTENT_TYPE: {
                "schema": {"$ref": "#/components/schemas/AwsError"},
                "example": example,
            }
        },
    }


WIRE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _wire_error(
        "AWS's client errors, and the sidecar's own checks (ValidationException).",
        RequestInvalid([FieldError("UsageDimension", "Field required")]),
    ),
    403: _wire_error(
        "Wrong sidecar token (as UnrecognizedClientException), or AWS's 403s.",
        Unauthorized(
            "this sidecar requires 'Authorization: Bearer <token>' or "
            "'X-Metering-Token: <token>' (AWS SDKs: the token as access key id); only "
            "/healthz and /readyz are open"
        ),
    ),
    413: _wire_error("Body over 1 MiB.", PayloadTooLarge("the body is over 1048576 bytes")),
    429: _wire_error("Still throttled after the sidecar's retries.", _THROTTLED),
    500: _wire_error("The sidecar failed.", MeteringError("see the sidecar's log")),
    502: _wire_error(
        "AWS failed or could not be reached.",
        UpstreamUnavailable("could not reach AWS for MeterUsage (ConnectError)"),
    ),
    503: _wire_error(
        "No AWS credentials can be had.",
        CredentialsUnavailable("no AWS credentials could be obtained from the provider chain"),
    ),
    504: _wire_error(
        "AWS did not answer in time.", UpstreamTimeout("AWS did not answer MeterUsage in time")
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
        },
        {
            "name": REHEARSAL_HEADER,
            "in": "header",
            "required": False,
            "description": _REHEARSAL_TEXT.replace("422", "400 ValidationException")
            + " ".join(f"{action}: {', '.join(rehearsable(action))}." for action in ACTIONS)
            + " The error comes in AWS's shape, with AWS's status (the sidecar's own, "
            "such as 504 UpstreamTimeout, with its own).",
            "schema": {
                "type": "string",
                "enum": sorted({code for action in ACTIONS for code in rehearsable(action)}),
            },
        },
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
