"""AWS credentials from botocore's provider chain, refreshed off the event loop, ahead of expiry.

The request path only reads a snapshot (``current()``): it never calls
botocore, whose refresh takes a thread lock and may call STS, the container
endpoint or IMDS. A background task resolves the chain again in a thread
before the snapshot expires; a forced refresh does the same when AWS refuses
the credentials, coalesced so that a burst of refusals causes one refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import botocore.session
from botocore.credentials import ReadOnlyCredentials

from app.metering.billing import utc_now
from app.metering.errors import CredentialsUnavailable
from app.runtime.metrics import Metrics
from app.runtime.retry import Backoff
from app.runtime.supervisor import Spawn, plain_spawn

log = logging.getLogger("app.credentials")

# Static credentials (environment, profiles) have no expiry; look again this
# often in case a mounted file or profile changed.
STATIC_RECHECK_SECONDS = 300.0
# Never schedule refreshes closer together than this.
MIN_REFRESH_DELAY = 1.0
# While failing, back off to at most this.
MAX_RETRY_DELAY = 60.0


@dataclass(frozen=True, slots=True)
class ResolvedCredentials:
    """Credentials read once from the chain, with their expiry and botocore's method name."""

    frozen: ReadOnlyCredentials
    expiry: datetime | None
    method: str
    fetched_at: datetime


Resolver = Callable[[], ResolvedCredentials | None]


def resolve_from_chain() -> ResolvedCredentials | None:
    """Resolve botocore's default chain once, in full. Blocking: call it from a thread.

    A new session each time: it re-reads the environment and files, and
    fetches brand new temporary credentials from whichever provider applies
    (web identity, container, IMDS), which is exactly a forced refresh.
    """
    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        return None
    frozen = credentials.get_frozen_credentials()
    if not frozen.access_key or not frozen.secret_key:
        return None
    # botocore keeps the expiry of refreshable credentials in a private
    # attribute; static credentials have none.
    expiry = getattr(credentials, "_expiry_time", None)
    return ResolvedCredentials(
        frozen=frozen,
        expiry=expiry if isinstance(expiry, datetime) else None,
        method=str(getattr(credentials, "method", "unknown")),
        fetched_at=utc_now(),
    )


class CredentialProvider:
    """Holds the current credentials and keeps them fresh in the background."""

    def __init__(
        self,
        resolver: Resolver = resolve_from_chain,
        *,
        refresh_margin: float,
        retry_interval: float,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._resolver = resolver
        self._refresh_margin = refresh_margin
        self._retry_interval = retry_interval
        # The engine every retry loop shares; never sooner than MIN_REFRESH_DELAY.
        self._backoff = Backoff(
            retry_interval, max(retry_interval, MAX_RETRY_DELAY), floor=MIN_REFRESH_DELAY
        )
        self._metrics = metrics
        self._clock = clock
        self._current: ResolvedCredentials | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        if metrics is not None:
            metrics.watch_credential_expiry(self.seconds_until_expiry)

    async def start(self, spawn: Spawn = plain_spawn) -> None:
        """Resolve once (a failure is not fatal: readiness reports it) and start the
        refresh loop through ``spawn`` (the sidecar's supervisor)."""
        await self._refresh("initial")
        self._task = spawn("credential-refresh", self._refresh_loop())

    async def close(self) -> None:
        """Stop the background refresh."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def current(self) -> ReadOnlyCredentials:
        """The credentials to sign with now; never blocks, never refreshes."""
        resolved = self._current
        if resolved is None:
            raise CredentialsUnavailable(
                "no AWS credentials could be obtained from the provider chain"
                + (f" ({self._last_error})" if self._last_error else "")
            )
        if resolved.expiry is not None and resolved.expiry <= self._clock():
            raise CredentialsUnavailable(
                "the AWS credentials expired and could not be refreshed"
                + (f" ({self._last_error})" if self._last_error else "")
            )
        return resolved.frozen

    def status(self) -> tuple[bool, str]:
        """(ready, reason) for ``/readyz``."""
        try:
            self.current()
        except CredentialsUnavailable as exc:
            return False, exc.detail
        assert self._current is not None
        return True, f"credentials from {self._current.method}"

    def seconds_until_expiry(self) -> float:
        """Seconds until the held credentials expire; +inf without expiry, -1 with none."""
        resolved = self._current
        if resolved is None:
            return -1.0
        if resolved.expiry is None:
            return math.inf
        return (resolved.expiry - self._clock()).total_seconds()

    async def force_refresh(self, rejected: ReadOnlyCredentials) -> None:
        """AWS refused ``rejected``: resolve anew, unless another request already did."""
        async with self._lock:
            current = self._current
            if current is not None and current.frozen.access_key != rejected.access_key:
                return
            await self._refresh_locked("forced")

    async def _refresh(self, trigger: str) -> None:
        async with self._lock:
            await self._refresh_locked(trigger)

    async def _refresh_locked(self, trigger: str) -> None:
        try:
            resolved = await asyncio.to_thread(self._resolver)
        except Exception as exc:  # botocore raises many kinds; all mean "not now"
            self._failures += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._count(trigger, "error")
            log.warning(
                "credential refresh failed",
                extra={"trigger": trigger, "error": self._last_error},
            )
            return
        if resolved is None:
            self._failures += 1
            self._last_error = "no provider in the chain had credentials"
            self._count(trigger, "none")
            log.warning("no AWS credentials found", extra={"trigger": trigger})
            return
        changed = self._current is None or self._current.frozen != resolved.frozen
        self._current = resolved
        self._failures = 0
        self._last_error = None
        self._count(trigger, "success")
        if changed:
            log.info(
                "credentials obtained",
                extra={
                    "trigger": trigger,
                    "method": resolved.method,
                    "expires": resolved.expiry.isoformat() if resolved.expiry else None,
                },
            )

    def _count(self, trigger: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.credential_refreshes.labels(trigger, result).inc()

    def next_refresh_delay(self) -> float:
        """Seconds until the next background resolution should run."""
        resolved = self._current
        now = self._clock()
        if resolved is None or self._failures:
            # Back off while failing, but stay well inside the remaining lifetime.
            delay = self._backoff.delay(self._failures)
            if resolved is not None and resolved.expiry is not None:
                left = (resolved.expiry - now).total_seconds()
                delay = min(delay, max(left / 4, MIN_REFRESH_DELAY))
            return max(delay, MIN_REFRESH_DELAY)
        if resolved.expiry is None:
            return STATIC_RECHECK_SECONDS
        lifetime = (resolved.expiry - resolved.fetched_at).total_seconds()
        lead = min(self._refresh_margin, lifetime / 2)
        refresh_at: float = resolved.expiry.timestamp() - lead
        return max(float(refresh_at - now.timestamp()), MIN_REFRESH_DELAY)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.next_refresh_delay())
            await self._refresh("scheduled")
