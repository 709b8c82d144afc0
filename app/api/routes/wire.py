"""AWS's own JSON 1.1 wire protocol on ``POST /``, so official SDKs and the CLI work unchanged.

Point an SDK's endpoint URL at the sidecar with any placeholder credentials:
the caller's signature is not checked against AWS keys (there are none here)
and nothing of it is forwarded; the sidecar validates the call like the REST
routes, re-signs it with the real credentials and answers exactly as AWS
would, errors included (``__type``, ``x-amzn-ErrorType``, ``x-amzn-RequestId``),
so every SDK raises its own typed exception.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from app.actions.sandbox import REHEARSAL_HEADER, rehearsing
from app.actions.service import Answer, MeteringService
from app.api.deps import SidecarDep
from app.api.openapi import WIRE_ERROR_RESPONSES, WIRE_OPENAPI_EXTRA
from app.api.rendering import wire_response
from app.api.wire_errors import aws_error, wire_error
from app.metering.errors import (
    MeteringError,
    RequestInvalid,
    field_errors,
)
from app.metering.protocol import ACTIONS, CONTENT_TYPE, TARGET_PREFIX
from app.metering.shapes import (
    BatchMeterUsageRequest,
    MeterUsageRequest,
    RegisterUsageRequest,
    ResolveCustomerRequest,
)

router = APIRouter(tags=["aws-wire-protocol"])

_REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "MeterUsage": MeterUsageRequest,
    "BatchMeterUsage": BatchMeterUsageRequest,
    "ResolveCustomer": ResolveCustomerRequest,
    "RegisterUsage": RegisterUsageRequest,
}


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _named_errors(model: type[BaseModel], body: bytes) -> ValidationError | None:
    """The errors naming the field, for JSON the fast parser refuses whole; None if none.

    The fast parser refuses JSON that spells a lone surrogate ("\\ud800"), which
    JSON's grammar allows; Python's reads it, so validation can say which field
    holds it, as on the REST routes.
    """
    try:
        decoded = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    try:
        model.model_validate(decoded)
    except ValidationError as exc:
        return exc
    return None


def _parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """``body`` as ``model``; ``RequestInvalid`` naming each bad field otherwise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        invalid_json = all(e["type"] == "json_invalid" for e in exc.errors())
        named = _named_errors(model, body) if invalid_json else None
        raise RequestInvalid(field_errors((named or exc).errors(include_input=False))) from exc


async def _perform(service: MeteringService, request: BaseModel) -> Answer[Any]:
    profile = service.wire_profile
    if isinstance(request, MeterUsageRequest):
        return await service.meter_usage(request, profile)
    if isinstance(request, BatchMeterUsageRequest):
        return await service.batch_meter_usage(request, profile)
    if isinstance(request, ResolveCustomerRequest):
        return await service.resolve_customer(request, profile)
    assert isinstance(request, RegisterUsageRequest)
    return await service.register_usage(request, profile)


@router.post(
    "/",
    summary="AWS JSON 1.1 wire protocol",
    responses={
        200: {"description": "Exactly what AWS answers.", "content": {CONTENT_TYPE: {}}},
        **WIRE_ERROR_RESPONSES,
    },
    openapi_extra=WIRE_OPENAPI_EXTRA,
)
async def aws_wire_protocol(request: Request, sidecar: SidecarDep) -> Response:
    """Dispatch on `X-Amz-Target: AWSMPMeteringService.<Action>`; answer as AWS does.

    In sandbox mode, `X-Metering-Sandbox-Error` rehearses an error answer."""
    target = request.headers.get("x-amz-target", "")
    prefix, _, action = target.partition(".")
    if prefix != TARGET_PREFIX or action not in ACTIONS:
        return aws_error(
            400,
            "UnknownOperationException",
            f"Unknown operation {target!r}" if target else "Missing X-Amz-Target header",
            None,
        )
    body = await request.body()
    try:
        parsed = _parse(_REQUEST_MODELS[action], body or b"{}")
        with rehearsing(request.headers.get(REHEARSAL_HEADER)):
            answer = await _perform(sidecar.service, parsed)
    except MeteringError as exc:
        return wire_error(exc)
    result: BaseModel = answer.result
    return wire_response(
        result, headers={"x-amzn-RequestId": answer.aws_request_id or str(uuid.uuid4())}
    )
