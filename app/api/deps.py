"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.actions.service import MeteringService
from app.metering.errors import Starting
from app.state import Sidecar


async def get_sidecar(request: Request) -> Sidecar:
    """The running sidecar, built by the lifespan. ``async``: FastAPI runs plain
    functions in a thread pool, a hop no request should pay for a lookup."""
    sidecar: Sidecar | None = getattr(request.app.state, "sidecar", None)
    if sidecar is None:
        # The operations listener answers before the API's lifespan has built it.
        raise Starting("the sidecar is starting")
    return sidecar


async def get_service(request: Request) -> MeteringService:
    """The metering operations."""
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar.service


SidecarDep = Annotated[Sidecar, Depends(get_sidecar)]
ServiceDep = Annotated[MeteringService, Depends(get_service)]
