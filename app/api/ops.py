"""Operations: liveness, readiness and Prometheus metrics. None of them calls AWS."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from app.api.deps import SidecarDep
from app.api.openapi import READYZ_RESPONSES, Readiness
from app.metering.errors import QueueUnavailable

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process is alive and serving. Never calls AWS."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Readiness,
    responses=READYZ_RESPONSES,
)
async def readyz(sidecar: SidecarDep) -> Response:
    """Ready when credentials are held and not expired (aws mode), settings are sane and
    the usage queue can be written. ``aws`` says whether AWS has been refusing or
    failing our calls, and since when; it does not make the sidecar unready (queued
    usage waits safely, and the app must keep serving), but it marks it ``degraded``."""
    checks: dict[str, dict[str, Any]] = {}
    if sidecar.settings.mode == "sandbox":
        checks["mode"] = {"ok": True, "detail": "sandbox: nothing is sent to AWS"}
    else:
        assert sidecar.credentials is not None
        ok, detail = sidecar.credentials.status()
        checks["credentials"] = {"ok": ok, "detail": detail}
        checks["endpoint"] = {"ok": bool(sidecar.endpoint), "detail": sidecar.endpoint or "none"}
        if sidecar.health is not None:
            fine, detail = sidecar.health.status()
            checks["aws"] = {"ok": fine, "detail": detail, "blocking": False}
    if sidecar.queue is not None:
        try:
            await sidecar.queue.check_writable()
        except QueueUnavailable as exc:
            checks["queue"] = {"ok": False, "detail": exc.detail}
        else:
            checks["queue"] = {"ok": True, "detail": "writable"}
    if sidecar.supervisor is not None:
        ok, detail = sidecar.supervisor.status()
        checks["background"] = {"ok": ok, "detail": detail}
    if sidecar.entitlement is not None:
        ok, detail = sidecar.entitlement.status()
        checks["entitlement"] = {"ok": ok, "detail": detail}
    ready = all(check["ok"] for check in checks.values() if check.get("blocking", True))
    degraded = not all(check["ok"] for check in checks.values())
    status = "not ready" if not ready else "degraded" if degraded else "ready"
    return JSONResponse({"status": status, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(sidecar: SidecarDep) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(sidecar.metrics.registry), media_type=CONTENT_TYPE_LATEST)
