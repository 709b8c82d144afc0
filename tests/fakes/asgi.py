"""Minimal raw-ASGI plumbing shared by the fakes.

Raw ASGI rather than a framework so a fake controls every header and can break a
connection mid-response, which frameworks deliberately make hard.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = [
    "Message",
    "Receive",
    "Scope",
    "Send",
    "header",
    "headers_of",
    "read_body",
    "send_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def headers_of(scope: Scope) -> list[tuple[str, str]]:
    """Request headers as ``(lower-case name, value)`` pairs, repeats kept, in wire order."""
    raw: list[tuple[bytes, bytes]] = scope.get("headers", [])
    return [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in raw]


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """First value of header ``name`` (case-insensitive), or ``None``."""
    wanted = name.lower()
    for key, value in headers:
        if key == wanted:
            return value
    return None


async def read_body(receive: Receive) -> bytes:
    """Read the whole request body."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def send_response(
    send: Send, status: int, body: bytes, headers: list[tuple[str, str]]
) -> None:
    """Send a complete response with an exact ``Content-Length``."""
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw_headers.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
