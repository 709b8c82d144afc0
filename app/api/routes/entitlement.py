"""GET /v1/entitlement: whether this paid container product may run (RegisterUsage at start)."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.actions.registration import Entitlement
from app.api.deps import SidecarDep
from app.api.openapi import ERROR_RESPONSES
from app.api.rendering import json_response

router = APIRouter(prefix="/v1", tags=["metering"])


@router.get(
    "/entitlement",
    summary="Entitlement",
    response_model=Entitlement,
    response_model_exclude_none=True,
    responses=ERROR_RESPONSES,
)
async def entitlement(sidecar: SidecarDep) -> Response:
    """The result of the RegisterUsage call made at start (`METERING_REGISTER_USAGE`).

    Once it succeeded: `Entitled` true with its `Signature`, `PublicKeyRotationTimestamp`,
    `RegisteredAt` and the `Nonce` sent. Until then: `Entitled` false with the `Reason`
    and `Since` when (the sidecar keeps trying). With the gate off: `{"Enabled": false}`.
    """
    gate = sidecar.entitlement
    view = gate.view() if gate is not None else Entitlement(Enabled=False)
    return json_response(view)
