"""Operations: liveness, readiness and Prometheus metrics. None of them calls AWS."""

from __future__ import annotations

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import SidecarDep
from app.api.openapi import READYZ_RESPONSES, Readiness, ReadinessCheck
from app.api.rendering import json_response

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
    """503 (``not ready``) only while the sidecar cannot take usage durably at all (the
    usage queue cannot be written; with a shared store: the store cannot be used and
    the local spool cannot be written either), or while the RegisterUsage gate
    (``METERING_REGISTER_USAGE``) is unmet. Everything else that is wrong makes it 200
    ``degraded``, naming why, and keeps the app serving (a native sidecar's readiness
    is its pod's): AWS refusing or failing our calls (``aws``), no AWS credentials
    (``credentials``: direct calls answer 503 meanwhile, queued usage waits), a shared
    store that cannot be used while the spool takes usage (``queue``), records waiting
    in the spool (``spool``), the events queue (``events``), a background loop that
    stopped (``background``). Metrics and alerts are how operators hear of those.
    Never calls AWS, and never waits on the shared store."""
    checks: dict[str, ReadinessCheck] = {}
    if sidecar.settings.mode == "sandbox":
        checks["mode"] = ReadinessCheck(ok=True, detail="sandbox: nothing is sent to AWS")
    else:
        assert sidecar.credentials is not None
        checks["credentials"] = _check(sidecar.credentials.status(), blocking=False)
        checks["endpoint"] = ReadinessCheck(
            ok=bool(sidecar.endpoint), detail=sidecar.endpoint or "none"
        )
        if sidecar.health is not None:
            checks["aws"] = _check(sidecar.health.status(), blocking=False)
        if sidecar.quotas is not None:
            checks["quota"] = _check(sidecar.quotas.status(), blocking=False)
    if sidecar.fleet is not None:
        checks["clock"] = _check(sidecar.fleet.clock.status(), blocking=False)
    if sidecar.queue is not None:
        # With a shared store: the store (blocking only if the local spool cannot take
        # usage either) and the spool; never a call that waits on the store.
        for name, check in (await sidecar.queue.readiness()).items():
            checks[name] = _check((check.ok, check.detail), blocking=check.blocking)
    if sidecar.supervisor is not None:
        checks["background"] = _check(sidecar.supervisor.status(), blocking=False)
    if sidecar.entitlement is not None:
        checks["entitlement"] = _check(sidecar.entitlement.status())
    if sidecar.events is not None:
        checks["events"] = _check(sidecar.events.status(), blocking=False)
    ready = all(check.ok for check in checks.values() if check.blocking is not False)
    degraded = not all(check.ok for check in checks.values())
    answer = Readiness(
        status="not ready" if not ready else "degraded" if degraded else "ready", checks=checks
    )
    return json_response(answer, status=200 if ready else 503)


def _check(status: tuple[bool, str], *, blocking: bool = True) -> ReadinessCheck:
    ok, detail = status
    return ReadinessCheck(ok=ok, detail=detail, blocking=None if blocking else False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(sidecar: SidecarDep) -> Response:
    """Prometheus text exposition."""
    return Response(generate_latest(sidecar.metrics.registry), media_type=CONTENT_TYPE_LATEST)
