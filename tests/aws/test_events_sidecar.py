"""The events queue as the real sidecar process reads it (python -m app): SQS refusing
access degrades /readyz (never unready) and sets the metric until it reads again; its
calls are signed for sqs in the events region whatever the sidecar's own region; the
sandbox polls nothing."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws, aws_mode_env
from tests.fakes import FakeSqs, IssuedKey, RunningServer, serve
from tests.sidecar import Sidecar, run_sidecar


@pytest.fixture
def events(fake_aws_session: FakeAws) -> Iterator[tuple[FakeSqs, RunningServer]]:
    """A fake events queue in us-east-1 trusting the session's keys."""
    fake = FakeSqs(fake_aws_session.registry, region="us-east-1")
    with serve(fake) as server:
        yield fake, server
        fake.close()


def wait_for(condition: Callable[[], bool], within: float = 15.0) -> None:
    """Wait until ``condition()`` holds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not come true in time")
        time.sleep(0.05)


def readiness(sidecar: Sidecar) -> tuple[int, dict[str, Any]]:
    """/readyz: (status, answer)."""
    response = sidecar.client.get("/readyz")
    return response.status_code, response.json()


def queue_problem(sidecar: Sidecar) -> float:
    """``metering_events_queue_problem`` as /metrics shows it."""
    for line in sidecar.client.get("/metrics").text.splitlines():
        if line.startswith("metering_events_queue_problem "):
            return float(line.split()[1])
    raise AssertionError("metering_events_queue_problem is not exported")


def created(event_id: str) -> str:
    """An EventBridge Purchase Agreement Created event."""
    return json.dumps(
        {
            "version": "0",
            "id": event_id,
            "detail-type": "Purchase Agreement Created - Manufacturer",
            "source": "aws.agreement-marketplace",
            "time": "2026-12-01T10:59:12Z",
            "detail": {
                "agreement": {"id": "agmt-1"},
                "product": {"code": PRODUCT},
                "acceptor": {"accountId": "111122223333"},
            },
        }
    )


def test_access_denied_degrades_readiness_until_the_queue_can_be_read(
    fake_aws: FakeAws, static_key: IssuedKey, events: tuple[FakeSqs, RunningServer]
) -> None:
    fake, server = events
    fake.deny_access()
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        METERING_EVENTS_QUEUE_URL=fake.queue_url(server.url),
        **FAST_RETRIES,
    )
    with run_sidecar(env) as sidecar:
        wait_for(lambda: readiness(sidecar)[1]["checks"].get("events", {}).get("ok") is False)
        status, answer = readiness(sidecar)
        # Degraded, still ready: the app keeps metering.
        assert status == 200
        assert answer["status"] == "degraded"
        check = answer["checks"]["events"]
        assert check["blocking"] is False
        assert check["detail"].startswith("the events queue cannot be read since ")
        assert "AccessDeniedException" in check["detail"]
        assert fake.queue_path not in check["detail"]
        assert queue_problem(sidecar) == 1

        fake.allow_access()
        message_id = fake.send(created("evt-sidecar-1"))
        wait_for(lambda: fake.is_deleted(message_id))
        wait_for(lambda: readiness(sidecar)[1]["checks"]["events"]["ok"] is True)
        status, answer = readiness(sidecar)
        assert (status, answer["status"]) == (200, "ready")
        assert answer["checks"]["events"]["detail"] == "reading the events queue"
        assert queue_problem(sidecar) == 0
        assert fake.receive_count(message_id) == 1
        log = sidecar.log()
    # Logged once for a person to fix, not once per attempt; AWS's message (which names
    # the role and the queue's account) is not repeated.
    assert log.count("the events queue is failing") == 1
    assert "not authorized" not in log


def test_events_calls_are_signed_for_sqs_in_the_events_region(
    fake_aws: FakeAws, static_key: IssuedKey, events: tuple[FakeSqs, RunningServer]
) -> None:
    fake, server = events
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        METERING_EVENTS_QUEUE_URL=fake.queue_url(server.url),
        **FAST_RETRIES,
    )
    env["AWS_REGION"] = "us-west-2"
    with run_sidecar(env, wait_ready=True) as sidecar:
        wait_for(lambda: len(fake.requests_for("ReceiveMessage")) >= 1)
        assert readiness(sidecar)[1]["checks"]["events"]["ok"] is True
        message_id = fake.send(created("evt-sidecar-2"))
        wait_for(lambda: fake.is_deleted(message_id))
        # A long poll of 20 s is under way; the stop cancels it at once.
        wait_for(lambda: len(fake.requests_for("ReceiveMessage")) >= 2)
        started = time.monotonic()
        assert sidecar.stop() in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 5
        assert "a background loop stopped" not in sidecar.log()
    assert {r.action for r in fake.requests} >= {"ReceiveMessage", "DeleteMessage"}
    for request in fake.requests:
        assert request.signature_valid, request
        assert request.scope is not None
        assert request.scope.split("/")[1:3] == ["us-east-1", "sqs"]
        assert request.access_key_id == static_key.access_key_id


def test_a_wrong_events_region_is_refused_and_reported(
    fake_aws: FakeAws, static_key: IssuedKey, events: tuple[FakeSqs, RunningServer]
) -> None:
    fake, server = events
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        METERING_EVENTS_QUEUE_URL=fake.queue_url(server.url),
        METERING_EVENTS_REGION="eu-west-1",
        **FAST_RETRIES,
    )
    with run_sidecar(env) as sidecar:
        wait_for(lambda: readiness(sidecar)[1]["checks"].get("events", {}).get("ok") is False)
        detail = readiness(sidecar)[1]["checks"]["events"]["detail"]
        assert "AWS refused the credentials (InvalidSignatureException)" in detail
    assert fake.requests[0].scope is not None
    assert fake.requests[0].scope.split("/")[1] == "eu-west-1"
    assert not any(r.signature_valid for r in fake.requests)


def test_the_sandbox_polls_no_queue(events: tuple[FakeSqs, RunningServer]) -> None:
    fake, server = events
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_EVENTS_QUEUE_URL": fake.queue_url(server.url),
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        status, answer = readiness(sidecar)
        assert status == 200
        assert "events" not in answer["checks"]
        time.sleep(0.5)
    assert fake.requests == []
