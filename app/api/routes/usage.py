"""The durable usage queue over REST: submit usage, see where it stands."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import PlainValidator, WithJsonSchema
from starlette.responses import Response

from app.api.openapi import (
    ERROR_RESPONSES,
    USAGE_RECORDS_EXAMPLES,
    not_found_response,
    problem_example,
    problem_response,
)
from app.api.rendering import json_response
from app.metering.billing import hour_of
from app.metering.errors import CustomerSubscriptionEnded, NotFound, QueueUnavailable
from app.metering.shapes import parse_timestamp
from app.queue.records import (
    Filters,
    GrainPage,
    GrainView,
    UsageRecordPage,
    UsageRecordsReceipt,
    UsageRecordsRequest,
    UsageRecordView,
)
from app.queue.usage_queue import UsageQueue

router = APIRouter(prefix="/v1", tags=["usage queue"])
# Ids are SQLite integers: signed 64 bits.
MAX_ID = 2**63 - 1
_NUMBER = re.compile(r"\d+(\.\d+)?", re.ASCII)


async def get_queue(request: Request) -> UsageQueue:
    """The usage queue built by the lifespan (``async``: no thread-pool hop)."""
    queue: UsageQueue | None = request.app.state.sidecar.queue
    if queue is None:
        raise QueueUnavailable("the usage queue is not running")
    return queue


QueueDep = Annotated[UsageQueue, Depends(get_queue)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]


_YEARS_2001_TO_9997 = (
    r"^(?:200[1-9]|20[1-9]\d|2[1-9]\d{2}|[3-8]\d{3}|9[0-8]\d{2}|99[0-8]\d|999[0-7])-"
)


def _query_hour(value: object) -> datetime:
    # Query strings are text: "1795696815" means epoch seconds here.
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        value = float(value)
    return hour_of(parse_timestamp(value))


HourQuery = Annotated[
    Annotated[
        datetime,
        PlainValidator(_query_hour),
        WithJsonSchema(
            {
                # Within the years the sidecar takes (2000 to 9998 UTC), with a
                # day's margin at each end for offsets: the years 2001 to 9997,
                # or epoch seconds of 10 or 11 digits (2001 to 5138).
                "anyOf": [
                    {"type": "string", "format": "date-time", "pattern": _YEARS_2001_TO_9997},
                    {"type": "string", "pattern": r"^[1-9]\d{9,10}(\.\d{1,9})?$"},
                ]
            }
        ),
    ]
    | None,
    Query(
        description="The hour (RFC 3339 text with an offset, or epoch seconds).",
        examples=["2026-11-26T12:00:00Z"],
    ),
]


_REFUSED_FOR_CUSTOMER = problem_response(
    "A record's IdempotencyKey was used with other content (IdempotencyKeyConflict); its "
    "customer's subscription has ended (CustomerSubscriptionEnded); or its customer has "
    "usage of that dimension and hour under its other form (CustomerFormConflict). Nothing "
    "of the call was queued; with AcceptPartial those records are in Rejected instead.",
    problem_example(
        CustomerSubscriptionEnded(
            "UsageRecords[0]: CustomerIdentifier cust-7ab2c3d4e5f + ProductCode prod-demo: "
            "usage refused since 2026-11-26T12:55:15Z: the customer's subscription ended "
            "(ending, registry customer 7): AWS takes no usage for it any more, so the queue "
            "refuses it; its final hour began at 2026-11-26T12:40:15Z and its remaining usage "
            "has been (or is being) sent"
        )
    ),
)


@router.post(
    "/usage-records",
    status_code=202,
    summary="Queue usage",
    response_model=UsageRecordsReceipt,
    responses=ERROR_RESPONSES | {409: _REFUSED_FOR_CUSTOMER},
    openapi_extra=USAGE_RECORDS_EXAMPLES,
)
async def submit_usage_records(body: UsageRecordsRequest, queue: QueueDep) -> Response:
    """Queue up to 1,000 usage records; answered 202 once every accepted record is on disk.

    Usage is summed per billing grain and each grain is sent once, after its
    hour has closed. Usage for a grain already sent rolls forward into the
    next open hour (`RolledForward: true`). Reuse of an `IdempotencyKey` with
    the same content returns the same record; with other content, 409. Usage of
    a customer whose subscription has ended is refused (409
    `CustomerSubscriptionEnded`), as is usage under a second form of one customer
    in an hour (409 `CustomerFormConflict`).
    """
    receipt = await queue.submit(body.UsageRecords, accept_partial=body.AcceptPartial)
    return json_response(receipt, status=202)


@router.get(
    "/usage-records",
    summary="List queued records",
    response_model=UsageRecordPage,
    responses=ERROR_RESPONSES,
)
async def list_usage_records(
    queue: QueueDep,
    status: Literal["pending", "accepted", "rejected", "expired"] | None = None,
    customer: Annotated[str | None, Query(max_length=255)] = None,
    hour: HourQuery = None,
    limit: Limit = 100,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """Records by status, customer (either id form) and hour, oldest first."""
    page = await queue.records(Filters(status, customer, hour), cursor, limit)
    return json_response(page)


@router.get(
    "/usage-records/{record_id}",
    summary="One queued record",
    response_model=UsageRecordView,
    responses=ERROR_RESPONSES
    | {
        404: not_found_response(
            "No such record.", "no usage record ur_01a217f88abcb1265ecb2a4f5b41"
        )
    },
)
async def get_usage_record(
    queue: QueueDep,
    record_id: Annotated[str, Path(max_length=64, examples=["ur_01a217f88abcb1265ecb2a4f5b41"])],
) -> Response:
    """A record's status (`pending`, `accepted`, `rejected`, `expired`), its grain and attempts."""
    view = await queue.record(record_id)
    if view is None:
        raise NotFound(f"no usage record {record_id}")
    return json_response(view)


@router.get(
    "/usage-grains",
    summary="List billing grains",
    response_model=GrainPage,
    responses=ERROR_RESPONSES,
)
async def list_usage_grains(
    queue: QueueDep,
    status: Literal["open", "frozen", "pending", "accepted", "rejected", "expired"] | None = None,
    customer: Annotated[str | None, Query(max_length=255)] = None,
    hour: HourQuery = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
) -> Response:
    """Grains (summed usage, one AWS record each) by status, customer and hour."""
    page = await queue.grains(Filters(status, customer, hour), cursor, limit)
    return json_response(page)


@router.get(
    "/usage-grains/{grain_id}",
    summary="One billing grain",
    response_model=GrainView,
    responses=ERROR_RESPONSES | {404: not_found_response("No such grain.", "no usage grain 7")},
)
async def get_usage_grain(
    queue: QueueDep, grain_id: Annotated[int, Path(ge=0, le=MAX_ID, examples=[7])]
) -> Response:
    """A grain: its sum, status, attempts, deadline and the exact record sent."""
    view = await queue.grain(grain_id)
    if view is None:
        raise NotFound(f"no usage grain {grain_id}")
    return json_response(view)
