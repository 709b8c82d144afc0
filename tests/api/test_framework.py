"""Work per request the sidecar keeps out of the framework's hands."""

from __future__ import annotations

from pathlib import Path

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


async def test_a_bug_is_a_problem_document_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # From a POST route and a GET route alike: the caller gets the same 500 problem
    # document, never a stack trace, and the log says it once.
    app = create_app(
        Settings(mode="sandbox", product_code="prod-bug", queue_path=tmp_path / "q.sqlite3")
    )

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret detail of a bug")

    async with app.router.lifespan_context(app):
        monkeypatch.setattr(app.state.sidecar.service, "meter_usage", broken)
        monkeypatch.setattr(app.state.sidecar.queue, "records", broken)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            for method, path, body in (
                ("POST", "/v1/meter-usage", {"UsageDimension": "d", "UsageQuantity": 1}),
                ("GET", "/v1/usage-records", None),
            ):
                caplog.clear()
                response = await client.request(method, path, json=body)
                assert response.status_code == 500
                assert response.headers["content-type"] == "application/problem+json"
                problem = response.json()
                assert problem["code"] == "InternalError"
                assert problem["instance"] == path
                assert problem["request_id"] == response.headers["x-request-id"]
                assert "secret detail" not in response.text
                assert "Traceback" not in response.text
                logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
                assert len(logged) == 1, path
