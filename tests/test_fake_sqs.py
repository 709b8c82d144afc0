"""The fake SQS is strict: checked against botocore's own SQS client (AWS JSON 1.0), an
independent implementation of the protocol the fake serves."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import botocore.session
import httpx
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError

from tests.fakes import (
    SQS_CONTENT_TYPE,
    SQS_TARGET_PREFIX,
    FakeSqs,
    IssuedKey,
    KeyRegistry,
    RunningServer,
    serve,
    sign,
    sqs_client,
)

REGION = "us-east-1"


@pytest.fixture
def registry() -> KeyRegistry:
    """A fresh key registry."""
    return KeyRegistry()


@pytest.fixture
def key(registry: KeyRegistry) -> IssuedKey:
    """A temporary key, as a role gives."""
    return registry.issue("arn:aws:sts::123456789012:assumed-role/events/s", 3600)


@pytest.fixture
def fake(registry: KeyRegistry) -> FakeSqs:
    """One queue in us-east-1 that hides a received message for one second."""
    return FakeSqs(registry, region=REGION, visibility_timeout=1)


@pytest.fixture
def server(fake: FakeSqs) -> Iterator[RunningServer]:
    """The fake served over real HTTP."""
    with serve(fake) as running:
        yield running
        fake.close()


@pytest.fixture
def url(fake: FakeSqs, server: RunningServer) -> str:
    """The queue's URL."""
    return fake.queue_url(server.url)


@pytest.fixture
def client(server: RunningServer, key: IssuedKey) -> Iterator[Any]:
    """botocore's SQS client, without retries."""
    sqs = sqs_client(server.url, key)
    yield sqs
    sqs.close()


def aws_error(call: Callable[..., Any], /, **kwargs: Any) -> tuple[str, int, dict[str, Any]]:
    """Call a botocore method expecting ClientError: (code, HTTP status, Error)."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    response = info.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"],
    )


def test_receive_then_delete(fake: FakeSqs, client: Any, url: str) -> None:
    body = '{"action": "subscribe-success", "note": "é \\" \\u2028"}'
    message_id = fake.send(body)
    assert (fake.visible(), fake.in_flight(), fake.deleted) == (1, 0, 0)
    answer = client.receive_message(
        QueueUrl=url, MessageSystemAttributeNames=["ApproximateReceiveCount"]
    )
    [message] = answer["Messages"]
    assert message["MessageId"] == message_id
    assert message["Body"] == body
    assert message["MD5OfBody"] == hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()
    assert message["Attributes"] == {"ApproximateReceiveCount": "1"}
    assert (fake.visible(), fake.in_flight(), fake.deleted) == (0, 1, 0)
    client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert (fake.visible(), fake.in_flight(), fake.deleted) == (0, 0, 1)
    assert fake.is_deleted(message_id)
    # Deleting again with the same (latest) handle succeeds, as on AWS.
    client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in client.receive_message(QueueUrl=url)
    request = fake.requests_for("ReceiveMessage")[0]
    assert request.signature_valid
    assert request.scope is not None
    assert request.scope.split("/")[1:3] == [REGION, "sqs"]
    assert dict(request.headers)["content-type"] == SQS_CONTENT_TYPE


def test_only_the_attributes_asked_for(fake: FakeSqs, client: Any, url: str) -> None:
    fake.send("a")
    plain = client.receive_message(QueueUrl=url, VisibilityTimeout=0)["Messages"][0]
    assert "Attributes" not in plain
    every = client.receive_message(QueueUrl=url, MessageSystemAttributeNames=["All"])
    attributes = every["Messages"][0]["Attributes"]
    assert attributes["ApproximateReceiveCount"] == "2"
    assert {"SentTimestamp", "ApproximateFirstReceiveTimestamp"} <= set(attributes)


def test_long_polling_holds_until_a_message_arrives(fake: FakeSqs, client: Any, url: str) -> None:
    timer = threading.Timer(0.3, fake.send, args=("late",))
    started = time.monotonic()
    timer.start()
    try:
        answer = client.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    finally:
        timer.join()
    elapsed = time.monotonic() - started
    assert [m["Body"] for m in answer["Messages"]] == ["late"]
    assert 0.25 <= elapsed < 1.5, elapsed


def test_long_polling_ends_empty_after_the_wait(client: Any, url: str) -> None:
    started = time.monotonic()
    answer = client.receive_message(QueueUrl=url, WaitTimeSeconds=1)
    elapsed = time.monotonic() - started
    assert "Messages" not in answer
    assert 0.95 <= elapsed < 2.5, elapsed
    started = time.monotonic()
    client.receive_message(QueueUrl=url)
    assert time.monotonic() - started < 0.5, "no wait: a short poll"


def test_an_undeleted_message_comes_back_after_its_visibility_timeout(
    fake: FakeSqs, client: Any, url: str
) -> None:
    message_id = fake.send("again")
    names = ["ApproximateReceiveCount"]
    first = client.receive_message(QueueUrl=url, MessageSystemAttributeNames=names)["Messages"][0]
    # Hidden for the queue's one second: nothing within half of it.
    assert "Messages" not in client.receive_message(QueueUrl=url)
    second = client.receive_message(
        QueueUrl=url, WaitTimeSeconds=3, MessageSystemAttributeNames=names
    )
    [message] = second["Messages"]
    assert message["MessageId"] == message_id
    assert message["Attributes"] == {"ApproximateReceiveCount": "2"}
    assert message["ReceiptHandle"] != first["ReceiptHandle"]
    assert fake.receive_count(message_id) == 2
    # The first receipt is stale now.
    code, status, error = aws_error(
        client.delete_message, QueueUrl=url, ReceiptHandle=first["ReceiptHandle"]
    )
    assert (code, status) == ("ReceiptHandleIsInvalid", 400)
    assert "is not a valid receipt handle" in error["Message"]
    assert not fake.is_deleted(message_id)
    client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert fake.is_deleted(message_id)


def test_a_receive_may_ask_for_its_own_visibility_timeout(
    fake: FakeSqs, client: Any, url: str
) -> None:
    fake.send("x")
    client.receive_message(QueueUrl=url, VisibilityTimeout=0)
    assert fake.visible() == 1
    client.receive_message(QueueUrl=url, VisibilityTimeout=60)
    time.sleep(1.2)
    assert (fake.visible(), fake.in_flight()) == (0, 1)


def test_an_unknown_receipt_handle_is_invalid(client: Any, url: str) -> None:
    code, status, _ = aws_error(client.delete_message, QueueUrl=url, ReceiptHandle="made-up")
    assert (code, status) == ("ReceiptHandleIsInvalid", 400)
    with pytest.raises(client.exceptions.ReceiptHandleIsInvalid):
        client.change_message_visibility(QueueUrl=url, ReceiptHandle="x", VisibilityTimeout=1)


def test_change_message_visibility(fake: FakeSqs, client: Any, url: str) -> None:
    fake.send("v")
    handle = client.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    client.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=60)
    time.sleep(1.2)
    assert fake.in_flight() == 1, "the longer timeout holds past the queue's one second"
    client.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=0)
    assert fake.visible() == 1
    # Visible again: not in flight, whatever its handle.
    code, status, _ = aws_error(
        client.change_message_visibility, QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=5
    )
    assert (code, status) == ("AWS.SimpleQueueService.MessageNotInflight", 400)
    handle = client.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    code, _, error = aws_error(
        client.change_message_visibility,
        QueueUrl=url,
        ReceiptHandle=handle,
        VisibilityTimeout=43201,
    )
    assert code == "InvalidParameterValue"
    assert "VisibilityTimeout" in error["Message"]


@pytest.mark.parametrize(
    ("member", "value"),
    [("MaxNumberOfMessages", 11), ("MaxNumberOfMessages", 0), ("WaitTimeSeconds", 21)],
)
def test_receive_limits(client: Any, url: str, member: str, value: int) -> None:
    code, status, error = aws_error(client.receive_message, QueueUrl=url, **{member: value})
    assert (code, status) == ("InvalidParameterValue", 400)
    assert member in error["Message"]


def test_an_unknown_queue_does_not_exist(
    fake: FakeSqs, client: Any, server: RunningServer, url: str
) -> None:
    with pytest.raises(client.exceptions.QueueDoesNotExist) as info:
        client.receive_message(QueueUrl=server.url + "/123456789012/other")
    error = info.value.response["Error"]
    assert error["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
    assert error["QueryErrorCode"] == "QueueDoesNotExist"
    fake.exists = False
    with pytest.raises(client.exceptions.QueueDoesNotExist):
        client.receive_message(QueueUrl=url)


def test_the_json_error_shape(
    fake: FakeSqs, server: RunningServer, key: IssuedKey, url: str
) -> None:
    body = json.dumps({"QueueUrl": server.url + "/1/nope"}).encode()
    headers = {
        "Content-Type": SQS_CONTENT_TYPE,
        "X-Amz-Target": f"{SQS_TARGET_PREFIX}.ReceiveMessage",
    }
    signed = sign(key, "POST", server.url + "/", body, headers, service="sqs")
    answer = httpx.post(server.url + "/", content=body, headers=signed)
    assert answer.status_code == 400
    assert answer.json() == {
        "__type": "com.amazonaws.sqs#QueueDoesNotExist",
        "message": "The specified queue does not exist.",
    }
    assert answer.headers["x-amzn-query-error"] == "AWS.SimpleQueueService.NonExistentQueue;Sender"
    assert answer.headers["content-type"] == SQS_CONTENT_TYPE
    # JSON 1.1, the query protocol's form body, or a path other than /: refused.
    for changed in (
        {"Content-Type": "application/x-amz-json-1.1"},
        {"Content-Type": "application/x-www-form-urlencoded"},
    ):
        signed = sign(key, "POST", server.url + "/", body, headers | changed, service="sqs")
        refused = httpx.post(server.url + "/", content=body, headers=signed)
        assert refused.json()["__type"].endswith("#UnknownOperationException")
    signed = sign(key, "POST", url, body, headers, service="sqs")
    assert httpx.post(url, content=body, headers=signed).status_code == 400


def test_access_can_be_denied_and_allowed_again(fake: FakeSqs, client: Any, url: str) -> None:
    fake.send("m")
    fake.deny_access()
    code, status, error = aws_error(client.receive_message, QueueUrl=url)
    assert (code, status) == ("AccessDenied", 403)
    assert error["QueryErrorCode"] == "AccessDeniedException"
    assert "sqs:receivemessage" in error["Message"]
    fake.deny_access(["DeleteMessage"])
    handle = client.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    assert aws_error(client.delete_message, QueueUrl=url, ReceiptHandle=handle)[0] == "AccessDenied"
    fake.allow_access()
    client.delete_message(QueueUrl=url, ReceiptHandle=handle)
    assert fake.deleted == 1


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        ("secret", "SignatureDoesNotMatch"),
        ("region", "SignatureDoesNotMatch"),
        ("revoked", "InvalidClientTokenId"),
        ("expired", "ExpiredToken"),
    ],
)
def test_a_wrong_signature_is_refused_as_aws_refuses_it(
    fake: FakeSqs,
    registry: KeyRegistry,
    key: IssuedKey,
    server: RunningServer,
    url: str,
    spoil: str,
    code: str,
) -> None:
    if spoil == "revoked":
        registry.revoke(key.access_key_id)
    elif spoil == "expired":
        registry.expire(key.access_key_id)
    sqs = sqs_client(
        server.url,
        key,
        secret="x" * 40 if spoil == "secret" else None,
        region="us-west-2" if spoil == "region" else REGION,
    )
    try:
        got, status, _ = aws_error(sqs.receive_message, QueueUrl=url)
    finally:
        sqs.close()
    assert (got, status) == (code, 403)
    assert fake.requests[0].signature_valid is False


def test_a_signature_for_another_service_is_refused(
    fake: FakeSqs, server: RunningServer, key: IssuedKey, url: str
) -> None:
    body = json.dumps({"QueueUrl": url}).encode()
    headers = {
        "Content-Type": SQS_CONTENT_TYPE,
        "X-Amz-Target": f"{SQS_TARGET_PREFIX}.ReceiveMessage",
    }
    signed = sign(key, "POST", server.url + "/", body, headers, service="aws-marketplace")
    answer = httpx.post(server.url + "/", content=body, headers=signed)
    assert answer.status_code == 403
    assert answer.json()["__type"] == "com.amazon.coral.service#InvalidSignatureException"
    assert "service" in answer.json()["message"]
    signed = sign(key, "POST", server.url + "/", body, headers, service="sqs")
    assert httpx.post(server.url + "/", content=body, headers=signed).status_code == 200


def test_injected_faults(fake: FakeSqs, client: Any, url: str) -> None:
    fake.faults.throttle(1, code="RequestThrottled", action="ReceiveMessage")
    fake.faults.server_error(1, status=500, code="InternalError")
    fake.faults.drop_connection(1)
    assert aws_error(client.receive_message, QueueUrl=url)[:2] == ("RequestThrottled", 400)
    assert aws_error(client.receive_message, QueueUrl=url)[:2] == ("InternalError", 500)
    with pytest.raises(ConnectionClosedError):
        client.receive_message(QueueUrl=url)
    assert "Messages" not in client.receive_message(QueueUrl=url)
    assert [r.fault for r in fake.requests] == ["throttle", "server_error", "drop_connection", None]


def test_send_takes_what_sqs_takes(fake: FakeSqs) -> None:
    fake.send("x" * (1024 * 1024))
    with pytest.raises(ValueError, match="bytes at most"):
        fake.send("é" * (512 * 1024 + 1))
    for refused in ("", "a\x00b", "\x08"):
        with pytest.raises(ValueError, match="allows"):
            fake.send(refused)
    assert fake.visible() == 1


def test_a_held_receive_ends_when_the_client_hangs_up(
    fake: FakeSqs, server: RunningServer, key: IssuedKey, url: str
) -> None:
    sqs = sqs_client(server.url, key, read_timeout=0.3)
    try:
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            sqs.receive_message(QueueUrl=url, WaitTimeSeconds=20)
    finally:
        sqs.close()
    # The held request noticed and ended; a message sent now is not lost to it.
    fake.quiet(timeout=3)
    fake.send("after")
    assert fake.visible() == 1
