"""The customer registry over REST: the customers usage is metered for, and the
subscription events that move them (``POST /v1/events`` takes one as SQS delivers it)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from starlette.responses import Response

from app.api.deps import SidecarDep
from app.api.openapi import (
    ERROR_RESPONSES,
    not_found_response,
    problem_example,
    problem_response,
)
from app.api.rendering import json_response
from app.api.routes.usage import MAX_ID, Limit, QueueDep
from app.metering.errors import EventUnreadable, NotFound, QueueUnavailable
from app.metering.subscriptions import UnreadableEvent, parse_event
from app.queue.records import CustomerPage, CustomerView, EventReceipt
from app.queue.usage_queue import event_type_label

router = APIRouter(prefix="/v1", tags=["customers"])

_LICENSE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef"
_EVENTBRIDGE_ENDED: dict[str, Any] = {
    "version": "0",
    "id": "6f7c2a11-0d3b-4c55-9d63-0b1e2f3a4b5c",
    "detail-type": "Purchase Agreement Ended - Manufacturer",
    "source": "aws.agreement-marketplace",
    "account": "999988887777",
    "time": "2026-11-26T12:40:15Z",
    "region": "us-east-1",
    "resources": [],
    "detail": {
        "agreement": {"id": "agmt-1234567890abcdef", "status": "ENDED"},
        "product": {"code": "prod-demo"},
        "license": {"arn": _LICENSE},
        "acceptor": {"accountId": "111122223333"},
    },
}
_SNS_PENDING = {
    "action": "unsubscribe-pending",
    "customer-identifier": "cust-7ab2c3d4e5f",
    "product-code": "prod-demo",
}
_EVENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One event exactly as the SQS queue delivers it: an EventBridge event "
        "(source aws.agreement-marketplace), an SNS envelope (Type Notification, the "
        "message as text in Message), or a raw SNS message.",
        "content": {
            "application/json": {
                "schema": {"type": "object"},
                "examples": {
                    "eventbridge": {"value": _EVENTBRIDGE_ENDED},
                    "sns_envelope": {
                        "value": {
                            "Type": "Notification",
                            "MessageId": "1b2c3d4e-5f60-4718-9a2b-3c4d5e6f7a8b",
                            "TopicArn": "arn:aws:sns:us-east-1:287250355862:"
                            "aws-mp-subscription-notification-prod-demo",
                            "Message": (
                                '{"action":"unsubscribe-pending",'
                                '"customer-identifier":"cust-7ab2c3d4e5f",'
                                '"product-code":"prod-demo"}'
                            ),
                            "Timestamp": "2026-11-26T12:40:15.123Z",
                        }
                    },
                    "sns_raw": {"value": _SNS_PENDING},
                },
            }
        },
    }
}
_UNREADABLE = problem_response(
    "The body is no AWS Marketplace event the sidecar can read (nothing was applied).",
    problem_example(
        EventUnreadable(
            "not an AWS Marketplace event: neither an EventBridge event (source "
            "aws.agreement-marketplace), an SNS envelope, nor an SNS message with an action"
        )
    ),
)


@router.get(
    "/customers",
    summary="List customers",
    response_model=CustomerPage,
    responses=ERROR_RESPONSES,
)
async def list_customers(
    queue: QueueDep,
    status: Literal["active", "ending", "ended"] | None = None,
    customer: Annotated[
        str | None,
        Query(max_length=255, description="A CustomerIdentifier or a CustomerAWSAccountId."),
    ] = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> Response:
    """Customers (one subscription of one product each) by status and either id form."""
    return json_response(await queue.customers(status, customer, cursor, limit))


@router.get(
    "/customers/{customer_id}",
    summary="One customer",
    response_model=CustomerView,
    responses=ERROR_RESPONSES | {404: not_found_response("No such customer.", "no customer 7")},
)
async def get_customer(
    queue: QueueDep, customer_id: Annotated[int, Path(ge=0, le=MAX_ID, examples=[7])]
) -> Response:
    """A customer: its identifiers, status, when it started ending, when its grace closes
    and its usage was sent, and the events seen (type, kind, time)."""
    view = await queue.customer(customer_id)
    if view is None:
        raise NotFound(f"no customer {customer_id}")
    return json_response(view)


@router.post(
    "/events",
    status_code=202,
    summary="Apply a subscription event",
    response_model=EventReceipt,
    responses=ERROR_RESPONSES | {400: _UNREADABLE},
    openapi_extra=_EVENT_BODY,
)
async def post_event(request: Request, queue: QueueDep, sidecar: SidecarDep) -> Response:
    """Apply one AWS Marketplace subscription event, exactly as SQS delivers it (for a
    seller that forwards events itself, or to rehearse an unsubscribe in the sandbox).

    The same event id applied again changes nothing (`Outcome: duplicate`). After
    `unsubscribe-pending` (or `Purchase Agreement Ended`, `License Deprovisioned`) the
    customer's usage is taken for `METERING_CUSTOMER_END_GRACE`; then its open usage,
    the current hour included, is sent at once and later usage is refused (409).
    """
    events = sidecar.metrics.events
    try:
        event = parse_event(await request.body())
    except UnreadableEvent as exc:
        # The reason only: the body is never repeated.
        events.labels("unreadable", "unreadable").inc()
        raise EventUnreadable(str(exc)) from None
    try:
        receipt = await queue.receive_event(event)
    except QueueUnavailable:
        events.labels(event_type_label(event), "failed").inc()
        raise
    events.labels(event_type_label(event), receipt.Outcome).inc()
    return json_response(receipt, status=202)
