"""The queue never finalizes usage for a fault on our side, takes AWS's current windows
and full quantity range, and remembers IdempotencyKeys after their records are gone."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

import pytest

from app.metering.billing import SubmissionWindows
from app.metering.errors import RequestInvalid
from app.queue.records import Filters
from tests.queue.conftest import (
    START,
    Harness,
    QueueFake,
    StoreFactory,
    batch_record,
    queue_harness,
)


def _at(h: Harness, hours: float) -> str:
    """RFC 3339 text ``hours`` from the harness's now (negative: in the past)."""
    moment = h.clock.now + timedelta(hours=hours)
    return moment.isoformat().replace("+00:00", "Z")


def _problem(h: Harness) -> float:
    return sum(  # type: ignore[no-any-return]
        h.metrics.aws_problem.labels(cause)._value.get()
        for cause in ("credentials", "configuration", "throttling", "transient", "unknown")
    )


@pytest.mark.parametrize(
    "code", ["InvalidSignatureException", "ExpiredTokenException", "UnrecognizedClientException"]
)
async def test_credentials_refused_with_400_are_refreshed_and_the_usage_goes_out(
    stores: StoreFactory, queue_fake: QueueFake, code: str
) -> None:
    # Two requests a send: the refusal, and the resend with refreshed credentials.
    async with queue_harness(stores, queue_fake, send_attempts=2) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_at(h, -0.1), Quantity=4))
        queue_fake.metering.faults.auth_failure(1, code=code, status=400)
        h.clock.set(11, 10)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "accepted", view
        statuses = [r.status for r in queue_fake.metering.requests_for("BatchMeterUsage")]
        assert statuses == [400, 200]
        assert (await h.queue.grains(Filters(), None, 10)).Items[0].Status == "accepted"


async def test_an_access_denied_period_then_recovery_loses_no_usage(
    stores: StoreFactory, queue_fake: QueueFake, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        first = await h.submit(
            batch_record(Timestamp=_at(h, -0.2), Quantity=3),
            batch_record("444455556666", Timestamp=_at(h, -0.1), QuantityAsDecimal="1.5"),
        )
        queue_fake.metering.faults.auth_failure(10_000, code="AccessDeniedException", status=400)
        h.clock.set(11, 10)
        with caplog.at_level(logging.ERROR, logger="app"):
            for _ in range(6):
                await h.cycle()
                h.clock.advance(hours=1)
        refused = queue_fake.metering.requests_for("BatchMeterUsage")
        assert len(refused) >= 3
        assert all(r.error_code == "AccessDeniedException" for r in refused)
        for item in first.Accepted:
            view = await h.queue.record(item.Id)
            assert view is not None
            assert view.Grain is not None
            assert view.Status == "pending", view
            assert view.Grain.LastError is not None
            assert view.Grain.LastError.startswith("AccessDeniedException")
        # Loud: an error line, the gauge, and a sentence for /readyz.
        kept = [r for r in caplog.records if "usage kept for another attempt" in r.getMessage()]
        assert kept
        assert {(r.levelname, getattr(r, "code", None)) for r in kept} == {
            ("ERROR", "AccessDeniedException")
        }
        assert h.metrics.aws_problem.labels("configuration")._value.get() == 1
        fine, detail = h.backend.health.status()
        assert not fine
        assert "since" in detail
        assert "AccessDeniedException" in detail
        # The seller fixes the role; the next attempts go through.
        queue_fake.metering.faults.clear()
        for _ in range(4):
            await h.cycle()
            h.clock.advance(hours=1)
        for item in first.Accepted:
            view = await h.queue.record(item.Id)
            assert view is not None
            assert view.Status == "accepted", view
        records = {r.customer: r for r in queue_fake.metering.batch_records.values()}
        assert records["111122223333"].quantity == 3
        assert records["444455556666"].quantity == Decimal("1.5")
        assert h.backend.health.status()[0]
        assert _problem(h) == 0


async def test_credentials_refused_throughout_keep_the_usage_pending(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_at(h, -0.1)))
        queue_fake.metering.faults.auth_failure(10_000, code="InvalidClientTokenId", status=400)
        h.clock.set(11, 10)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Grain is not None
        assert view.Status == "pending"
        assert view.Grain.LastError is not None
        assert view.Grain.LastError.startswith("CredentialsRejected")
        assert "AWS has refused our credentials since" in h.backend.health.status()[1]
        assert h.metrics.aws_problem.labels("credentials")._value.get() == 1


async def test_unknown_codes_and_throttling_keep_the_usage(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_at(h, -0.1)))
        queue_fake.metering.faults.throttle(1, code="TooManyRequestsException", status=429)
        h.clock.set(11, 10)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "pending"
        queue_fake.metering.faults.server_error(1, status=418, code="BrandNewException")
        h.clock.advance(hours=1)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Grain is not None
        assert view.Status == "pending"
        assert view.Grain.LastError is not None
        assert view.Grain.LastError.startswith("BrandNewException")
        h.clock.advance(hours=1)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "accepted"


async def test_batch_usage_seven_hours_old_is_queued_and_sent(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(17, 30)
        receipt = await h.submit(batch_record(Timestamp=_at(h, -7), Quantity=2))
        (accepted,) = receipt.Accepted
        assert accepted.Hour == START.replace(hour=10)
        view = await h.queue.record(accepted.Id)
        assert view is not None
        assert view.Grain is not None
        # Its deadline is 24 hours after the event, not 6.
        assert view.Grain.SubmissionDeadline == START.replace(hour=10, minute=30) + timedelta(
            hours=24
        )
        await h.cycle()
        (call,) = h.sent()
        assert call["UsageRecords"][0]["Quantity"] == 2
        view = await h.queue.record(accepted.Id)
        assert view is not None
        assert view.Status == "accepted"


async def test_usage_in_the_last_minutes_of_its_window_is_refused_not_expired_untried(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, margin=300) as h:
        h.clock.set(12, 0)
        h.clock.advance(days=1)
        # 23 h 56 min old: 4 minutes left, less than the queue's 5-minute margin.
        with pytest.raises(RequestInvalid) as refused:
            await h.submit(batch_record(Timestamp=_at(h, -(23 + 56 / 60))))
        (error,) = refused.value.errors
        assert error.field == "UsageRecords[0].Timestamp"
        assert "too late for the queue" in error.message
        # 23 h 54 min old: inside the margin, so it is sent before it could expire.
        receipt = await h.submit(batch_record(Timestamp=_at(h, -(23 + 54 / 60)), Quantity=6))
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "accepted"
        assert view.Attempts == 1


async def test_a_changed_window_applies_to_grains_already_queued(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    old = SubmissionWindows(batch=timedelta(hours=6))
    async with queue_harness(stores, queue_fake, windows=old) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_at(h, -0.1)))
        record_id = receipt.Accepted[0].Id
        view = await h.queue.record(record_id)
        assert view is not None
        assert view.Grain is not None
        assert view.Grain.SubmissionDeadline == START.replace(hour=16, minute=24)
    async with queue_harness(stores, queue_fake) as h:
        view = await h.queue.record(record_id)
        assert view is not None
        assert view.Grain is not None
        assert view.Grain.SubmissionDeadline == START.replace(hour=10, minute=24) + timedelta(
            hours=24
        )
        # 7 hours later the grain is still sent, under the new window.
        h.clock.set(17, 30)
        await h.cycle()
        view = await h.queue.record(record_id)
        assert view is not None
        assert view.Status == "accepted"


async def test_grains_past_the_integer_range_are_sent_as_decimals(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        await h.submit(
            batch_record(Timestamp=_at(h, -0.2), QuantityAsDecimal="1500000000.25"),
            batch_record(Timestamp=_at(h, -0.1), QuantityAsDecimal="1500000000.25"),
            batch_record("444455556666", Timestamp=_at(h, -0.2), Quantity=2_000_000_000),
            batch_record("444455556666", Timestamp=_at(h, -0.1), Quantity=2_000_000_000),
        )
        h.clock.set(11, 10)
        await h.cycle()
        (call,) = h.sent()
        sent = {r["CustomerAWSAccountId"]: r for r in call["UsageRecords"]}
        assert sent["111122223333"]["QuantityAsDecimal"] == "3000000000.5"
        assert sent["444455556666"]["QuantityAsDecimal"] == "4000000000"
        assert "Quantity" not in sent["444455556666"]
        billed = {r.customer: r.quantity for r in queue_fake.metering.batch_records.values()}
        assert billed == {
            "111122223333": Decimal("3000000000.5"),
            "444455556666": Decimal(4_000_000_000),
        }


async def test_an_idempotency_key_protects_after_its_record_is_pruned(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(
        stores, queue_fake, retention=timedelta(hours=168), key_retention=timedelta(days=30)
    ) as h:
        h.clock.set(10, 30)
        # No Timestamp: a replay days later is stamped "now" again, and would count.
        record = batch_record(IdempotencyKey="job-42", Quantity=5)
        (first,) = (await h.submit(record)).Accepted
        h.clock.set(11, 10)
        await h.cycle()
        assert len(h.sent()) == 1
        h.clock.advance(days=8)
        await h.cycle()  # prunes what settled more than 168 hours ago
        assert await h.queue.record(first.Id) is None
        (replay,) = (await h.submit(record)).Accepted
        assert replay.Replayed is True
        assert replay.Id == first.Id
        assert replay.Status == "accepted"
        assert replay.GrainId == first.GrainId
        # Nothing new to send: the replay was not counted again.
        h.clock.advance(hours=2)
        await h.cycle()
        assert len(h.sent()) == 1
        assert (await h.queue.grains(Filters(), None, 10)).Items == []
        # Other content under the same key is still a conflict.
        with pytest.raises(Exception, match="job-42"):
            await h.submit(batch_record(IdempotencyKey="job-42", Quantity=6))
        # After METERING_QUEUE_IDEMPOTENCY_HOURS the key is forgotten, as documented.
        h.clock.advance(days=23)
        await h.cycle()
        (fresh,) = (await h.submit(record)).Accepted
        assert fresh.Replayed is False
        assert fresh.Id != first.Id
