"""What replicas on one shared store share beside the usage (app.queue.fleet): the
account's request quota, the database's clock, one set of grain rules."""

from __future__ import annotations

import itertools
import math
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from app.config import Settings
from app.queue.fleet import (
    SKEW_WARNING,
    Fleet,
    FleetSettingsConflict,
    fleet_values,
    write_settings,
)
from app.queue.postgres import PostgresStore
from app.queue.store import GrainPolicy
from app.runtime.metrics import Metrics

POLICY = GrainPolicy(grace=timedelta(minutes=5))


def _store(dsn: str, settings: Settings | None = None, **options: object) -> PostgresStore:
    return PostgresStore(
        dsn,
        POLICY,
        pool_size=2,
        statement_timeout=5,
        claim_lease=30,
        fleet_settings=fleet_values(settings or Settings()),
        **options,  # type: ignore[arg-type]
    )


async def test_slots_of_the_account_quota_fall_on_one_grid(postgres_dsn: str) -> None:
    store = _store(postgres_dsn)
    await store.open()
    fleet = Fleet(store)
    try:
        tats = []
        for _ in range(6):
            taken, wait = await fleet.quota.reserve("BatchMeterUsage", 5, max_wait=60)
            assert taken
            assert 0 <= wait <= 1.3
            with psycopg.connect(postgres_dsn) as conn:
                row = conn.execute("SELECT tat FROM fleet_quota").fetchone()
            assert row is not None
            tats.append(row[0])
        # One slot every fifth of a second, each at a tenth past a fifth (the grid,
        # offset by half an interval): five in every second of the database's clock.
        assert [round(b - a, 6) for a, b in itertools.pairwise(tats)] == [0.2] * 5
        for tat in tats:
            steps = (tat - 0.1) / 0.2
            assert math.isclose(steps, round(steps), abs_tol=1e-6)
        # A slot past the call's deadline is refused, says when one is free, and takes
        # nothing: the next call gets that very slot.
        taken, free_in = await fleet.quota.reserve("BatchMeterUsage", 5, max_wait=0.0)
        assert not taken
        assert free_in > 0.5
        taken, _ = await fleet.quota.reserve("BatchMeterUsage", 5, max_wait=60)
        assert taken
        with psycopg.connect(postgres_dsn) as conn:
            row = conn.execute("SELECT tat FROM fleet_quota").fetchone()
        assert row is not None
        assert round(row[0] - tats[-1], 6) == 0.2
        # Each action is a quota of its own.
        taken, wait = await fleet.quota.reserve("MeterUsage", 10, max_wait=60)
        assert taken
        assert wait <= 0.1 + 1e-6
    finally:
        await store.close()


async def test_the_database_clock_corrects_a_skewed_replica(postgres_dsn: str) -> None:
    store = _store(postgres_dsn)
    await store.open()
    metrics = Metrics()
    ahead = Fleet(store, lambda: datetime.now(UTC) + timedelta(hours=2), metrics=metrics)
    try:
        assert ahead.clock.status()[0]
        assert "not measured yet" in ahead.clock.status()[1]
        await ahead.measure()
        # The fleet's time is the database's, whatever this replica's clock says.
        assert abs((ahead.clock() - datetime.now(UTC)).total_seconds()) < 1
        assert ahead.clock.skew is not None
        assert abs(ahead.clock.skew - 7200) < 1
        assert abs(metrics.clock_skew._value.get() - 7200) < 1
        ok, detail = ahead.clock.status()
        assert not ok
        assert "s ahead of the shared store's" in detail
        assert f"more than {SKEW_WARNING:g} s" in detail
        # A replica a little behind: measured, harmless.
        behind = Fleet(store, lambda: datetime.now(UTC) - timedelta(seconds=3))
        await behind.measure()
        ok, detail = behind.clock.status()
        assert ok
        assert "behind the shared store's" in detail
    finally:
        await store.close()


async def test_the_fleet_counts_its_replicas_for_the_fallback(postgres_dsn: str) -> None:
    first, second = _store(postgres_dsn), _store(postgres_dsn)
    await first.open()
    await second.open()
    try:
        one, two = Fleet(first), Fleet(second)
        # Before any count: a safe figure.
        assert one.quota.fallback_divisor() == 4
        await one.measure()
        assert one.quota.members == 1
        await two.measure()
        assert two.quota.members == 2
        # The replicas counted, plus one starting meanwhile.
        assert two.quota.fallback_divisor() == 3
        assert Fleet(first, quota_divisor=7).quota.fallback_divisor() == 7
    finally:
        await first.close()
        await second.close()


async def test_the_first_replica_writes_the_grain_rules_and_the_others_must_match(
    postgres_dsn: str,
) -> None:
    first = _store(postgres_dsn, Settings(queue_grace=300, product_code="prod-a"))
    await first.open()
    await first.close()
    other = _store(postgres_dsn, Settings(queue_grace=60, product_code="prod-b"))
    with pytest.raises(FleetSettingsConflict) as refused:
        await other.open()
    message = str(refused.value)
    assert "METERING_QUEUE_GRACE is 60.0 here, 300.0 in the fleet" in message
    assert "METERING_PRODUCT_CODE is 'prod-b' here, 'prod-a' in the fleet" in message
    assert "python -m app fleet-settings --write" in message
    assert "METERING_BATCH_WINDOW_HOURS" not in message
    assert not other.is_open
    # The same settings again (300 and 300.0 are one value): it opens.
    same = _store(postgres_dsn, Settings(queue_grace=300.0, product_code="prod-a"))
    await same.open()

    # Changed for the whole fleet: the other one opens now, the first one would not.
    async def change(conn: object) -> None:
        await write_settings(
            conn, fleet_values(Settings(queue_grace=60, product_code="prod-b")), "admin"
        )

    await same.run_fleet(change)
    await same.close()
    await other.open()
    await other.close()
    with pytest.raises(FleetSettingsConflict):
        await first.open()
