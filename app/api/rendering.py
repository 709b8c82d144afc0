"""One JSON rendering for every answer the sidecar gives, with AWS's policy: a member
that has no value is left out, never sent as ``null``.

Two dialects of the same policy: the REST API (``/v1``, the probes, problem
documents) writes timestamps as RFC 3339 text through the models' own
serializers; the AWS wire protocol (``POST /``) writes them as epoch seconds,
as AWS JSON 1.1 does (``app.metering.protocol.encode``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response

from app.metering.protocol import CONTENT_TYPE, encode

JSON = "application/json"


def render(body: BaseModel) -> bytes:
    """``body`` as REST JSON: absent members left out, timestamps as RFC 3339 text."""
    return body.model_dump_json(exclude_none=True).encode()


def render_wire(body: BaseModel | Mapping[str, Any]) -> bytes:
    """``body`` as AWS JSON 1.1: absent members left out, timestamps as epoch seconds."""
    data = body.model_dump(exclude_none=True) if isinstance(body, BaseModel) else body
    return encode({key: value for key, value in data.items() if value is not None})


def json_response(
    body: BaseModel,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    media_type: str = JSON,
) -> Response:
    """A REST answer rendered by ``render``."""
    return Response(render(body), status_code=status, headers=headers, media_type=media_type)


def wire_response(
    body: BaseModel | Mapping[str, Any],
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An AWS wire-protocol answer rendered by ``render_wire``."""
    return Response(render_wire(body), status_code=status, headers=headers, media_type=CONTENT_TYPE)
