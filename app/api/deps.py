"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.operations import MeteringService
from app.state import Sidecar


def get_sidecar(request: Request) -> Sidecar:
    """The running sidecar, built by the lifespan."""
    sidecar: Sidecar = request.app.state.sidecar
    return sidecar


def get_service(request: Request) -> MeteringService:
    """The metering operations."""
    return get_sidecar(request).service


SidecarDep = Annotated[Sidecar, Depends(get_sidecar)]
ServiceDep = Annotated[MeteringService, Depends(get_service)]
