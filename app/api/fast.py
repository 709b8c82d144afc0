"""The hot ``POST`` routes, served past FastAPI's per-request machinery.

FastAPI stays the definition of every route: its OpenAPI document, its
validation, its errors. For the routes here, the sidecar's middleware reads
the body, parses it as FastAPI would (``json.loads``, then the route's model)
and hands it to the route's own endpoint function; FastAPI's routing,
dependency solving and its three inner middlewares cost more than the rest of
the sidecar's work on such a call.

Only a request that is sure to succeed in parsing takes this path. A body that
is not JSON, that fails the model, or a sidecar not built yet (the operations
listener starting): the request goes to FastAPI with its body replayed, so every
error is FastAPI's own, word for word. Errors of the endpoint itself are
rendered by ``problem_response``, as the app's ``MeteringError`` handler does.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import queue, v1
from app.api.problems import problem_response
from app.metering.errors import MeteringError
from app.metering.models import (
    BatchMeterUsageRequest,
    MeterUsageRequest,
    RegisterUsageRequest,
    ResolveCustomerRequest,
)
from app.queue.models import UsageRecordsRequest
from app.state import Sidecar

# The endpoint, given the parsed body and the sidecar; None: let FastAPI answer.
Endpoint = Callable[[Any, Sidecar], Awaitable[Response | None]]


@dataclass(frozen=True, slots=True)
class FastRoute:
    """One route served here: its FastAPI route (for the metrics' template), its
    body model, and the call of its endpoint."""

    route: APIRoute
    model: type[BaseModel]
    endpoint: Endpoint

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: ASGIApp) -> None:
        """Answer the request, or pass it to ``app`` (FastAPI) with its body replayed."""
        body = await _read_body(receive)
        sidecar: Sidecar | None = getattr(scope["app"].state, "sidecar", None)
        parsed = None
        if sidecar is not None:
            try:
                parsed = self.model.model_validate(json.loads(body))
            except (ValueError, ValidationError, RecursionError):
                parsed = None
        response = None
        if parsed is not None and sidecar is not None:
            scope["route"] = self.route
            try:
                response = await self.endpoint(parsed, sidecar)
            except MeteringError as exc:
                response = problem_response(exc, scope["path"])
        if response is None:
            await app(scope, _replay(body, receive), send)
            return
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    # As Starlette's Request.body reads it.
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _submit_usage_records(body: UsageRecordsRequest, sidecar: Sidecar) -> Response | None:
    if sidecar.queue is None:
        return None
    return await queue.submit_usage_records(body, sidecar.queue)


def _route(path: str) -> APIRoute:
    for router in (v1.router, queue.router):
        for route in router.routes:
            if (
                isinstance(route, APIRoute)
                and route.path == path
                and "POST" in (route.methods or ())
            ):
                return route
    raise LookupError(f"no POST route {path}")


def fast_routes() -> dict[str, FastRoute]:
    """The routes served here, by path (``POST`` only)."""
    served: dict[str, tuple[type[BaseModel], Endpoint]] = {
        "/v1/meter-usage": (MeterUsageRequest, lambda b, s: v1.meter_usage(b, s.service)),
        "/v1/batch-meter-usage": (
            BatchMeterUsageRequest,
            lambda b, s: v1.batch_meter_usage(b, s.service),
        ),
        "/v1/resolve-customer": (
            ResolveCustomerRequest,
            lambda b, s: v1.resolve_customer(b, s.service),
        ),
        "/v1/register-usage": (
            RegisterUsageRequest,
            lambda b, s: v1.register_usage(b, s.service),
        ),
        "/v1/usage-records": (UsageRecordsRequest, _submit_usage_records),
    }
    return {
        path: FastRoute(_route(path), model, endpoint) for path, (model, endpoint) in served.items()
    }
