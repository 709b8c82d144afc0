"""The one pooled HTTP client the sidecar sends through."""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport

from app import __version__
from app.config import Settings


def create_timeout(settings: Settings) -> httpx.Timeout:
    """Explicit timeouts for every phase of an attempt."""
    return httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        pool=settings.pool_timeout,
    )


def create_http_client(settings: Settings) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` over the configured transport; redirects off.

    ``aiohttp`` (the default) keeps httpx's API but not httpcore's per-request
    pool bookkeeping, which a profile found to be most of the CPU of a
    forward; ``benchmarks/forward.py`` measures both side by side.
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=30.0,
    )
    transport: httpx.AsyncBaseTransport
    if settings.http_transport == "aiohttp":
        transport = AiohttpTransport(limits=limits)
    else:
        transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
    return httpx.AsyncClient(
        transport=transport,
        timeout=create_timeout(settings),
        follow_redirects=False,
        headers={"User-Agent": f"metering-sidecar/{__version__}"},
    )
