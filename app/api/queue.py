"""The durable usage queue over REST: submit usage, see where it stands."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from app.api.openapi import ERROR_RESPONSES
from app.billing import hour_of
from app.errors import FieldError, NotFound, QueueUnavailable, RequestInvalid
from app.models import parse_timestamp
from app.queue.models import (
    GrainPage,
    GrainView,
    UsageRecordPage,
    UsageRecordsReceipt,
    UsageRecordsRequest,
    UsageRecordView,
)
from app.queue.service import UsageQueue
from app.queue.store import Filters

router = APIRouter(prefix="/v1", tags=["usage queue"])
_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def get_queue(request: Request) -> UsageQueue:
    """The usage queue built by the lifespan."""
    queue: UsageQueue | None = request.app.state.sidecar.queue
    if queue is None:
        raise QueueUnavailable("the usage queue is not running")
    return queue


QueueDep = Annotated[UsageQueue, Depends(get_queue)]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
HourQuery = Annotated[
    str | None,
    Query(description="The hour (RFC 3339 or epoch seconds), as it was reported.", max_length=64),
]


def _hour(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = parse_timestamp(float(value) if _NUMBER.match(value) else value)
    except ValueError as exc:
        raise RequestInvalid([FieldError("hour", str(exc))]) from exc
    return hour_of(parsed)


@router.post(
    "/usage-records",
    status_code=202,
    summary="Queue usage",
    response_model=UsageRecordsReceipt,
    responses=ERROR_RESPONSES,
)
async def submit_usage_records(body: UsageRecordsRequest, queue: QueueDep) -> Response:
    """Queue up to 1,000 usage records; answered 202 once every accepted record is on disk.

    Usage is summed per billing grain and each grain is sent once, after its
    hour has closed. Usage for a grain already sent rolls forward into the
    next open hour (`RolledForward: true`). Reuse of an `IdempotencyKey` with
    the same content returns the same record; with other content, 409.
    """
    receipt = await queue.submit(body.UsageRecords, accept_partial=body.AcceptPartial)
    return Response(receipt.model_dump_json(), status_code=202, media_type="application/json")


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
    page = await queue.records(Filters(status, customer, _hour(hour)), cursor, limit)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get(
    "/usage-records/{record_id}",
    summary="One queued record",
    response_model=UsageRecordView,
    responses=ERROR_RESPONSES | {404: ERROR_RESPONSES[400] | {"description": "No such record."}},
)
async def get_usage_record(
    queue: QueueDep, record_id: Annotated[str, Path(max_length=64)]
) -> Response:
    """A record's status (`pending`, `accepted`, `rejected`, `expired`), its grain and attempts."""
    view = await queue.record(record_id)
    if view is None:
        raise NotFound(f"no usage record {record_id}")
    return Response(view.model_dump_json(), media_type="application/json")


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
    cursor: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """Grains (summed usage, one AWS record each) by status, customer and hour."""
    page = await queue.grains(Filters(status, customer, _hour(hour)), cursor, limit)
    return Response(page.model_dump_json(), media_type="application/json")


@router.get(
    "/usage-grains/{grain_id}",
    summary="One billing grain",
    response_model=GrainView,
    responses=ERROR_RESPONSES | {404: ERROR_RESPONSES[400] | {"description": "No such grain."}},
)
async def get_usage_grain(queue: QueueDep, grain_id: Annotated[int, Path(ge=0)]) -> Response:
    """A grain: its sum, status, attempts, deadline and the exact record sent."""
    view = await queue.grain(grain_id)
    if view is None:
        raise NotFound(f"no usage grain {grain_id}")
    return Response(view.model_dump_json(), media_type="application/json")
