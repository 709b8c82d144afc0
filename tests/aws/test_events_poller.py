"""The events poller (app.actions.events) in-process, against the strict fake SQS, with a
sink that records what it was given: applied then deleted, never deleted before the
sink returned, a failed apply left to come back, an unreadable message logged once and
left to the redrive policy, SQS's refusals on the poller's status, a clean stop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from botocore.credentials import ReadOnlyCredentials

from app.actions.events import EventPoller, type_label
from app.aws.credentials import CredentialProvider, ResolvedCredentials
from app.aws.http_client import create_client
from app.aws.sqs import SqsQueue
from app.config import Settings
from app.metering.errors import QueueUnavailable
from app.metering.subscriptions import SubscriptionEvent, parse_event
from app.runtime.metrics import Metrics
from app.runtime.retry import Backoff, RetryPolicy
from app.runtime.supervisor import Supervisor
from tests.conftest import PRODUCT
from tests.fakes import FakeSqs, KeyRegistry, RunningServer, serve

CREATED = "Purchase Agreement Created - Manufacturer"


def eventbridge(event_id: str, detail_type: str = CREATED) -> str:
    """An EventBridge event from AWS Marketplace, as the queue receives it."""
    return json.dumps(
        {
            "version": "0",
            "id": event_id,
            "detail-type": detail_type,
            "source": "aws.agreement-marketplace",
            "account": "999988887777",
            "time": "2026-12-01T10:59:12Z",
            "region": "us-east-1",
            "resources": [],
            "detail": {
                "agreement": {"id": "agmt-1234567890abcdef"},
                "product": {"code": "prod-demo"},
                "acceptor": {"accountId": "111122223333"},
            },
        }
    )


def sns(action: str, message_id: str) -> str:
    """An SNS notification in its envelope."""
    message = {"action": action, "customer-identifier": "cust-1", "product-code": "prod-demo"}
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": message_id,
            "Message": json.dumps(message),
            "Timestamp": "2026-12-01T10:59:30.123Z",
        }
    )


@dataclass
class RecordingSink:
    """Applies events idempotently by id; records, for each call, the event and how many
    messages the queue had deleted by then. ``failing``: event ids it refuses (the store
    is down for them), each for ``failures`` calls (-1: always)."""

    fake: FakeSqs
    applied: dict[str, SubscriptionEvent] = field(default_factory=dict)
    calls: list[tuple[str, int]] = field(default_factory=list)
    failing: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0

    async def __call__(self, event: SubscriptionEvent) -> str:
        self.calls.append((event.event_id, self.fake.deleted))
        if self.delay:
            await asyncio.sleep(self.delay)
        left = self.failing.get(event.event_id, 0)
        if left:
            self.failing[event.event_id] = left - 1
            raise QueueUnavailable("the store is down")
        if event.event_id in self.applied:
            return "duplicate"
        self.applied[event.event_id] = event
        return "applied"


@dataclass
class Harness:
    """A fake queue, the poller reading it into ``sink``, and its metrics."""

    fake: FakeSqs
    server: RunningServer
    sink: RecordingSink
    metrics: Metrics
    poller: EventPoller

    def count(self, event_type: str, outcome: str) -> float:
        """``metering_events_total`` for one type and outcome."""
        value = self.metrics.registry.get_sample_value(
            "metering_events_total", {"type": event_type, "outcome": outcome}
        )
        return value or 0.0

    def problem(self) -> float:
        """``metering_events_queue_problem``."""
        return self.metrics.registry.get_sample_value("metering_events_queue_problem") or 0.0


async def until(condition: Callable[[], bool], within: float = 8.0) -> None:
    """Wait until ``condition()`` holds, ``within`` seconds at most."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def registry() -> KeyRegistry:
    """A fresh key registry."""
    return KeyRegistry()


@pytest.fixture
def served(registry: KeyRegistry) -> Iterator[tuple[FakeSqs, RunningServer]]:
    """The fake queue (a received message hidden for one second), served."""
    fake = FakeSqs(registry, visibility_timeout=1)
    with serve(fake) as server:
        yield fake, server
        fake.close()


@pytest.fixture
async def harness(
    registry: KeyRegistry, served: tuple[FakeSqs, RunningServer]
) -> AsyncIterator[Harness]:
    """A poller with long polls of one second, messages hidden for one second while
    handled and for one second after a failed apply; quick retries."""
    fake, server = served
    key = registry.issue("arn:aws:iam::123456789012:user/sidecar", None)
    credentials = CredentialProvider(
        lambda: ResolvedCredentials(
            ReadOnlyCredentials(key.access_key_id, key.secret_access_key, None),
            None,
            "test",
            datetime.now(UTC),
        ),
        refresh_margin=900,
        retry_interval=5,
    )
    await credentials.start()
    settings = Settings(
        mode="aws",
        product_code=PRODUCT,
        read_timeout=1,
        retry_base_delay=0.01,
        retry_max_delay=0.05,
    )
    retry = dataclasses.replace(
        RetryPolicy.from_settings(settings),
        events_backoff=Backoff(0.05, 0.2),
        events_redelivery_backoff=Backoff(1.0, 1.0),
    )
    client = create_client(settings)
    metrics = Metrics()
    sink = RecordingSink(fake)
    queue = SqsQueue(
        client,
        fake.queue_url(server.url),
        region="us-east-1",
        credentials=credentials,
        retry=retry,
    )
    poller = EventPoller(
        queue, sink=sink, metrics=metrics, retry=retry, wait_seconds=1, visibility_timeout=1
    )
    try:
        yield Harness(fake, server, sink, metrics, poller)
    finally:
        await poller.stop()
        await client.aclose()
        await credentials.close()


async def test_events_are_applied_then_deleted(harness: Harness) -> None:
    first = harness.fake.send(eventbridge("eb-1"))
    second = harness.fake.send(sns("unsubscribe-pending", "sns-1"))
    harness.poller.start()
    await until(lambda: harness.fake.deleted == 2)
    assert list(harness.sink.applied) == ["eb-1", "sns-1"]
    # Each message was still on the queue when its event was handed to the sink.
    assert harness.sink.calls == [("eb-1", 0), ("sns-1", 1)]
    assert harness.fake.is_deleted(first)
    assert harness.fake.is_deleted(second)
    assert harness.count(CREATED, "applied") == 1
    assert harness.count("unsubscribe-pending", "applied") == 1
    assert harness.poller.status() == (True, "reading the events queue")
    assert harness.problem() == 0


async def test_a_failed_apply_leaves_the_message_to_come_back(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.sink.failing["eb-1"] = 1
    message_id = harness.fake.send(eventbridge("eb-1"))
    harness.poller.start()
    await until(lambda: harness.count(CREATED, "failed") == 1)
    assert not harness.fake.is_deleted(message_id)
    # Hidden again, for the redelivery curve's second, by ChangeMessageVisibility (sent
    # just after the failure is counted).
    await until(lambda: len(harness.fake.requests_for("ChangeMessageVisibility")) >= 1)
    [change] = harness.fake.requests_for("ChangeMessageVisibility")
    assert change.json()["VisibilityTimeout"] == 1
    await until(lambda: harness.fake.deleted == 1)
    assert harness.fake.receive_count(message_id) == 2
    assert list(harness.sink.applied) == ["eb-1"]
    assert harness.count(CREATED, "applied") == 1
    [warning] = [r for r in caplog.records if "could not be applied" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert getattr(warning, "message_id", None) == message_id
    assert getattr(warning, "error", None) == "QueueUnavailable"


async def test_an_unreadable_message_is_logged_once_and_left_to_the_redrive_policy(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    secret_body = '{"not": "an event", "token": "s3cr3t-body-text"}'
    unreadable = harness.fake.send(secret_body)
    good = harness.fake.send(eventbridge("eb-2"))
    harness.poller.start()
    await until(lambda: harness.fake.is_deleted(good))
    # Redelivered after its one-second visibility timeout, more than once.
    await until(lambda: harness.fake.receive_count(unreadable) >= 3)
    assert not harness.fake.is_deleted(unreadable)
    logged = [r for r in caplog.records if "no AWS Marketplace event" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].levelno == logging.ERROR
    assert getattr(logged[0], "message_id", None) == unreadable
    assert harness.count("unreadable", "unreadable") == 1
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)
    assert all("s3cr3t" not in str(r.__dict__) for r in caplog.records)
    assert harness.count(CREATED, "applied") == 1


async def test_one_bad_message_never_stops_the_next(harness: Harness) -> None:
    harness.sink.failing["poison"] = -1
    harness.fake.send("not json at all")
    harness.fake.send(eventbridge("poison"))
    harness.fake.send("[1, 2]")
    good = [harness.fake.send(sns("subscribe-success", f"sns-{n}")) for n in range(3)]
    harness.poller.start()
    await until(lambda: all(harness.fake.is_deleted(m) for m in good))
    assert set(harness.sink.applied) == {"sns-0", "sns-1", "sns-2"}
    assert harness.count("unreadable", "unreadable") == 2
    assert harness.count(CREATED, "failed") >= 1
    assert harness.fake.deleted == 3


async def test_a_redelivered_event_changes_nothing(harness: Harness) -> None:
    # The delete is refused: the applied event comes back, and the sink says so.
    harness.fake.deny_access(["DeleteMessage"])
    message_id = harness.fake.send(sns("entitlement-updated", "sns-9"))
    harness.poller.start()
    await until(lambda: harness.count("entitlement-updated", "applied") == 1)
    await until(lambda: not harness.poller.status()[0])
    detail = harness.poller.status()[1]
    assert "cannot be deleted from" in detail
    assert "AccessDeniedException" in detail
    assert harness.problem() == 1
    harness.fake.allow_access()
    await until(lambda: harness.fake.is_deleted(message_id))
    assert harness.count("entitlement-updated", "duplicate") == 1
    assert len(harness.sink.applied) == 1
    await until(lambda: harness.poller.status()[0])
    assert harness.problem() == 0


@pytest.mark.parametrize(
    ("spoil", "code"),
    [("deny", "AccessDeniedException"), ("missing", "QueueDoesNotExist")],
)
async def test_a_queue_that_cannot_be_read_is_reported_until_it_can(
    harness: Harness, caplog: pytest.LogCaptureFixture, spoil: str, code: str
) -> None:
    if spoil == "deny":
        harness.fake.deny_access()
    else:
        harness.fake.exists = False
    harness.poller.start()
    await until(lambda: len(harness.fake.requests_for("ReceiveMessage")) >= 4)
    ok, detail = harness.poller.status()
    assert not ok
    assert detail.startswith("the events queue cannot be read since ")
    assert code in detail
    assert harness.fake.queue_path not in detail
    assert "123456789012" not in detail
    assert harness.problem() == 1
    # Logged once, for a person to fix; not once per attempt.
    failing = [r for r in caplog.records if "events queue is failing" in r.getMessage()]
    assert len(failing) == 1
    assert failing[0].levelno == logging.ERROR
    harness.fake.allow_access()
    harness.fake.exists = True
    message_id = harness.fake.send(eventbridge("eb-3"))
    await until(lambda: harness.fake.is_deleted(message_id))
    assert harness.poller.status() == (True, "reading the events queue")
    assert harness.problem() == 0


async def test_failed_receives_back_off(harness: Harness) -> None:
    harness.fake.deny_access()
    harness.poller.start()
    await asyncio.sleep(1.5)
    # Pauses of up to 0.05, 0.1, 0.2, 0.2, ... seconds: a handful of tries, not hundreds.
    tries = len(harness.fake.requests_for("ReceiveMessage"))
    assert 4 <= tries <= 30, tries


async def test_stop_cancels_a_long_poll_at_once(harness: Harness) -> None:
    poller = EventPoller(
        harness.poller._queue,
        sink=harness.sink,
        metrics=harness.metrics,
        retry=harness.poller._retry,
        wait_seconds=20,
    )
    poller.start()
    await until(lambda: len(harness.fake.requests_for("ReceiveMessage")) == 1)
    started = time.monotonic()
    await poller.stop()
    assert time.monotonic() - started < 1.0


async def test_stop_lets_the_event_in_hand_be_applied_and_deleted(harness: Harness) -> None:
    harness.sink.delay = 0.5
    message_id = harness.fake.send(eventbridge("eb-4"))
    harness.poller.start()
    await until(lambda: len(harness.sink.calls) == 1)
    await harness.poller.stop()
    assert harness.fake.is_deleted(message_id)
    assert list(harness.sink.applied) == ["eb-4"]


async def test_a_stop_that_cannot_wait_leaves_the_message_to_come_back(harness: Harness) -> None:
    harness.sink.delay = 5.0
    message_id = harness.fake.send(eventbridge("eb-5"))
    harness.poller.start()
    await until(lambda: len(harness.sink.calls) == 1)
    started = time.monotonic()
    await harness.poller.stop(budget=0.2)
    assert time.monotonic() - started < 1.0
    assert not harness.fake.is_deleted(message_id)


async def test_the_poller_runs_as_a_supervised_loop(harness: Harness) -> None:
    supervisor = Supervisor()
    harness.poller.start(supervisor.spawn)
    await until(lambda: len(harness.fake.requests_for("ReceiveMessage")) >= 1)
    assert supervisor.status() == (True, "running: events-poller")
    await harness.poller.stop()
    supervisor.shutting_down()
    await supervisor.aclose()
    assert supervisor.status()[0]


def test_the_type_label_is_bounded() -> None:
    known = parse_event(eventbridge("x"))
    assert type_label(known) == CREATED
    made_up = parse_event(eventbridge("y", detail_type="Customer cust-123 did {something}"))
    assert type_label(made_up) == "unknown"
    assert type_label(parse_event(json.dumps({"action": "whatever-new"}))) == "unknown"
