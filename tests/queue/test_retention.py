"""A settled grain is kept while late usage of its hour may still arrive, whatever the
retention says: the late record rolls forward instead of opening a second grain for an
hour AWS has billed already (a DuplicateRecord, lost usage)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from app.config import Settings
from tests.queue.conftest import Harness, QueueFake, StoreFactory, batch_record, queue_harness


async def test_late_usage_after_a_short_retention_rolls_forward(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, retention=timedelta(hours=1)) as h:
        h.clock.set(10, 30)
        await h.submit(batch_record(Quantity=5, Timestamp="2026-11-26T10:20:00Z"))
        h.clock.set(11, 10)
        await h.cycle()
        assert len(h.sent()) == 1
        # Two hours after it settled: past the retention, still inside AWS's window.
        h.clock.set(13, 30)
        await h.cycle()
        (late,) = (
            await h.submit(batch_record(Quantity=2, Timestamp="2026-11-26T10:45:00Z"))
        ).Accepted
        assert late.RolledForward is True
        await h.cycle()
        assert queue_fake.metering.requests_for("BatchMeterUsage")
        record = await h.queue.record(late.Id)
        assert record is not None
        assert record.Status == "accepted", record
        assert 'reason="DuplicateRecord"' not in _metrics(h)


def _metrics(h: Harness) -> str:
    return generate_latest(h.metrics.registry).decode()


def test_a_retention_shorter_than_late_usage_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(queue_retention_hours=12)
    message = str(refused.value)
    assert "queue_retention_hours (12) must be at least 25.08" in message
    assert "DuplicateRecord" in message
    # Container mode's window is MeterUsage's 6 hours.
    assert Settings(queue_mode="container", queue_retention_hours=7.1).queue_retention_hours == 7.1
    with pytest.raises(ValidationError, match=r"must be at least 7\.083"):
        Settings(queue_mode="container", queue_retention_hours=7)
