"""A customer leaves, end to end: AWS Marketplace's events arrive on a strict fake SQS queue
(signatures checked, visibility timeout and redelivery, long polling), real sidecar
processes poll it, and a strict fake AWS Metering endpoint receives the final hour.

For SNS and for EventBridge: the leaving customer's current partial hour reaches AWS within
seconds of the grace with the exact sum, other customers' open hours are not sent, later
usage is refused 409, a redelivered message changes nothing, an unreadable message does not
stop the next one, subscribe-success within the grace restores the customer; three replicas
on one PostgreSQL store apply each event once and send the final hour once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws, aws_mode_env
from tests.fakes import FakeMetering, FakeSqs, IssuedKey, KeyRegistry, RunningServer, serve
from tests.pg import PgServer, new_database_name
from tests.queue.test_customers_api import (
    concurrent,
    customer_view,
    eventbridge,
    ident,
    inside_an_hour,
    license_of,
    queue,
    sent,
    sns_envelope,
    unique,
)
from tests.queue.test_queue_api import QUEUE_FAST, wait_until
from tests.sidecar import run_sidecar

GRACE = 2.0
# The final hour reaches AWS this long after the grace at most (a dispatcher cycle, a send).
SENT_WITHIN = GRACE + 8.0


@pytest.fixture
def events(fake_aws_session: FakeAws) -> Iterator[tuple[FakeSqs, RunningServer]]:
    """A strict fake events queue in us-east-1 trusting the session's keys."""
    fake = FakeSqs(fake_aws_session.registry, region="us-east-1")
    with serve(fake) as server:
        yield fake, server
        fake.close()


def _env(fake_aws: FakeAws, key: IssuedKey, queue_url: str, grace: float) -> dict[str, str]:
    return aws_mode_env(
        fake_aws.url,
        key,
        **FAST_RETRIES,
        **QUEUE_FAST,
        METERING_EVENTS_QUEUE_URL=queue_url,
        METERING_CUSTOMER_END_GRACE=str(grace),
    )


def _wait(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        time.sleep(0.05)


def test_sns_unsubscribe_through_sqs_sends_the_final_hour_and_refuses_later_usage(
    fake_aws: FakeAws, static_key: IssuedKey, events: tuple[FakeSqs, RunningServer]
) -> None:
    sqs, server = events
    inside_an_hour()
    leaving, staying = unique("cust-leaving"), unique("cust-staying")
    with run_sidecar(
        _env(fake_aws, static_key, sqs.queue_url(server.url), GRACE), wait_ready=True
    ) as sidecar:
        assert (
            queue(sidecar, ident(leaving, 3), ident(leaving, 4), ident(staying, 5)).status_code
            == 202
        )
        # An unreadable message first: it must not stop the next one.
        unreadable = sqs.send('{"what": "is this"}')
        pending = sns_envelope("unsubscribe-pending", leaving, message_id=str(uuid.uuid4()))
        message = sqs.send(pending)
        applied_at = time.monotonic()
        _wait(lambda: sqs.is_deleted(message), 15, "the ending event applied and deleted")
        assert customer_view(sidecar, leaving)["Status"] == "ending"
        # Within the grace the usage is still taken ...
        assert queue(sidecar, ident(leaving, 2)).status_code == 202
        # ... then every grain of the customer goes out, the current hour included.
        _wait(lambda: sent(fake_aws, leaving) != [], SENT_WITHIN, "the final hour sent")
        assert time.monotonic() - applied_at >= GRACE - 0.5
        (record,) = sent(fake_aws, leaving)
        assert record["Quantity"] == 9
        # Other customers' open hours are not sent early.
        assert sent(fake_aws, staying) == []
        refused = queue(sidecar, ident(leaving, 1))
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "CustomerSubscriptionEnded"
        # The same message again (SQS delivers at least once): nothing changes.
        again = sqs.send(pending)
        _wait(lambda: sqs.is_deleted(again), 15, "the redelivered event deleted")
        time.sleep(0.5)
        assert len(sent(fake_aws, leaving)) == 1
        assert customer_view(sidecar, leaving)["Status"] == "ending"
        # The unreadable message was received, never deleted: left to the redrive policy.
        assert sqs.receive_count(unreadable) >= 1
        assert not sqs.is_deleted(unreadable)
        log = sidecar.log()
    assert log.count("is this") == 0


def test_eventbridge_ending_then_created_within_the_grace_keeps_the_customer(
    fake_aws: FakeAws, static_key: IssuedKey, events: tuple[FakeSqs, RunningServer]
) -> None:
    sqs, server = events
    inside_an_hour()
    account = str(uuid.uuid4().int)[:12]
    license_arn = license_of(account)
    grace = 6.0
    with run_sidecar(
        _env(fake_aws, static_key, sqs.queue_url(server.url), grace), wait_ready=True
    ) as sidecar:
        assert queue(sidecar, concurrent(account, license_arn, 5)).status_code == 202
        ended = sqs.send(
            eventbridge("Purchase Agreement Ended - Manufacturer", account, license_arn)
        )
        _wait(lambda: sqs.is_deleted(ended), 15, "the ending event applied")
        assert customer_view(sidecar, account)["Status"] == "ending"
        created = sqs.send(
            eventbridge("Purchase Agreement Created - Manufacturer", account, license_arn)
        )
        _wait(lambda: sqs.is_deleted(created), 15, "the created event applied")
        assert customer_view(sidecar, account)["Status"] == "active"
        # Past the grace: nothing was sent early, usage is still taken.
        time.sleep(grace + 2)
        assert sent(fake_aws, account) == []
        assert queue(sidecar, concurrent(account, license_arn, 1)).status_code == 202


def test_three_replicas_apply_each_event_once_and_send_the_final_hour_once(
    postgres_server: PgServer,
) -> None:
    inside_an_hour()
    registry = KeyRegistry()
    keys = [registry.issue(f"arn:aws:iam::123456789012:user/replica-{i}", None) for i in range(3)]
    metering = FakeMetering(registry, region="us-east-1")
    sqs = FakeSqs(registry, region="us-east-1")
    name = new_database_name()
    dsn = postgres_server.create_database(name)
    leaving = unique("cust-fleet")
    try:
        with serve(metering) as aws, serve(sqs) as sqs_server, ExitStack() as stack:
            replicas = [
                stack.enter_context(
                    run_sidecar(
                        {
                            "METERING_ENDPOINT_URL": aws.url,
                            "METERING_PRODUCT_CODE": PRODUCT,
                            "METERING_QUEUE_DSN": dsn,
                            "AWS_REGION": "us-east-1",
                            "AWS_ACCESS_KEY_ID": key.access_key_id,
                            "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
                            "METERING_EVENTS_QUEUE_URL": sqs.queue_url(sqs_server.url),
                            "METERING_CUSTOMER_END_GRACE": str(GRACE),
                            **FAST_RETRIES,
                            **QUEUE_FAST,
                        },
                        wait_ready=True,
                    )
                )
                for key in keys
            ]
            for index, replica in enumerate(replicas):
                assert queue(replica, ident(leaving, index + 1)).status_code == 202
            pending = sns_envelope("unsubscribe-pending", leaving, message_id=str(uuid.uuid4()))
            # Delivered three times (at-least-once delivery; every replica polls).
            messages = [sqs.send(pending) for _ in range(3)]
            _wait(lambda: all(sqs.is_deleted(m) for m in messages), 20, "all three deleted")

            def records_sent() -> list[dict[str, Any]]:
                return [
                    record
                    for request in metering.requests_for("BatchMeterUsage")
                    if request.status == 200
                    for record in request.json()["UsageRecords"]
                    if record.get("CustomerIdentifier") == leaving
                ]

            wait_until(lambda: records_sent() != [], timeout=SENT_WITHIN + 5)
            time.sleep(1.0)
            (record,) = records_sent()
            assert record["Quantity"] == 6
            view = customer_view(replicas[0], leaving)
            assert [e["Type"] for e in view["Events"]] == ["unsubscribe-pending"]
    finally:
        sqs.close()
        postgres_server.drop_database(name)
