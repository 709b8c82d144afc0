"""The one pooled HTTP transport the sidecar sends through, with httpx's API."""

from __future__ import annotations

import httpx

from app.aws.http11 import Http11Transport
from app.config import Settings


def create_timeout(settings: Settings) -> httpx.Timeout:
    """Explicit timeouts for every phase of an attempt."""
    return httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        pool=settings.pool_timeout,
    )


def create_transport(settings: Settings) -> httpx.AsyncBaseTransport:
    """The pooled transport under httpx's request and response models; redirects are
    never followed (a transport sends one request and returns its answer).

    ``http11`` (the default, ``app.aws.http11``) and ``aiohttp`` keep httpx's
    API but not httpcore's per-request pool bookkeeping, which a profile found
    to be most of the CPU of a forward; ``benchmarks/forward.py`` measures the
    three side by side. The backend
    hands the transport a built ``httpx.Request`` itself: ``AsyncClient``'s
    layers (default headers, cookies, auth and redirect flows) add cost to
    every request and nothing the sidecar uses.
    """
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=30.0,
    )
    if settings.http_transport == "http11":
        return Http11Transport(limits)
    if settings.http_transport == "aiohttp":
        # Imported only when chosen: aiohttp alone is about 9 MB of every process.
        from httpx_aiohttp import AiohttpTransport

        return AiohttpTransport(limits=limits)
    return httpx.AsyncHTTPTransport(limits=limits, retries=0)
