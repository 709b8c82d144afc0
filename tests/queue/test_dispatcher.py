"""The queue's rules, end to end in-process: sums per grain, sent once, outcomes recorded."""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

import pytest

from app.queue.records import Filters
from tests.conftest import PRODUCT
from tests.queue.conftest import (
    LICENSE,
    START,
    QueueFake,
    StoreFactory,
    batch_record,
    queue_harness,
)


def _ts(clock_now: object, minute: int, hour: int = 10) -> str:
    return f"2026-11-26T{hour:02d}:{minute:02d}:00Z"


async def test_usage_is_summed_per_grain_and_sent_once_after_the_hour(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 50)
        receipt = await h.submit(
            batch_record(Timestamp=_ts(h, 5), Quantity=2),
            batch_record(Timestamp=_ts(h, 20), Quantity=3),
            batch_record(Timestamp=_ts(h, 49), Quantity=4),
            batch_record("444455556666", Timestamp=_ts(h, 30), QuantityAsDecimal="1.25"),
        )
        grain_ids = {r.GrainId for r in receipt.Accepted}
        assert len(grain_ids) == 2
        # The hour is still open: nothing goes out.
        await h.cycle()
        assert h.sent() == []
        # Closed, but within the grace for late events: still nothing.
        h.clock.set(11, 4)
        await h.cycle()
        assert h.sent() == []
        h.clock.set(11, 5, 1)
        await h.cycle()
        (call,) = h.sent()
        records = {r["CustomerAWSAccountId"]: r for r in call["UsageRecords"]}
        assert records["111122223333"]["Quantity"] == 9
        assert records["444455556666"]["QuantityAsDecimal"] == "1.25"
        assert "ProductCode" not in call  # LicenseArn records never carry it
        # Nothing more to send, however often the loop runs.
        h.clock.set(12, 30)
        await h.cycle()
        assert len(h.sent()) == 1
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Grain is not None
        assert view.Status == "accepted"
        fake_records = queue_fake.metering.batch_records
        assert view.MeteringRecordId in {r.metering_record_id for r in fake_records.values()}
        assert view.Grain.Quantity == "9"
        # Received when the queue's clock said so, like everything else it records.
        assert view.ReceivedAt == h.clock.now.replace(hour=10, minute=50)
        assert view.Grain.Records == 3


async def test_late_usage_rolls_forward_into_the_next_open_hour(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        await h.submit(batch_record(Timestamp=_ts(h, 10), Quantity=5))
        h.clock.set(11, 10)
        await h.cycle()
        assert len(h.sent()) == 1
        late = await h.submit(batch_record(Timestamp=_ts(h, 59), Quantity=7))
        (receipt,) = late.Accepted
        assert receipt.RolledForward is True
        assert receipt.Hour.hour == 11
        view = await h.queue.record(receipt.Id)
        assert view is not None
        assert view.RolledForward is True
        assert view.OriginalHour.hour == 10
        h.clock.set(12, 6)
        await h.cycle()
        calls = h.sent()
        assert len(calls) == 2
        assert calls[1]["UsageRecords"][0]["Quantity"] == 7
        # Both hours were billed, each once: nothing lost, nothing refused.
        statuses = [r.metering_record_id for r in queue_fake.metering.batch_records.values()]
        assert len(statuses) == 2


async def test_retries_resend_byte_identical_records(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        await h.submit(batch_record(Timestamp=_ts(h, 10), QuantityAsDecimal="2.50"))
        queue_fake.metering.faults.throttle(1)
        h.clock.set(11, 10)
        await h.cycle()
        assert h.sent() == []
        # Usage arriving meanwhile must not change what was frozen.
        await h.submit(batch_record(Timestamp=_ts(h, 40), Quantity=1))
        h.clock.advance(minutes=5)
        await h.cycle()
        bodies = [r.json() for r in queue_fake.metering.requests_for("BatchMeterUsage")]
        assert len(bodies) == 2
        first_attempt, second_attempt = bodies
        assert first_attempt["UsageRecords"][0] == second_attempt["UsageRecords"][0]
        assert second_attempt["UsageRecords"][0]["QuantityAsDecimal"] == "2.5"


async def test_unsent_usage_expires_at_the_submission_deadline(
    stores: StoreFactory, queue_fake: QueueFake, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_ts(h, 20), Quantity=1))
        queue_fake.metering.faults.throttle(10_000)
        h.clock.set(11, 10)
        for _ in range(25):
            await h.cycle()
            h.clock.advance(hours=1)
        # 10:20 + 24 h (BatchMeterUsage's window) has passed.
        assert h.clock.now >= START.replace(hour=10, minute=20) + timedelta(hours=24)
        with caplog.at_level(logging.ERROR, logger="app.queue"):
            await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "expired"
        assert view.Reason == "SubmissionWindowPassed"
        assert view.Attempts >= 5
        assert "usage expired" in caplog.text
        sample = h.metrics.queue_outcomes.labels("expired", "SubmissionWindowPassed")
        assert sample._value.get() == 1


async def test_a_call_refused_for_one_record_is_bisected(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    queue_fake.metering.dimensions = {"users"}
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        records = [
            batch_record(
                f"1111222233{i:02d}", LicenseArn=None, Dimension="users", Timestamp=_ts(h, 1)
            )
            for i in range(6)
        ]
        records[4]["Dimension"] = "no-such-dimension"
        receipt = await h.submit(*records)
        h.clock.set(11, 10)
        await h.cycle()
        statuses = {}
        for accepted in receipt.Accepted:
            view = await h.queue.record(accepted.Id)
            assert view is not None
            statuses[accepted.Index] = (view.Status, view.Reason)
        assert statuses[4] == ("rejected", "InvalidUsageDimensionException")
        assert {i: s for i, s in statuses.items() if i != 4} == dict.fromkeys(
            (0, 1, 2, 3, 5), ("accepted", "Success")
        )
        assert len(queue_fake.metering.batch_records) == 5
        # Each successful call carried the request-level ProductCode.
        assert all(call["ProductCode"] == PRODUCT for call in h.sent())


async def test_duplicate_record_is_rejected_loudly(
    stores: StoreFactory, queue_fake: QueueFake, caplog: pytest.LogCaptureFixture
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        # Another sender (another replica, an old integration) already metered
        # this customer's hour with another quantity.
        other = await h.submit(batch_record(Timestamp=_ts(h, 10), Quantity=1, Dimension="x"))
        assert other.Accepted
        h.clock.set(11, 10)
        await h.cycle()
        assert len(h.sent()) == 1
    async with queue_harness(stores, queue_fake, name="replica-2") as h2:
        h2.clock.set(11, 20)
        receipt = await h2.submit(batch_record(Timestamp=_ts(h2, 15), Quantity=2, Dimension="x"))
        h2.clock.set(11, 30)
        with caplog.at_level(logging.ERROR, logger="app.queue"):
            await h2.cycle()
        view = await h2.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert view.Status == "rejected"
        assert view.Reason == "DuplicateRecord"
        assert "another sender metered it first" in caplog.text
        sample = h2.metrics.queue_outcomes.labels("duplicate_record", "DuplicateRecord")
        assert sample._value.get() == 1


async def test_unsubscribed_customer_is_rejected(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    queue_fake.metering.unsubscribed_customers.add("999999999999")
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(
            batch_record("999999999999", Timestamp=_ts(h, 1)),
            batch_record("111111111111", Timestamp=_ts(h, 1)),
        )
        h.clock.set(11, 10)
        await h.cycle()
        views = [await h.queue.record(r.Id) for r in receipt.Accepted]
        assert [(v.Status, v.Reason) for v in views if v] == [
            ("rejected", "CustomerNotSubscribed"),
            ("accepted", "Success"),
        ]


async def test_unprocessed_records_are_sent_again(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(
            batch_record("111111111111", Timestamp=_ts(h, 1)),
            batch_record("222222222222", Timestamp=_ts(h, 1)),
        )
        queue_fake.metering.faults.unprocessed(1)
        h.clock.set(11, 10)
        await h.cycle()
        views = [await h.queue.record(r.Id) for r in receipt.Accepted]
        assert sorted(v.Status for v in views if v) == ["accepted", "pending"]
        h.clock.advance(minutes=15)
        await h.cycle()
        views = [await h.queue.record(r.Id) for r in receipt.Accepted]
        assert [v.Status for v in views if v] == ["accepted", "accepted"]
        assert len(queue_fake.metering.batch_records) == 2


async def test_timestamp_out_of_bounds_expires_the_grain(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    queue_fake.metering.batch_window = timedelta(minutes=30)
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        receipt = await h.submit(batch_record(Timestamp=_ts(h, 10)))
        h.clock.set(11, 10)
        await h.cycle()
        view = await h.queue.record(receipt.Accepted[0].Id)
        assert view is not None
        assert (view.Status, view.Reason) == ("expired", "TimestampOutOfBoundsException")


async def test_container_mode_meters_each_grain_with_its_client_token(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, mode="container") as h:
        h.clock.set(10, 30)
        await h.submit(
            {"Dimension": "vcpu-hours", "Quantity": 2, "Timestamp": _ts(h, 5)},
            {"Dimension": "vcpu-hours", "Quantity": 3, "Timestamp": _ts(h, 25)},
            {
                "Dimension": "gb",
                "QuantityAsDecimal": "0.5",
                "Timestamp": _ts(h, 25),
                "UsageAllocations": [
                    {
                        "AllocatedUsageQuantityAsDecimal": "0.5",
                        "Tags": [{"Key": "team", "Value": "a"}],
                    }
                ],
            },
        )
        queue_fake.metering.faults.server_error(1)
        h.clock.set(11, 10)
        await h.cycle()
        h.clock.advance(minutes=10)
        await h.cycle()
        calls = h.sent("MeterUsage")
        assert len(calls) == 2
        by_dimension = {c["UsageDimension"]: c for c in calls}
        assert by_dimension["vcpu-hours"]["UsageQuantity"] == 5
        assert by_dimension["gb"]["UsageAllocations"][0]["AllocatedUsageQuantityAsDecimal"] == "0.5"
        attempts = queue_fake.metering.requests_for("MeterUsage")
        # The retried grain went out with the same ClientToken as its first attempt.
        tokens: dict[str, set[str]] = {}
        for attempt in attempts:
            body = attempt.json()
            tokens.setdefault(body["UsageDimension"], set()).add(body["ClientToken"])
        assert all(len(t) == 1 for t in tokens.values())


async def test_container_stop_sends_the_partial_hour(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, mode="container") as h:
        h.clock.set(10, 30)
        await h.submit({"Dimension": "vcpu-hours", "Quantity": 4, "Timestamp": _ts(h, 29)})
        await h.dispatcher.stop(budget=10)
        (call,) = h.sent("MeterUsage")
        assert call["UsageQuantity"] == 4
        grains = await h.queue.grains(_filters(), None, 10)
        assert [g.Status for g in grains.Items] == ["accepted"]


async def test_saas_stop_does_not_send_the_partial_hour(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 30)
        await h.submit(batch_record(Timestamp=_ts(h, 29)))
        await h.dispatcher.stop(budget=10)
        assert h.sent() == []
        grains = await h.queue.grains(_filters(), None, 10)
        assert [g.Status for g in grains.Items] == ["open"]


def _filters() -> Filters:
    return Filters()


def test_sums_are_exact_decimals() -> None:
    # 0.1 + 0.2 is 0.3 here, not 0.30000000000000004.
    from app.metering.grains import GrainContent, GrainKey, Usage, add_usage
    from tests.queue.conftest import START

    key = GrainKey("batch", "", LICENSE, "", "1", "d", START)
    content = GrainContent()
    for amount in ("0.1", "0.2"):
        content = add_usage(content, Usage(key, START, Decimal(amount), True))
    assert content.quantity == Decimal("0.3")


async def test_container_stop_keeps_sending_the_partial_hour_until_it_is_taken(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    # AWS fails the first attempts (each send makes one here): one round would lose it.
    queue_fake.metering.faults.server_error(5, action="MeterUsage")
    async with queue_harness(stores, queue_fake, mode="container") as h:
        h.clock.set(10, 30)
        await h.submit({"Dimension": "vcpu-hours", "Quantity": 4, "Timestamp": _ts(h, 29)})
        await h.dispatcher.stop(budget=10)
        assert len(queue_fake.metering.requests_for("MeterUsage")) == 6
        (call,) = h.sent("MeterUsage")
        assert call["UsageQuantity"] == 4
        grains = await h.queue.grains(_filters(), None, 10)
        assert [g.Status for g in grains.Items] == ["accepted"]


async def test_container_stop_names_what_it_could_not_send(
    stores: StoreFactory, queue_fake: QueueFake, caplog: pytest.LogCaptureFixture
) -> None:
    queue_fake.metering.faults.server_error(10_000, action="MeterUsage")
    async with queue_harness(stores, queue_fake, mode="container") as h:
        h.clock.set(10, 30)
        await h.submit({"Dimension": "vcpu-hours", "Quantity": 4, "Timestamp": _ts(h, 29)})
        await h.submit(
            {"Dimension": "gpu-hours", "QuantityAsDecimal": "2.5", "Timestamp": _ts(h, 9)}
        )
        with caplog.at_level(logging.ERROR, logger="app.queue"):
            await h.dispatcher.stop(budget=1.5)
    # Tried again and again until the deadline, not once.
    assert len(queue_fake.metering.requests_for("MeterUsage")) > 4
    (line,) = [r for r in caplog.records if "partial hour not fully sent" in r.getMessage()]
    assert line.levelno == logging.ERROR
    assert "2 grains not sent" in line.getMessage()
    named = {(g["dimension"], g["quantity"]) for g in line.grains}  # type: ignore[attr-defined]
    assert named == {("vcpu-hours", "4"), ("gpu-hours", "2.5")}
