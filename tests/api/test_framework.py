"""Work per request the sidecar keeps out of the framework's hands."""

from __future__ import annotations

import httpx
import pytest
from opentelemetry import metrics, trace

from app.config import Settings
from app.main import create_app


async def test_fastapi_telemetry_is_not_consulted_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FastAPI's native OpenTelemetry looks the global providers up on every
    # request unless it is switched off; the sidecar's telemetry is its own.
    lookups: list[str] = []
    tracer_provider = trace.get_tracer_provider
    meter_provider = metrics.get_meter_provider

    def traced() -> trace.TracerProvider:
        lookups.append("tracer")
        return tracer_provider()

    def metered() -> metrics.MeterProvider:
        lookups.append("meter")
        return meter_provider()

    monkeypatch.setattr(trace, "get_tracer_provider", traced)
    monkeypatch.setattr(metrics, "get_meter_provider", metered)
    app = create_app(Settings(mode="sandbox"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
        for _ in range(3):
            assert (await client.get("/healthz")).status_code == 200
    assert lookups == []
