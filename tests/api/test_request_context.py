"""The request context (app.api.context) as an ordinary middleware: every route runs
through FastAPI with its dependencies, and the context's promises hold around it."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.types import Message

from app.actions.service import MeteringService
from app.api import deps
from app.api.routes import usage as queue_routes
from app.config import Settings
from app.main import ROUTERS, create_app
from app.metering.protocol import CONTENT_TYPE, TARGET_PREFIX
from app.queue.usage_queue import UsageQueue
from app.state import Sidecar

NOW = datetime.now(UTC).isoformat()
RECORD = {"Timestamp": NOW, "CustomerAWSAccountId": "123456789012", "Dimension": "users"}
# A body each POST route answers 2xx, by path; "/" is the AWS wire protocol.
GOOD: dict[str, dict[str, Any]] = {
    "/v1/meter-usage": {"UsageDimension": "users", "UsageQuantity": 2},
    "/v1/batch-meter-usage": {"UsageRecords": [{**RECORD, "Quantity": 1}]},
    "/v1/resolve-customer": {"RegistrationToken": "sandbox-token"},
    "/v1/register-usage": {"Nonce": "n-1"},
    "/v1/usage-records": {"UsageRecords": [{**RECORD, "Quantity": 3}]},
    "/v1/events": {"action": "entitlement-updated", "customer-identifier": "cust-context"},
    "/": {"UsageDimension": "seats", "UsageQuantity": 1},
}
WIRE_HEADERS = {"X-Amz-Target": f"{TARGET_PREFIX}.MeterUsage", "Content-Type": CONTENT_TYPE}


@asynccontextmanager
async def _running(tmp_path: Path, **options: Any) -> AsyncIterator[FastAPI]:
    settings = Settings(
        mode="sandbox",
        product_code="prod-context",
        queue_path=tmp_path / "queue.sqlite3",
        **options,
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def _client(application: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=application)
    return httpx.AsyncClient(transport=transport, base_url="http://sidecar")


def _post_routes() -> set[str]:
    return {
        route.path
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ())
    }


async def test_every_post_route_runs_its_dependencies(tmp_path: Path) -> None:
    # A dependency overridden (or added) on a route runs for a body that parses:
    # no route is served past FastAPI's dependency solving.
    seen: list[tuple[str, str]] = []

    async def service(request: Request) -> MeteringService:
        seen.append(("service", request.url.path))
        return await deps.get_service(request)

    async def sidecar(request: Request) -> Sidecar:
        seen.append(("sidecar", request.url.path))
        return await deps.get_sidecar(request)

    async def queue(request: Request) -> UsageQueue:
        seen.append(("queue", request.url.path))
        return await queue_routes.get_queue(request)

    assert _post_routes() == set(GOOD)
    async with _running(tmp_path) as application:
        application.dependency_overrides.update(
            {
                deps.get_service: service,
                deps.get_sidecar: sidecar,
                queue_routes.get_queue: queue,
            }
        )
        async with _client(application) as client:
            for path, body in GOOD.items():
                headers = WIRE_HEADERS if path == "/" else None
                response = await client.post(path, json=body, headers=headers)
                assert response.status_code in (200, 202), (path, response.text)
                assert response.headers["x-metering-sandbox"] == "true"
                assert response.headers["x-request-id"]
    assert {path for _, path in seen} == set(GOOD)
    assert ("queue", "/v1/usage-records") in seen
    assert ("service", "/v1/meter-usage") in seen


def _requests_by_route(application: FastAPI) -> dict[tuple[str, str, str], float]:
    sidecar: Sidecar = application.state.sidecar
    counted: dict[tuple[str, str, str], float] = {}
    for family in sidecar.metrics.http_requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                counted[labels["route"], labels["method"], labels["status"]] = sample.value
    return counted


async def test_metrics_count_by_route_template(tmp_path: Path) -> None:
    async with _running(tmp_path) as application, _client(application) as client:
        assert (await client.get("/v1/usage-records/12345")).status_code == 404
        assert (await client.post("/v1/meter-usage", json=GOOD["/v1/meter-usage"])).is_success
        # The REST routes read any body as JSON: the scope passed down is a copy.
        form = await client.post("/v1/meter-usage", data={"UsageDimension": "x"})
        assert form.status_code == 422
        assert (await client.get("/nowhere")).status_code == 404
        counted = _requests_by_route(application)
    assert counted[("/v1/usage-records/{record_id}", "GET", "404")] == 1
    assert counted[("/v1/meter-usage", "POST", "200")] == 1
    assert counted[("/v1/meter-usage", "POST", "422")] == 1
    assert counted[("unmatched", "GET", "404")] == 1


async def _chunks(size: int) -> AsyncIterator[bytes]:
    yield b'{"RegistrationToken": "'
    for _ in range(size // 65536 + 1):
        yield b"x" * 65536
    yield b'"}'


async def test_a_body_over_the_limit_without_a_length_is_413_in_each_routes_shape(
    tmp_path: Path,
) -> None:
    async with _running(tmp_path) as application, _client(application) as client:
        rest = await client.post("/v1/resolve-customer", content=_chunks(1024 * 1024))
        assert rest.status_code == 413
        assert rest.headers["content-type"] == "application/problem+json"
        assert rest.json()["code"] == "PayloadTooLarge"
        assert rest.json()["request_id"] == rest.headers["x-request-id"]
        wire = await client.post("/", content=_chunks(1024 * 1024), headers=WIRE_HEADERS)
        assert wire.status_code == 413
        assert wire.headers["x-amzn-errortype"].startswith("PayloadTooLarge")
        assert json.loads(wire.content)["__type"].startswith("PayloadTooLarge")
        counted = _requests_by_route(application)
    assert counted[("/v1/resolve-customer", "POST", "413")] == 1
    assert counted[("/", "POST", "413")] == 1


async def _call_with_disconnect(application: FastAPI, path: str) -> list[Message]:
    """Send a request whose client goes away after the first part of its body."""
    sent: list[Message] = []
    incoming: list[Message] = [
        {"type": "http.request", "body": b'{"UsageDimension": ', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    headers = [(b"host", b"sidecar"), (b"content-type", b"application/json")]
    if path == "/":
        headers += [(b"x-amz-target", WIRE_HEADERS["X-Amz-Target"].encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    await application(scope, receive, send)
    return sent


async def test_a_client_gone_mid_body_is_no_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with _running(tmp_path, access_log=True) as application:
        for path in ("/v1/meter-usage", "/"):
            caplog.clear()
            await _call_with_disconnect(application, path)
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors == [], path
            (line,) = [r for r in caplog.records if r.name == "app.access"]
            assert line.__dict__["status"] == 499, path
        counted = _requests_by_route(application)
    assert counted[("/v1/meter-usage", "POST", "499")] == 1
    assert counted[("/", "POST", "499")] == 1
