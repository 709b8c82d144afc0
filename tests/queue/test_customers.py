"""The customer registry in the queue's store (SQLite and PostgreSQL): subscription events
applied once, a leaving customer's final usage sent when its grace passes, later usage
refused, and one form per customer, dimension and hour."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.metering.billing import hour_of
from app.metering.errors import CustomerFormConflict, CustomerSubscriptionEnded
from app.metering.grains import GrainKey, Usage
from app.metering.shapes import ResolveCustomerResult, format_timestamp
from app.metering.subscriptions import SubscriptionEvent, parse_event
from app.queue import queries, registry
from app.queue.records import Filters
from app.queue.registry import Identity
from app.queue.sqlite import SqliteStore, _run_script
from app.queue.store import GrainPolicy, Intake
from tests.conftest import PRODUCT
from tests.pg import PgServer
from tests.queue.conftest import (
    LICENSE,
    START,
    Harness,
    QueueFake,
    StoreFactory,
    batch_record,
    queue_harness,
)

GRACE = 60
ACCOUNT = "111122223333"
OTHER_LICENSE = "arn:aws:license-manager::444455556666:license:l-fedcba9876543210"


def sns(
    action: str, customer: str, at: datetime | None, *, message_id: str = ""
) -> SubscriptionEvent:
    """An SNS notification in its envelope, as SQS delivers it."""
    envelope: dict[str, Any] = {
        "Type": "Notification",
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": "arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-x",
        "Message": json.dumps(
            {"action": action, "customer-identifier": customer, "product-code": PRODUCT}
        ),
    }
    if at is not None:
        envelope["Timestamp"] = format_timestamp(at)
    return parse_event(json.dumps(envelope))


def eventbridge(
    detail_type: str,
    account: str,
    at: datetime,
    *,
    license_arn: str = LICENSE,
    event_id: str = "",
) -> SubscriptionEvent:
    """An EventBridge event from aws.agreement-marketplace."""
    body = {
        "version": "0",
        "id": event_id or str(uuid.uuid4()),
        "detail-type": detail_type,
        "source": "aws.agreement-marketplace",
        "account": "999988887777",
        "time": format_timestamp(at),
        "region": "us-east-1",
        "resources": [],
        "detail": {
            "agreement": {"id": "agmt-1234567890abcdef"},
            "product": {"code": PRODUCT},
            "license": {"arn": license_arn},
            "acceptor": {"accountId": account},
        },
    }
    return parse_event(json.dumps(body))


def ident(customer: str, quantity: int, **fields: Any) -> dict[str, Any]:
    """A queued record under the CustomerIdentifier form (the configured product)."""
    return {
        "CustomerIdentifier": customer,
        "Dimension": "gigabytes",
        "Quantity": quantity,
        **fields,
    }


def answer(identifier: str, account: str, license_arn: str = LICENSE) -> ResolveCustomerResult:
    """A ResolveCustomer answer that ties both forms of one customer."""
    return ResolveCustomerResult.model_validate(
        {
            "CustomerIdentifier": identifier,
            "CustomerAWSAccountId": account,
            "ProductCode": PRODUCT,
            "LicenseArn": license_arn,
            "Metadata": {"AgreementId": "agmt-0123456789abcdef"},
        }
    )


def sent_records(h: Harness) -> list[dict[str, Any]]:
    """Every record the fake took in a BatchMeterUsage call."""
    return [record for call in h.sent() for record in call["UsageRecords"]]


def refusals(h: Harness, reason: str) -> float:
    value = h.metrics.registry.get_sample_value("metering_usage_refusals_total", {"reason": reason})
    return value or 0.0


def customers_gauge(h: Harness, status: str) -> float | None:
    return h.metrics.registry.get_sample_value("metering_customers", {"status": status})


async def only_customer(h: Harness, customer: str) -> Any:
    page = await h.queue.customers(None, customer, None, 10)
    assert len(page.Items) == 1, page
    view = await h.queue.customer(page.Items[0].Id)
    assert view is not None
    return view


async def test_sns_unsubscribe_pending_sends_the_partial_hour_when_the_grace_ends(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        await h.submit(ident("cust-a", 2), ident("cust-a", 3), ident("cust-b", 5))
        await h.submit(batch_record(ACCOUNT, Quantity=4))
        pending = sns("unsubscribe-pending", "cust-a", h.clock.now)
        assert await h.queue.apply_event(pending) == "applied"
        # The dispatcher wakes up when the grace ends, not at the next hour.
        assert await h.store.next_wakeup() == h.clock.now + timedelta(seconds=GRACE)
        await h.cycle()
        assert h.sent() == []
        assert customers_gauge(h, "ending") == 1
        # Within the grace, usage is still taken.
        h.clock.advance(seconds=30)
        await h.submit(ident("cust-a", 1))
        await h.cycle()
        assert h.sent() == []

        h.clock.advance(seconds=31)
        await h.cycle()
        # The leaving customer's partial hour went out, with the exact sum, and
        # nobody else's open hour did.
        (call,) = h.sent()
        assert call["ProductCode"] == PRODUCT
        (record,) = call["UsageRecords"]
        assert record["CustomerIdentifier"] == "cust-a"
        assert record["Quantity"] == 6
        assert record["Dimension"] == "gigabytes"
        still_open = await h.queue.grains(Filters(status="open"), None, 10)
        assert sorted(
            g.CustomerIdentifier or g.CustomerAWSAccountId or "" for g in still_open.Items
        ) == [
            ACCOUNT,
            "cust-b",
        ]
        (sent,) = (await h.queue.grains(Filters(customer="cust-a"), None, 10)).Items
        assert sent.Status == "accepted"
        assert sent.Hour == START.replace(hour=10)

        # Later usage is refused, loudly: nothing rolls into an hour never sent.
        with pytest.raises(CustomerSubscriptionEnded) as refused:
            await h.submit(ident("cust-a", 1))
        detail = refused.value.detail
        assert "UsageRecords[0]: CustomerIdentifier cust-a + ProductCode" in detail
        grace_end = h.clock.now - timedelta(seconds=61) + timedelta(seconds=GRACE)
        assert f"since {format_timestamp(grace_end)}" in detail
        assert refused.value.status == 409
        assert refused.value.retryable is False
        partial = await h.submit(ident("cust-a", 1), ident("cust-b", 1), accept_partial=True)
        assert [r.Index for r in partial.Accepted] == [1]
        (rejected,) = partial.Rejected
        assert rejected.Index == 0
        assert rejected.Reason == "CustomerSubscriptionEnded"
        assert refusals(h, "CustomerSubscriptionEnded") == 2
        view = await only_customer(h, "cust-a")
        assert view.Status == "ending"
        assert view.UsageAccepted is False
        assert view.GraceEndsAt == grace_end
        assert view.FinalUsageSentAt == grace_end + timedelta(seconds=1)
        assert [(e.Type, e.Kind) for e in view.Events] == [("unsubscribe-pending", "ending")]
        await h.cycle()
        assert len(h.sent()) == 1


async def test_eventbridge_ending_events_whichever_comes_first_opens_the_final_hour(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        await h.submit(
            batch_record(ACCOUNT, QuantityAsDecimal="1.25"),
            batch_record(ACCOUNT, QuantityAsDecimal="2.5"),
            batch_record("444455556666", LicenseArn=OTHER_LICENSE, Quantity=9),
        )
        ended = eventbridge("Purchase Agreement Ended - Manufacturer", ACCOUNT, h.clock.now)
        assert await h.queue.apply_event(ended) == "applied"
        h.clock.advance(seconds=40)
        # AWS's examples sometimes leave "arn:" out: licenses compare on their l- id.
        deprovisioned = eventbridge(
            "License Deprovisioned - Manufacturer",
            ACCOUNT,
            h.clock.now,
            license_arn=LICENSE.removeprefix("arn:"),
        )
        assert await h.queue.apply_event(deprovisioned) == "applied"
        view = await only_customer(h, ACCOUNT)
        # The second ending event does not move the end later.
        assert view.EndingSince == ended.time
        assert view.GraceEndsAt == START.replace(hour=10, minute=20) + timedelta(seconds=GRACE)
        assert view.LicenseArn == LICENSE
        assert view.AgreementId == "agmt-1234567890abcdef"
        h.clock.advance(seconds=19)
        await h.cycle()
        assert h.sent() == []
        h.clock.advance(seconds=2)
        await h.cycle()
        (record,) = sent_records(h)
        assert record["CustomerAWSAccountId"] == ACCOUNT
        assert record["LicenseArn"] == LICENSE
        assert record["QuantityAsDecimal"] == "3.75"
        with pytest.raises(CustomerSubscriptionEnded):
            await h.submit(batch_record(ACCOUNT))
        # The other account, another license: its hour waits for its end.
        await h.submit(batch_record("444455556666", LicenseArn=OTHER_LICENSE))
        view = await only_customer(h, ACCOUNT)
        assert [e.Type for e in view.Events] == [
            "Purchase Agreement Ended - Manufacturer",
            "License Deprovisioned - Manufacturer",
        ]


async def test_the_same_event_applied_twice_changes_nothing(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        pending = sns("unsubscribe-pending", "cust-d", h.clock.now, message_id="m-1")
        assert await h.queue.apply_event(pending) == "applied"
        before = await only_customer(h, "cust-d")
        h.clock.advance(seconds=10)
        assert await h.queue.apply_event(pending) == "duplicate"
        # The customer comes back; the old event, delivered again, stays applied once.
        back = sns("subscribe-success", "cust-d", h.clock.now, message_id="m-2")
        assert await h.queue.apply_event(back) == "applied"
        h.clock.advance(seconds=10)
        again = await h.queue.take_event(pending)
        assert again.outcome == "duplicate"
        assert again.customer is not None
        after = await only_customer(h, "cust-d")
        assert after.Status == "active"
        assert after.Id == before.Id
        assert [e.EventId for e in after.Events] == ["m-1", "m-2"]
        await h.submit(ident("cust-d", 1))


async def test_subscribe_success_within_the_grace_restores_the_customer(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        await h.submit(ident("cust-s", 2))
        assert await h.queue.apply_event(sns("unsubscribe-pending", "cust-s", h.clock.now)) == (
            "applied"
        )
        # An older subscribe-success delivered late is no news.
        stale = sns("subscribe-success", "cust-s", h.clock.now - timedelta(minutes=10))
        assert await h.queue.apply_event(stale) == "applied"
        assert (await only_customer(h, "cust-s")).Status == "ending"
        h.clock.advance(seconds=30)
        assert await h.queue.apply_event(sns("subscribe-success", "cust-s", h.clock.now)) == (
            "applied"
        )
        view = await only_customer(h, "cust-s")
        assert view.Status == "active"
        assert view.GraceEndsAt is None
        h.clock.advance(seconds=60)
        await h.submit(ident("cust-s", 3))
        await h.cycle()
        # Nothing was sent early: the hour is still open, with all the usage.
        assert h.sent() == []
        (grain,) = (await h.queue.grains(Filters(customer="cust-s"), None, 10)).Items
        assert (grain.Status, grain.Quantity) == ("open", "5")
        assert customers_gauge(h, "active") == 1
        assert customers_gauge(h, "ending") == 0


async def test_unsubscribe_success_ends_the_customer_at_once(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=900) as h:
        h.clock.set(10, 20)
        await h.submit(ident("cust-e", 4))
        assert await h.queue.apply_event(sns("unsubscribe-pending", "cust-e", h.clock.now)) == (
            "applied"
        )
        h.clock.advance(minutes=5)
        await h.submit(ident("cust-e", 1))
        assert await h.queue.apply_event(sns("unsubscribe-success", "cust-e", h.clock.now)) == (
            "applied"
        )
        view = await only_customer(h, "cust-e")
        assert (view.Status, view.EndedAt, view.UsageAccepted) == ("ended", h.clock.now, False)
        with pytest.raises(CustomerSubscriptionEnded):
            await h.submit(ident("cust-e", 1))
        # What it used before is sent now, not at the end of a grace that no longer holds.
        await h.cycle()
        (record,) = sent_records(h)
        assert (record["CustomerIdentifier"], record["Quantity"]) == ("cust-e", 5)
        assert customers_gauge(h, "ended") == 1


async def test_an_ending_customer_has_ended_once_its_final_hour_is_over(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        start = h.clock.now
        event = eventbridge("License Deprovisioned - Manufacturer", ACCOUNT, start)
        assert await h.queue.apply_event(event) == "applied"
        h.clock.advance(minutes=59)
        await h.cycle()
        assert (await only_customer(h, ACCOUNT)).Status == "ending"
        h.clock.advance(minutes=1, seconds=1)
        await h.cycle()
        view = await only_customer(h, ACCOUNT)
        assert (view.Status, view.EndedAt) == ("ended", start + timedelta(hours=1))


async def test_a_resolvecustomer_answer_ties_the_forms_and_refuses_the_second_one(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 20)
        await h.queue.record_resolved(answer("cust-x", ACCOUNT))
        view = await only_customer(h, "cust-x")
        assert (view.CustomerAWSAccountId, view.LicenseArn, view.Status) == (
            ACCOUNT,
            LICENSE,
            "active",
        )
        assert [(e.Type, e.Kind) for e in view.Events] == [("ResolveCustomer", "registered")]
        await h.submit(ident("cust-x", 2))
        # The same customer, dimension and hour under its other form: AWS would bill both.
        with pytest.raises(CustomerFormConflict) as refused:
            await h.submit(batch_record(ACCOUNT))
        detail = refused.value.detail
        assert f"CustomerAWSAccountId {ACCOUNT} + LicenseArn {LICENSE}" in detail
        assert f"CustomerIdentifier cust-x + ProductCode {PRODUCT}" in detail
        assert refused.value.status == 409
        # Another dimension is another grain.
        await h.submit(batch_record(ACCOUNT, Dimension="users"))
        # Within one call, the first form of the hour wins.
        partial = await h.submit(
            ident("cust-x", 1, Dimension="seats"),
            batch_record(ACCOUNT, Dimension="seats"),
            accept_partial=True,
        )
        assert [r.Index for r in partial.Accepted] == [0]
        assert [(r.Index, r.Reason) for r in partial.Rejected] == [(1, "CustomerFormConflict")]
        assert refusals(h, "CustomerFormConflict") == 2
        # BatchMeterUsage sent straight to AWS: refused against the queued grain, and
        # against an earlier record of the same call.
        now = h.clock.now
        direct = {"Timestamp": now, "Dimension": "gigabytes", "Quantity": 1}
        with pytest.raises(CustomerFormConflict):
            await h.queue.check_batch(
                {
                    "UsageRecords": [
                        {**direct, "CustomerAWSAccountId": ACCOUNT, "LicenseArn": LICENSE}
                    ]
                }
            )
        await h.queue.check_batch(
            {
                "UsageRecords": [
                    {
                        **direct,
                        "Dimension": "fresh",
                        "CustomerAWSAccountId": ACCOUNT,
                        "LicenseArn": LICENSE,
                    }
                ]
            }
        )
        with pytest.raises(CustomerFormConflict) as in_call:
            await h.queue.check_batch(
                {
                    "UsageRecords": [
                        {
                            **direct,
                            "Dimension": "fresh",
                            "CustomerAWSAccountId": ACCOUNT,
                            "LicenseArn": LICENSE,
                        },
                        {
                            **direct,
                            "Dimension": "fresh",
                            "CustomerIdentifier": "cust-x",
                            "LicenseArn": LICENSE,
                        },
                    ]
                }
            )
        assert in_call.value.detail.startswith("UsageRecords[1]: ")
        assert refusals(h, "CustomerFormConflict") == 4
        # The next hour starts afresh: whichever form comes first takes it.
        h.clock.set(11, 20)
        await h.submit(batch_record(ACCOUNT))
        with pytest.raises(CustomerFormConflict):
            await h.submit(ident("cust-x", 1))


async def test_records_of_a_customer_the_registry_does_not_tie_are_not_refused(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 20)
        # Known by one form only (an SNS event): nothing ties it to an account.
        await h.queue.apply_event(sns("subscribe-success", "cust-y", h.clock.now))
        await h.submit(ident("cust-y", 1), batch_record(ACCOUNT))
        assert refusals(h, "CustomerFormConflict") == 0


async def test_answers_and_events_that_carry_both_forms_tie_them_into_one_customer(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 20)
        await h.queue.apply_event(sns("subscribe-success", "cust-m", h.clock.now, message_id="s"))
        h.clock.advance(seconds=1)
        created = eventbridge(
            "Purchase Agreement Created - Manufacturer", ACCOUNT, h.clock.now, event_id="e"
        )
        await h.queue.apply_event(created)
        assert len((await h.queue.customers(None, None, None, 10)).Items) == 2
        h.clock.advance(seconds=5)
        await h.queue.record_resolved(answer("cust-m", ACCOUNT))
        (merged,) = (await h.queue.customers(None, None, None, 10)).Items
        view = await only_customer(h, ACCOUNT)
        assert view.Id == merged.Id
        assert (view.CustomerIdentifier, view.CustomerAWSAccountId) == ("cust-m", ACCOUNT)
        assert [e.EventId for e in view.Events][:2] == ["s", "e"]
        assert view.Events[2].Type == "ResolveCustomer"
        # One customer now: an ending event under one form closes both.
        await h.submit(ident("cust-m", 2), batch_record(ACCOUNT, Dimension="users"))
        await h.queue.apply_event(sns("unsubscribe-success", "cust-m", h.clock.now))
        await h.cycle()
        assert sorted(r["Dimension"] for r in sent_records(h)) == ["gigabytes", "users"]
        with pytest.raises(CustomerSubscriptionEnded):
            await h.submit(batch_record(ACCOUNT, Dimension="seats"))


async def test_customers_by_status_are_counted_as_they_change(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    # The counts the metrics show are kept by triggers (three rows, not a scan of every
    # customer ever known): after each change they equal a count of the customers
    # themselves, through new customers, two merged into one, an ending, an end and
    # a return.
    async with queue_harness(stores, queue_fake) as h:

        async def assert_counted(expected: dict[str, int]) -> None:
            listed = await h.store.list_customers(None, None, None, 1000)
            actual = dict.fromkeys(("active", "ending", "ended"), 0)
            for customer in listed:
                actual[customer.status] += 1
            assert actual == expected
            assert await h.store.customer_counts() == expected

        h.clock.set(10, 20)
        await assert_counted({"active": 0, "ending": 0, "ended": 0})
        await h.queue.apply_event(sns("subscribe-success", "cust-c", h.clock.now))
        created = eventbridge("Purchase Agreement Created - Manufacturer", ACCOUNT, h.clock.now)
        await h.queue.apply_event(created)
        await assert_counted({"active": 2, "ending": 0, "ended": 0})
        await h.queue.record_resolved(answer("cust-c", ACCOUNT))
        await assert_counted({"active": 1, "ending": 0, "ended": 0})
        await h.queue.record_resolved(answer("cust-d", "222233334444"))
        await h.queue.apply_event(sns("unsubscribe-pending", "cust-d", h.clock.now))
        await assert_counted({"active": 1, "ending": 1, "ended": 0})
        await h.queue.apply_event(sns("unsubscribe-success", "cust-c", h.clock.now))
        await assert_counted({"active": 0, "ending": 1, "ended": 1})
        h.clock.advance(minutes=5)
        await h.queue.record_resolved(answer("cust-c", ACCOUNT))
        await assert_counted({"active": 1, "ending": 1, "ended": 0})
        await h.cycle()
        assert customers_gauge(h, "ending") == 1


async def test_the_counts_start_from_the_customers_a_store_already_has(
    stores: StoreFactory, tmp_path: Path
) -> None:
    # A store of the version before the counts (SQLite 5, PostgreSQL 4) with customers of
    # every status: the migration counts them, and the triggers go on from there.
    policy = GrainPolicy(grace=timedelta(minutes=5))
    store = stores(policy)
    await store.open()
    await store.close()
    undo = [
        "DROP TRIGGER IF EXISTS customers_counted_insert",
        "DROP TRIGGER IF EXISTS customers_counted_delete",
        "DROP TRIGGER IF EXISTS customers_counted_update",
        "DROP TABLE customer_counts",
        # SQLite's migration 6, PostgreSQL's 5: the newest of each.
        "DELETE FROM schema_migrations WHERE version = (SELECT MAX(version) FROM "
        "schema_migrations)",
    ]
    rows = [
        (f"cust-{n}", status)
        for n, status in enumerate(["active"] * 3 + ["ending"] * 2 + ["ended"] * 4)
    ]
    insert = (
        "INSERT INTO customers (customer_identifier, customer_aws_account_id, license_arn, "
        "license_id, product_code, agreement_id, status, created_at, updated_at) "
        "VALUES ({0}, '', '', '', 'prod-1', '', {0}, 0, 0)"
    )
    if stores.kind == "sqlite":
        with sqlite3.connect(tmp_path / "main" / "queue.sqlite3", isolation_level=None) as conn:
            for statement in undo:
                conn.execute(statement)
            conn.executemany(insert.format("?"), rows)
    else:
        undo = [
            "DROP TRIGGER customers_counted ON customers",
            "DROP FUNCTION customers_counted()",
            *undo[3:],
        ]
        with psycopg.connect(stores.dsn(), autocommit=True) as pg:
            for statement in undo:
                pg.execute(statement.encode())
            with pg.cursor() as cursor:
                cursor.executemany(insert.format("%s").encode(), rows)
    store = stores(policy)
    await store.open()
    try:
        assert await store.customer_counts() == {"active": 3, "ending": 2, "ended": 4}
        await store.record_customer(
            Identity(customer_identifier="cust-new", product_code=PRODUCT), START
        )
        assert await store.customer_counts() == {"active": 4, "ending": 2, "ended": 4}
    finally:
        await store.close()


async def test_a_resolvecustomer_answer_brings_an_ended_customer_back(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake) as h:
        h.clock.set(10, 20)
        await h.queue.record_resolved(answer("cust-r", ACCOUNT))
        await h.queue.apply_event(sns("unsubscribe-success", "cust-r", h.clock.now))
        with pytest.raises(CustomerSubscriptionEnded):
            await h.submit(ident("cust-r", 1))
        h.clock.advance(minutes=5)
        await h.queue.record_resolved(answer("cust-r", ACCOUNT))
        view = await only_customer(h, "cust-r")
        assert (view.Status, view.EndedAt, view.UsageAccepted) == ("active", None, True)
        await h.submit(ident("cust-r", 1))


async def test_kinds_that_change_nothing_are_recorded(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        await h.queue.record_resolved(answer("cust-k", ACCOUNT))
        changed = await h.queue.take_event(sns("entitlement-updated", "cust-k", h.clock.now))
        assert changed.outcome == "recorded"
        assert changed.customer is not None
        failed = await h.queue.take_event(sns("subscribe-fail", "cust-nobody", h.clock.now))
        assert (failed.outcome, failed.customer) == ("recorded", None)
        unknown = await h.queue.take_event(sns("something-new", "cust-k", None))
        assert unknown.outcome == "recorded"
        assert await h.queue.apply_event(sns("something-new", "cust-k", None)) == "recorded"
        view = await only_customer(h, "cust-k")
        assert view.Status == "active"
        assert [(e.Kind, e.Outcome) for e in view.Events][1:] == [
            ("changed", "recorded"),
            ("unknown", "recorded"),
            ("unknown", "recorded"),
        ]
        # Nobody was created for the failed subscription.
        assert len((await h.queue.customers(None, None, None, 10)).Items) == 1
        # An ending event with no time, or one in the future, starts now.
        future = sns("unsubscribe-pending", "cust-k", h.clock.now + timedelta(days=1))
        await h.queue.apply_event(future)
        assert (await only_customer(h, "cust-k")).EndingSince == h.clock.now


async def test_a_late_ending_event_whose_grace_has_passed_closes_at_once(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, customer_grace=GRACE) as h:
        h.clock.set(10, 20)
        await h.submit(ident("cust-l", 3))
        h.clock.set(10, 40)
        late = sns("unsubscribe-pending", "cust-l", START.replace(hour=10, minute=21))
        assert await h.queue.apply_event(late) == "applied"
        with pytest.raises(CustomerSubscriptionEnded):
            await h.submit(ident("cust-l", 1))
        await h.cycle()
        assert [r["Quantity"] for r in sent_records(h)] == [3]


@pytest.fixture
def pg_stores(postgres_server: PgServer, tmp_path: Path) -> Iterator[StoreFactory]:
    """PostgreSQL databases only: several replicas on one shared store."""
    factory = StoreFactory("postgresql", tmp_path, postgres_server)
    yield factory
    factory.drop()


async def test_three_replicas_apply_one_event_once_and_send_the_final_hour_once(
    pg_stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                queue_harness(pg_stores, queue_fake, customer_grace=GRACE)
            )
            for _ in range(3)
        ]
        h = replicas[0]
        h.clock.set(10, 20)
        await asyncio.gather(*(r.submit(ident("cust-f", n)) for n, r in enumerate(replicas, 1)))
        await h.submit(ident("cust-g", 7))
        event = sns("unsubscribe-pending", "cust-f", h.clock.now)
        outcomes = await asyncio.gather(*(r.queue.apply_event(event) for r in replicas))
        assert sorted(outcomes) == ["applied", "duplicate", "duplicate"]
        assert await h.queue.apply_event(event) == "duplicate"
        (view,) = (await h.queue.customers(None, "cust-f", None, 10)).Items
        customer = await h.queue.customer(view.Id)
        assert customer is not None
        assert customer.Events is not None
        assert len(customer.Events) == 1
        h.clock.advance(seconds=GRACE + 1)
        for _ in range(2):
            await asyncio.gather(*(r.cycle() for r in replicas))
        records = sent_records(h)
        assert [(r["CustomerIdentifier"], r["Quantity"]) for r in records] == [("cust-f", 6)]
        (grain,) = (await h.queue.grains(Filters(customer="cust-f"), None, 10)).Items
        assert (grain.Status, grain.Attempts) == ("accepted", 1)


async def test_applying_an_event_and_checking_a_records_customer_use_indexes(
    tmp_path: Path,
) -> None:
    """SQLite's virtual-machine steps (counted, not timed) of applying an event and of a
    record's intake with its customer's checks: a registry of 3,000 customers costs what
    one of 10 does. A lookup that scans customers grows with them."""
    policy = GrainPolicy(grace=timedelta(minutes=5))
    now = START.replace(minute=20)
    hour = hour_of(now)

    def key(n: int, form: str) -> GrainKey:
        if form == "identifier":
            return GrainKey("batch", PRODUCT, "", f"cust-{n}", "", "gb", hour)
        return GrainKey(
            "batch", "", f"{LICENSE[:-16]}{n:016x}", "", f"{100000000000 + n}", "gb", hour
        )

    def intake(n: int, form: str, record: int) -> Intake:
        usage = Usage(key(n, form), now, Decimal(1), False)
        return Intake(f"ur_{record:012d}", None, "h", usage, "{}", now)

    async def steps(held: int, path: Path) -> tuple[int, int]:
        store = SqliteStore(path, policy)
        await store.open()
        try:
            await asyncio.gather(
                *(
                    store.record_customer(
                        Identity(
                            customer_identifier=f"cust-{n}",
                            customer_aws_account_id=f"{100000000000 + n}",
                            license_arn=f"{LICENSE[:-16]}{n:016x}",
                            product_code=PRODUCT,
                        ),
                        now,
                    )
                    for n in range(held)
                )
            )
            await store.ingest(
                [intake(n, "identifier", n) for n in range(held)], all_or_nothing=True
            )
        finally:
            await store.close()
        conn = store._connect()
        count = 0

        def tick() -> int:
            nonlocal count
            count += 1
            return 0

        conn.set_progress_handler(tick, 10)
        conn.execute("BEGIN IMMEDIATE")
        event = sns("unsubscribe-pending", "cust-5", now)
        _run_script(conn, registry.apply_event(event, now, timedelta(minutes=15), postgres=False))
        applying, count = count, 0
        # A record under the other form of a tied customer: its twin is looked up, found,
        # and the record refused; one of a customer that is fine goes in.
        failures = store._ingest(
            conn, [intake(7, "account", 10**6), intake(8, "identifier", 10**6 + 1)], False
        )
        conn.execute("COMMIT")
        conn.close()
        assert [getattr(f, "reason", None) for f in failures] == ["CustomerFormConflict", None]
        return applying, count

    small = await steps(10, tmp_path / "small.sqlite3")
    large = await steps(3000, tmp_path / "large.sqlite3")
    assert small[0] > 0
    assert small[1] > 0
    # A B-tree one level deeper costs a few steps more, never hundreds.
    assert large[0] <= small[0] * 1.3, (small, large)
    assert large[1] <= small[1] * 1.3, (small, large)


def test_every_registry_lookup_searches_an_index(tmp_path: Path) -> None:
    """EXPLAIN QUERY PLAN of each statement that reads customers or a customer's grains:
    an index search, never a scan of the table."""
    from app.queue.migrations import MIGRATIONS

    conn = sqlite3.connect(tmp_path / "plan.sqlite3")
    for _, script in MIGRATIONS:
        for statement in script:
            conn.execute(statement)
    now = 1_795_000_000.0
    lookups = [
        *registry.lookup_queries(["cust-1"], ["1234"]),
        registry.customer_query(7),
        registry.events_query(7),
        registry.list_customers_query("ending", None, 3, 100),
        registry.list_customers_query(None, "1234", None, 100),
        (registry._DUE_TO_CLOSE, (now,)),
        (registry._ANY_FINAL_HOUR_OVER, (now,)),
        (registry._OPEN_GRAINS_OF, ("1234", "")),
        (registry._EVENT_CUSTOMER, ("e-1",)),
        (registry._FINAL_HOUR_OVER, (now, now)),
        (queries.NEXT_WAKEUP, ()),
    ]
    for sql, params in lookups:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        # A SCAN (of a table, or of a whole index) reads what is stored; a SEARCH
        # reads what the statement names.
        scans = [step for step in plan if step.startswith("SCAN")]
        assert scans in ([], ["SCAN CONSTANT ROW"]), (sql, plan)
        assert any(step.startswith("SEARCH") for step in plan), (sql, plan)
    conn.close()
