"""The hot POST routes past FastAPI's per-request machinery (app.api.fast): taken when
the body parses, and answering exactly as FastAPI does whatever the body."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastapi.routing
import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

import app.main
from app.api.fast import fast_routes
from app.config import Settings
from app.main import create_app

NOW = datetime.now(UTC).isoformat()
RECORD = {"Timestamp": NOW, "CustomerAWSAccountId": "123456789012", "Dimension": "users"}
GOOD: dict[str, Any] = {
    "/v1/meter-usage": {"UsageDimension": "users", "UsageQuantity": 2},
    "/v1/batch-meter-usage": {"UsageRecords": [{**RECORD, "Quantity": 1}]},
    "/v1/resolve-customer": {"RegistrationToken": "sandbox-token"},
    "/v1/register-usage": {"Nonce": "n-1"},
    "/v1/usage-records": {"UsageRecords": [{**RECORD, "Quantity": 3}]},
}
# Bodies FastAPI refuses, each in its own way.
BAD: list[bytes] = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"text"',
    b"NaN",
    b"\xff\xfe",
    b"[" * 5000 + b"]" * 5000,
    b'{"UsageDimension": 5}',
    b'{"UsageDimension": "d", "UsageQuantity": -1}',
    b'{"UsageDimension": "d", "Unknown": 1}',
    b'{"UsageRecords": [{"Dimension": "d"}], "AcceptPartial": "yes"}',
    b'{"UsageRecords": []}',
    b'{"RegistrationToken": ""}',
    b'{"PublicKeyVersion": 0}',
    b'{"UsageDimension": "d", "UsageQuantity": 1e999}',
    b'{"UsageDimension": "d", "Timestamp": "yesterday"}',
]


@asynccontextmanager
async def _client(tmp_path: Path, name: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        mode="sandbox",
        product_code="prod-fast",
        queue_path=tmp_path / f"{name}.sqlite3",
        access_log=False,
    )
    application: FastAPI = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            yield client


def _comparable(response: httpx.Response) -> tuple[int, str, Any]:
    body: Any = response.json() if response.content else None
    if isinstance(body, dict):
        body.pop("request_id", None)
        if response.status_code < 400:
            # Sandbox ids and receipts differ from call to call: compare the shape.
            body = sorted(body)
    return response.status_code, response.headers.get("content-type", ""), body


def test_every_fast_route_is_a_fastapi_post_route_with_the_same_body_model() -> None:
    for path, fast in fast_routes().items():
        assert isinstance(fast.route, APIRoute)
        assert fast.route.path == path
        assert "POST" in (fast.route.methods or ())
        (body,) = fast.route.dependant.body_params
        assert body.field_info.annotation is fast.model, path
    assert set(fast_routes()) == set(GOOD)


async def test_a_body_that_parses_skips_fastapi_and_a_bad_one_goes_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    solved: list[str] = []
    solve = fastapi.routing.solve_dependencies  # type: ignore[attr-defined]

    async def counting(*args: Any, **kwargs: Any) -> Any:
        solved.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    entered: list[str] = []
    framework = FastAPI.__call__

    async def entering(self: FastAPI, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            entered.append(scope["path"])
        await framework(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", entering)
    async with _client(tmp_path, "fast") as client:
        for path, body in GOOD.items():
            response = await client.post(path, json=body)
            assert response.status_code in (200, 202), (path, response.text)
            assert response.headers["x-metering-sandbox"] == "true"
            assert response.headers["x-request-id"]
        # Neither FastAPI's request handling nor its and Starlette's layers.
        assert solved == []
        assert entered == []
        refused = await client.post("/v1/meter-usage", content=b'{"UsageQuantity": 1}')
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["field"] == "UsageDimension"
        assert solved == ["/v1/meter-usage"]
        assert entered == ["/v1/meter-usage"]


async def test_answers_are_fastapis_own_for_every_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _client(tmp_path, "fast") as client:
        fast = [
            _comparable(await client.post(path, content=body))
            for path in GOOD
            for body in [*BAD, json.dumps(GOOD[path]).encode()]
        ]
    monkeypatch.setattr(app.main, "fast_routes", dict)
    async with _client(tmp_path, "plain") as client:
        plain = [
            _comparable(await client.post(path, content=body))
            for path in GOOD
            for body in [*BAD, json.dumps(GOOD[path]).encode()]
        ]
    assert fast == plain
    statuses = {status for status, _, _ in plain}
    assert {200, 202, 422} <= statuses
