"""When credentials are refreshed: ahead of expiry, never on the request path."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from botocore.credentials import ReadOnlyCredentials

from app.aws.credentials import STATIC_RECHECK_SECONDS, CredentialProvider, ResolvedCredentials
from app.metering.errors import CredentialsUnavailable

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _resolved(lifetime: float | None, key: str = "AKIA1") -> ResolvedCredentials:
    return ResolvedCredentials(
        frozen=ReadOnlyCredentials(key, "secret", "token"),
        expiry=NOW + timedelta(seconds=lifetime) if lifetime is not None else None,
        method="test",
        fetched_at=NOW,
    )


async def test_refresh_lead_is_margin_or_half_life() -> None:
    results = iter([_resolved(3600), _resolved(60)])
    provider = CredentialProvider(
        lambda: next(results), refresh_margin=900, retry_interval=5, clock=lambda: NOW
    )
    await provider.start()
    try:
        # An hour of life: refresh 15 minutes before expiry.
        assert provider.next_refresh_delay() == pytest.approx(2700)
        await provider._refresh("scheduled")
        # A minute of life: refresh at half-life.
        assert provider.next_refresh_delay() == pytest.approx(30)
    finally:
        await provider.close()


async def test_static_credentials_are_rechecked_slowly() -> None:
    provider = CredentialProvider(
        lambda: _resolved(None), refresh_margin=900, retry_interval=5, clock=lambda: NOW
    )
    await provider.start()
    try:
        assert provider.next_refresh_delay() == STATIC_RECHECK_SECONDS
        assert provider.seconds_until_expiry() == float("inf")
    finally:
        await provider.close()


async def test_failures_back_off_but_stay_inside_the_lifetime() -> None:
    calls = 0

    def flaky() -> ResolvedCredentials | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            return _resolved(40)
        raise RuntimeError("sts down")

    provider = CredentialProvider(flaky, refresh_margin=900, retry_interval=5, clock=lambda: NOW)
    await provider.start()
    try:
        for _ in range(5):
            await provider._refresh("scheduled")
        # 40 s left: retries come at least every 10 s, not after the 60 s cap.
        assert provider.next_refresh_delay() <= 10
        # The old credentials still serve while the refresh fails.
        assert provider.current().access_key == "AKIA1"
    finally:
        await provider.close()


async def test_resolution_runs_off_the_event_loop() -> None:
    threads: list[str] = []

    def resolver() -> ResolvedCredentials:
        threads.append(threading.current_thread().name)
        return _resolved(3600)

    provider = CredentialProvider(resolver, refresh_margin=900, retry_interval=5)
    await provider.start()
    try:
        assert threads
        assert threads[0] != threading.main_thread().name
    finally:
        await provider.close()


async def test_expired_credentials_are_not_used() -> None:
    clock = [NOW]
    provider = CredentialProvider(
        lambda: _resolved(60), refresh_margin=900, retry_interval=5, clock=lambda: clock[0]
    )
    await provider.start()
    try:
        assert provider.current().access_key == "AKIA1"
        clock[0] = NOW + timedelta(seconds=61)
        with pytest.raises(CredentialsUnavailable):
            provider.current()
        assert provider.status()[0] is False
    finally:
        await provider.close()


async def test_forced_refreshes_coalesce() -> None:
    keys = iter(["AKIA1", "AKIA2", "AKIA3"])
    provider = CredentialProvider(
        lambda: _resolved(3600, next(keys)),
        refresh_margin=900,
        retry_interval=5,
        clock=lambda: NOW,
    )
    await provider.start()
    try:
        rejected = provider.current()
        # Two requests saw the same key refused: one refresh between them.
        await provider.force_refresh(rejected)
        await provider.force_refresh(rejected)
        assert provider.current().access_key == "AKIA2"
    finally:
        await provider.close()
