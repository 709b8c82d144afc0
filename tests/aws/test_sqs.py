"""The SQS client (app.aws.sqs) on the sidecar's one HTTP client, against the strict fake:
AWS JSON 1.0 to the queue URL's origin, signed for sqs in the events region, the long
poll's own read timeout, ReceiveMessage's own answer ceiling, AWS's answers by code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from botocore.credentials import ReadOnlyCredentials

from app.aws.credentials import CredentialProvider, ResolvedCredentials
from app.aws.http_client import MAX_ANSWER_BYTES, create_client
from app.aws.sqs import (
    CONTENT_TYPE,
    MAX_MESSAGE_BYTES,
    SqsQueue,
    classify_sqs,
    queue_origin,
    receive_ceiling,
)
from app.config import Settings
from app.metering.errors import AwsServiceError, Fault, UpstreamTimeout, UpstreamUnavailable
from app.runtime.retry import EVENTS_CALL_ATTEMPTS, CallLimits, RetryPolicy
from tests.conftest import PRODUCT
from tests.fakes import FakeSqs, IssuedKey, KeyRegistry, RunningServer, serve

EVENTS_REGION = "us-east-1"


@dataclass
class Harness:
    """A fake queue, and the sidecar's SQS client for it."""

    fake: FakeSqs
    server: RunningServer
    queue: SqsQueue
    url: str
    resolved: list[IssuedKey]


@pytest.fixture
def registry() -> KeyRegistry:
    """A fresh key registry."""
    return KeyRegistry()


@pytest.fixture
def served(registry: KeyRegistry) -> Iterator[tuple[FakeSqs, RunningServer]]:
    """The fake queue, served."""
    fake = FakeSqs(registry, region=EVENTS_REGION, visibility_timeout=1)
    with serve(fake) as server:
        yield fake, server
        fake.close()


def settings(**overrides: float) -> Settings:
    """Aws-mode settings with quick retries (``overrides``: timeouts)."""
    return Settings(
        mode="aws",
        product_code=PRODUCT,
        region="us-west-2",
        retry_base_delay=0.01,
        retry_max_delay=0.05,
        **overrides,  # type: ignore[arg-type]
    )


@pytest.fixture
async def harness(
    registry: KeyRegistry, served: tuple[FakeSqs, RunningServer]
) -> AsyncIterator[Harness]:
    """An SqsQueue with a 0.5 s read timeout, signing with keys the fake trusts (each
    resolution of the chain issues a new one)."""
    fake, server = served
    resolved: list[IssuedKey] = []

    def resolve() -> ResolvedCredentials:
        key = registry.issue("arn:aws:iam::123456789012:user/sidecar", None)
        resolved.append(key)
        frozen = ReadOnlyCredentials(key.access_key_id, key.secret_access_key, None)
        return ResolvedCredentials(frozen, None, "test", datetime.now(UTC))

    credentials = CredentialProvider(resolve, refresh_margin=900, retry_interval=5)
    await credentials.start()
    config = settings(read_timeout=0.5)
    client = create_client(config)
    url = fake.queue_url(server.url)
    try:
        queue = SqsQueue(
            client,
            url,
            region=EVENTS_REGION,
            credentials=credentials,
            retry=RetryPolicy.from_settings(config),
        )
        yield Harness(fake, server, queue, url, resolved)
    finally:
        await client.aclose()
        await credentials.close()


async def test_json_1_0_to_the_queue_urls_origin_signed_for_sqs(harness: Harness) -> None:
    message_id = harness.fake.send('{"action": "subscribe-success"}')
    [message] = await harness.queue.receive(wait_seconds=0, visibility_timeout=7)
    assert message.message_id == message_id
    assert message.receive_count == 1
    await harness.queue.change_visibility(message.receipt_handle, 0)
    [again] = await harness.queue.receive(wait_seconds=0)
    assert again.receive_count == 2
    await harness.queue.delete(again.receipt_handle)
    assert harness.fake.is_deleted(message_id)

    receive, change, _, delete = harness.fake.requests
    assert [r.action for r in harness.fake.requests] == [
        "ReceiveMessage",
        "ChangeMessageVisibility",
        "ReceiveMessage",
        "DeleteMessage",
    ]
    assert all(r.signature_valid and r.status == 200 for r in harness.fake.requests)
    # Signed for sqs in the events region (the sidecar's own region is us-west-2).
    assert receive.scope is not None
    assert receive.scope.split("/")[1:] == [EVENTS_REGION, "sqs", "aws4_request"]
    headers = dict(receive.headers)
    assert headers["content-type"] == CONTENT_TYPE
    assert headers["x-amz-target"] == "AmazonSQS.ReceiveMessage"
    assert receive.json() == {
        "QueueUrl": harness.url,
        "MaxNumberOfMessages": 1,
        "WaitTimeSeconds": 0,
        "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
        "VisibilityTimeout": 7,
    }
    assert change.json() == {
        "QueueUrl": harness.url,
        "ReceiptHandle": message.receipt_handle,
        "VisibilityTimeout": 0,
    }
    assert delete.json() == {"QueueUrl": harness.url, "ReceiptHandle": again.receipt_handle}


def test_the_origin_of_a_queue_url() -> None:
    assert queue_origin("https://sqs.us-east-1.amazonaws.com/123456789012/q") == (
        "https://sqs.us-east-1.amazonaws.com/"
    )
    assert queue_origin("http://127.0.0.1:4566/000000000000/q.fifo") == "http://127.0.0.1:4566/"


async def test_the_long_poll_outlasts_the_clients_read_timeout(harness: Harness) -> None:
    # The client's read timeout is 0.5 s; a wait of 1 s is an answer that takes 1 s.
    started = time.monotonic()
    assert await harness.queue.receive(wait_seconds=1) == []
    assert 0.95 <= time.monotonic() - started < 3
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, harness.fake.send, "arrives")
    started = time.monotonic()
    [message] = await harness.queue.receive(wait_seconds=2)
    assert message.body == "arrives"
    assert time.monotonic() - started < 1.5


async def test_a_read_timeout_still_ends_a_receive_that_never_answers(harness: Harness) -> None:
    # A fault delays every attempt past the long poll's wait plus the read timeout.
    harness.fake.faults.delay(3, EVENTS_CALL_ATTEMPTS)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await harness.queue.receive(wait_seconds=0)
    # Each attempt waited its 0.5 s read timeout, not the fake's 3 s.
    assert time.monotonic() - started < 2.5
    assert len(harness.fake.requests) == EVENTS_CALL_ATTEMPTS


def test_the_ceiling_a_receive_names() -> None:
    one = receive_ceiling(1)
    # The largest body JSON can spell, and its envelope: over the client's usual ceiling.
    assert one > 6 * MAX_MESSAGE_BYTES > MAX_ANSWER_BYTES
    assert one < 7 * MAX_MESSAGE_BYTES
    assert receive_ceiling(10) > 10 * 6 * MAX_MESSAGE_BYTES


async def test_a_message_of_the_largest_size_is_read(harness: Harness) -> None:
    # 1 MiB of é: 3 MiB as SQS's JSON spells it (\u00e9), three times the usual ceiling.
    body = "é" * (MAX_MESSAGE_BYTES // 2)
    harness.fake.send(body)
    [message] = await harness.queue.receive(wait_seconds=0)
    assert message.body == body


async def test_the_answers_own_ceiling_is_enforced(harness: Harness) -> None:
    message_id = harness.fake.send("é" * (MAX_MESSAGE_BYTES // 2))
    with pytest.raises(UpstreamUnavailable, match="refused"):
        await harness.queue.call(
            "ReceiveMessage",
            {"QueueUrl": harness.url},
            limits=CallLimits(1, 10.0),
            ceiling=MAX_ANSWER_BYTES,
        )
    # Why the ceiling must fit what SQS may send: the refused answer's message was
    # received all the same, and spent one of its receives unseen.
    assert harness.fake.receive_count(message_id) == 1
    assert harness.fake.in_flight() == 1


@pytest.mark.parametrize(
    ("code", "fault"),
    [
        ("QueueDoesNotExist", Fault.CONFIGURATION),
        ("AWS.SimpleQueueService.NonExistentQueue", Fault.CONFIGURATION),
        ("AccessDeniedException", Fault.CONFIGURATION),
        ("AccessDenied", Fault.CONFIGURATION),
        ("KmsAccessDenied", Fault.CONFIGURATION),
        ("InvalidSignatureException", Fault.CREDENTIALS),
        ("RequestThrottled", Fault.THROTTLING),
        ("OverLimit", Fault.THROTTLING),
        ("InternalError", Fault.TRANSIENT),
        ("ReceiptHandleIsInvalid", Fault.REQUEST),
        ("MessageNotInflight", Fault.REQUEST),
        ("SomethingNew", Fault.UNKNOWN),
    ],
)
def test_sqs_answers_by_code(code: str, fault: Fault) -> None:
    assert classify_sqs(code, 400) is fault


async def test_a_queue_that_does_not_exist(harness: Harness) -> None:
    harness.fake.exists = False
    with pytest.raises(AwsServiceError) as info:
        await harness.queue.receive(wait_seconds=0)
    assert (info.value.code, info.value.fault) == ("QueueDoesNotExist", Fault.CONFIGURATION)
    assert len(harness.fake.requests) == 1, "our configuration: not tried again within the call"


async def test_access_denied(harness: Harness) -> None:
    harness.fake.deny_access()
    with pytest.raises(AwsServiceError) as info:
        await harness.queue.receive(wait_seconds=0)
    assert (info.value.code, info.value.fault) == ("AccessDeniedException", Fault.CONFIGURATION)
    assert info.value.upstream_status == 403


async def test_a_stale_receipt_is_about_the_request(harness: Harness) -> None:
    with pytest.raises(AwsServiceError) as info:
        await harness.queue.delete("stale")
    assert (info.value.code, info.value.fault) == ("ReceiptHandleIsInvalid", Fault.REQUEST)


async def test_throttling_and_faults_are_tried_again_within_the_call(harness: Harness) -> None:
    harness.fake.send("m")
    harness.fake.faults.throttle(1, code="RequestThrottled", action="ReceiveMessage")
    harness.fake.faults.server_error(1, status=500, code="InternalError")
    [message] = await harness.queue.receive(wait_seconds=0)
    assert message.body == "m"
    assert [r.status for r in harness.fake.requests] == [400, 500, 200]
    # A call's attempts are the policy's: three, then the failure stands.
    harness.fake.faults.drop_connection(EVENTS_CALL_ATTEMPTS)
    with pytest.raises(UpstreamUnavailable):
        await harness.queue.delete(message.receipt_handle)
    assert len(harness.fake.requests_for("DeleteMessage")) == EVENTS_CALL_ATTEMPTS


async def test_refused_credentials_are_refreshed_and_the_request_resent(harness: Harness) -> None:
    harness.fake.send("m")
    first = harness.resolved[-1]
    harness.fake.registry.revoke(first.access_key_id)
    [message] = await harness.queue.receive(wait_seconds=0)
    assert message.body == "m"
    refused, resent = harness.fake.requests
    assert (refused.status, refused.error_code) == (403, "UnrecognizedClientException")
    assert resent.access_key_id == harness.resolved[-1].access_key_id != first.access_key_id


async def test_an_unreachable_queue(registry: KeyRegistry) -> None:
    config = settings(read_timeout=0.5, connect_timeout=0.5)
    key = registry.issue("p", None)
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
    client = create_client(config)
    try:
        # A port nothing listens on.
        with serve(FakeSqs(registry)) as server:
            url = server.url + "/123456789012/q"
        queue = SqsQueue(
            client,
            url,
            region=EVENTS_REGION,
            credentials=credentials,
            retry=RetryPolicy.from_settings(config),
        )
        with pytest.raises(UpstreamUnavailable, match="could not reach AWS for ReceiveMessage"):
            await queue.receive(wait_seconds=0)
    finally:
        await client.aclose()
        await credentials.close()
