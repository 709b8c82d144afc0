"""REST API v1: the four metering actions, AWS's field names, problem+json errors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from app.actions.sandbox import rehearsing
from app.actions.service import Answer
from app.api.deps import ServiceDep
from app.api.openapi import (
    BATCH_METER_USAGE_EXAMPLES,
    ERROR_RESPONSES,
    METER_USAGE_EXAMPLES,
    REGISTER_USAGE_EXAMPLES,
    RESOLVE_CUSTOMER_EXAMPLES,
    problem_example,
    problem_response,
    rehearsal_header,
)
from app.api.rendering import json_response
from app.metering.errors import CustomerFormConflict
from app.metering.shapes import (
    BatchMeterUsageRequest,
    BatchMeterUsageResult,
    DryRunResult,
    MeterUsageRequest,
    MeterUsageResult,
    RegisterUsageRequest,
    RegisterUsageResult,
    ResolveCustomerRequest,
    ResolveCustomerResult,
)

router = APIRouter(prefix="/v1", tags=["metering"])

# X-Metering-Sandbox-Error, per action: what the sandbox may rehearse for it.
MeterUsageRehearsal = Annotated[str | None, rehearsal_header("MeterUsage")]
BatchMeterUsageRehearsal = Annotated[str | None, rehearsal_header("BatchMeterUsage")]
ResolveCustomerRehearsal = Annotated[str | None, rehearsal_header("ResolveCustomer")]
RegisterUsageRehearsal = Annotated[str | None, rehearsal_header("RegisterUsage")]

_BATCH_CONFLICT = problem_response(
    "AWS's DuplicateRequestException or IdempotencyConflictException; or, before anything "
    "is sent, a record of a customer whose subscription has ended "
    "(CustomerSubscriptionEnded), or under a second form of a customer that has usage of "
    "that dimension and hour queued or earlier in the call (CustomerFormConflict).",
    problem_example(
        CustomerFormConflict(
            "UsageRecords[0]: CustomerAWSAccountId 111122223333 + LicenseArn "
            "arn:aws:license-manager::111122223333:license:l-0123456789abcdef and "
            "CustomerIdentifier cust-7ab2c3d4e5f + ProductCode prod-demo are one customer "
            "(registry customer 7), which already has usage of dimension gigabytes in the "
            "hour 2026-11-26T12:00:00Z under the second form: AWS would bill both records. "
            "Send this customer's usage under one form"
        )
    ),
)


def _ok(answer: Answer[Any]) -> Response:
    result: BaseModel = answer.result
    headers = {"X-Amzn-RequestId": answer.aws_request_id} if answer.aws_request_id else None
    return json_response(result, headers=headers)


@router.post(
    "/meter-usage",
    summary="MeterUsage",
    response_model=MeterUsageResult | DryRunResult,
    responses=ERROR_RESPONSES,
    openapi_extra=METER_USAGE_EXAMPLES,
)
async def meter_usage(
    body: MeterUsageRequest, service: ServiceDep, rehearse: MeterUsageRehearsal = None
) -> Response:
    """Report one hour of usage of one dimension, from software in the buyer's account.

    `ProductCode` defaults to the configured one, `Timestamp` to now, and
    `ClientToken` to a new UUID reused on every retry of this call.
    """
    with rehearsing(rehearse):
        return _ok(await service.meter_usage(body))


@router.post(
    "/batch-meter-usage",
    summary="BatchMeterUsage",
    response_model=BatchMeterUsageResult,
    responses=ERROR_RESPONSES | {409: _BATCH_CONFLICT},
    openapi_extra=BATCH_METER_USAGE_EXAMPLES,
)
async def batch_meter_usage(
    body: BatchMeterUsageRequest, service: ServiceDep, rehearse: BatchMeterUsageRehearsal = None
) -> Response:
    """Report usage of up to 25 customer-dimension-hours of one product (SaaS).

    `UnprocessedRecords` are resent by the sidecar; those still left when its
    deadline passes come back in `UnprocessedRecords`. Records of customers whose
    subscription has ended, or under a second form of a customer with usage of the
    same dimension and hour, refuse the call (409) before anything is sent.

    The sandbox answers `CustomerNotSubscribed` for a record whose
    `CustomerIdentifier` starts with `unsubscribed` or whose `CustomerAWSAccountId`
    starts with `000000`.
    """
    with rehearsing(rehearse):
        return _ok(await service.batch_meter_usage(body))


@router.post(
    "/resolve-customer",
    summary="ResolveCustomer",
    response_model=ResolveCustomerResult,
    responses=ERROR_RESPONSES,
    openapi_extra=RESOLVE_CUSTOMER_EXAMPLES,
)
async def resolve_customer(
    body: ResolveCustomerRequest, service: ServiceDep, rehearse: ResolveCustomerRehearsal = None
) -> Response:
    """Redeem a buyer's registration token for the customer's identity and license.

    The answer registers the customer (`GET /v1/customers`), tying its
    CustomerIdentifier to its CustomerAWSAccountId and license.
    """
    with rehearsing(rehearse):
        return _ok(await service.resolve_customer(body))


@router.post(
    "/register-usage",
    summary="RegisterUsage",
    response_model=RegisterUsageResult,
    responses=ERROR_RESPONSES,
    openapi_extra=REGISTER_USAGE_EXAMPLES,
)
async def register_usage(
    body: RegisterUsageRequest, service: ServiceDep, rehearse: RegisterUsageRehearsal = None
) -> Response:
    """Register a paid container product's task or pod at launch (entitlement and metering)."""
    with rehearsing(rehearse):
        return _ok(await service.register_usage(body))
