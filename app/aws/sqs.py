"""Amazon SQS, the three calls the events poller makes, on the sidecar's one HTTP client.

AWS JSON 1.0, as botocore's ``sqs`` service model (2012-11-05) describes it:
``POST /`` to the queue URL's own origin (scheme, host and port: a VPC endpoint's
or a test's as well as ``sqs.<region>.amazonaws.com``), ``Content-Type:
application/x-amz-json-1.0``, ``X-Amz-Target: AmazonSQS.<Action>``, a body of
``{"QueueUrl": ..., ...}``; an error is ``{"__type": "com.amazonaws.sqs#Code",
"message": ...}`` (with ``x-amzn-query-error``, the query API's old code, beside
it). Requests are signed for ``sqs`` in the events region
(``METERING_EVENTS_REGION``) by ``CredentialsAuth``, and go through the client
every call to AWS shares (``app.aws.http_client``): its proxies, its CA trust,
its pool, its ceiling on answers.

What an answer means is ``app.aws.classify``'s verdict by error code, with SQS's
own modelled codes sorted here (``SQS_FAULTS``): a queue that does not exist or a
KMS key the role may not use is our configuration; a receipt handle that is no
longer valid is about the request. Transport failures are mapped once by
``transport_errors``. A call is a few attempts under the one retry policy
(``RetryPolicy.events_call``): throttling and faults are tried again within it,
refused credentials are refreshed and the request resent once, each request an
attempt.

**The ceiling of a ReceiveMessage answer.** SQS takes message bodies of up to
1 MiB (``MaximumMessageSize``, 1 MiB by default since botocore's model of 2025),
so a single message can make an answer larger than the client's usual
``MAX_ANSWER_BYTES``, and an answer that is refused leaves its messages
received but never seen: each such receive spends one of the queue's
``maxReceiveCount``, and messages that shared the answer would go to the
dead-letter queue with it. So a receive asks for few messages (the poller asks
for one) and names the ceiling its own request implies (``receive_ceiling``):
per message, the largest body SQS accepts as JSON can spell it at its most
verbose (six bytes, ``\\u00XX``, for one byte of body), plus the message's other
members. What SQS can send is read; anything beyond it is still refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from app.aws.classify import classify
from app.aws.credentials import CredentialProvider
from app.aws.http_client import ANSWER_CEILING, MAX_ANSWER_BYTES, transport_errors
from app.aws.signing import CredentialsAuth
from app.metering.errors import (
    AwsServiceError,
    Fault,
    MeteringError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metering.protocol import encode, parse_error
from app.runtime.retry import CallLimits, RetryPolicy

log = logging.getLogger("app.events")

TARGET_PREFIX = "AmazonSQS"
CONTENT_TYPE = "application/x-amz-json-1.0"
SIGNING_NAME = "sqs"
# ReceiveMessage's limits (SQS's API reference).
MAX_MESSAGES_PER_RECEIVE = 10
MAX_WAIT_SECONDS = 20
# The largest message body SQS takes (MaximumMessageSize at its highest).
MAX_MESSAGE_BYTES = 1024 * 1024
# JSON at its most verbose: one byte of a body spelled as \u00XX.
MAX_JSON_EXPANSION = 6
# A message's members beside its body: MessageId, a ReceiptHandle (about 1 KiB at
# most), MD5OfBody and the one system attribute the poller asks for.
MESSAGE_ENVELOPE_BYTES = 8 * 1024

# SQS's own modelled error codes (with the query API's names its answers also carry),
# by what they say; anything else is sorted by ``app.aws.classify``.
SQS_FAULTS: Mapping[str, Fault] = {
    "QueueDoesNotExist": Fault.CONFIGURATION,
    "AWS.SimpleQueueService.NonExistentQueue": Fault.CONFIGURATION,
    "InvalidAddress": Fault.CONFIGURATION,
    "InvalidSecurity": Fault.CONFIGURATION,
    "UnsupportedOperation": Fault.CONFIGURATION,
    "AWS.SimpleQueueService.UnsupportedOperation": Fault.CONFIGURATION,
    "KmsAccessDenied": Fault.CONFIGURATION,
    "KmsDisabled": Fault.CONFIGURATION,
    "KmsInvalidKeyUsage": Fault.CONFIGURATION,
    "KmsInvalidState": Fault.CONFIGURATION,
    "KmsNotFound": Fault.CONFIGURATION,
    "KmsOptInRequired": Fault.CONFIGURATION,
    "KmsThrottled": Fault.THROTTLING,
    # Too many messages in flight: it passes as they are deleted or come back.
    "OverLimit": Fault.THROTTLING,
    "ReceiptHandleIsInvalid": Fault.REQUEST,
    "InvalidIdFormat": Fault.REQUEST,
    "MessageNotInflight": Fault.REQUEST,
    "AWS.SimpleQueueService.MessageNotInflight": Fault.REQUEST,
    "InvalidParameterValue": Fault.REQUEST,
}
# What a call tries again, with backoff.
_RETRIED = frozenset({Fault.THROTTLING, Fault.TRANSIENT})


def classify_sqs(code: str, status: int) -> Fault:
    """Sort one SQS error answer: SQS's own codes here, the rest as every AWS answer."""
    return SQS_FAULTS.get(code) or classify(code, status)


def receive_ceiling(max_messages: int) -> int:
    """The most bytes a ReceiveMessage answer of ``max_messages`` can legitimately have
    (see the module docstring), never below the client's usual ceiling."""
    per_message = MAX_MESSAGE_BYTES * MAX_JSON_EXPANSION + MESSAGE_ENVELOPE_BYTES
    return max(MAX_ANSWER_BYTES, max_messages * per_message + MESSAGE_ENVELOPE_BYTES)


def queue_origin(queue_url: str) -> str:
    """Where requests about ``queue_url`` go: its scheme, host and port, path ``/``."""
    url = httpx.URL(queue_url)
    return str(url.copy_with(path="/", query=None, fragment=None))


@dataclass(frozen=True, slots=True)
class SqsMessage:
    """One received message. ``receive_count`` is SQS's ``ApproximateReceiveCount``
    (1 on the first delivery). The body is the seller's data: never logged."""

    message_id: str
    receipt_handle: str
    body: str
    receive_count: int


class SqsQueue:
    """One SQS queue, read and written through the sidecar's one client."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        queue_url: str,
        *,
        region: str,
        credentials: CredentialProvider,
        retry: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._queue_url = queue_url
        self._origin = httpx.URL(queue_origin(queue_url))
        self._region = region
        self._credentials = credentials
        self._retry = retry
        self._sleep = sleep

    async def receive(
        self,
        *,
        max_messages: int = 1,
        wait_seconds: int = MAX_WAIT_SECONDS,
        visibility_timeout: int | None = None,
    ) -> list[SqsMessage]:
        """Long-poll for up to ``max_messages`` messages, ``wait_seconds`` at most; each is
        hidden from other receivers for ``visibility_timeout`` seconds (``None``: the
        queue's own). Raises a ``MeteringError`` (with its ``fault``) when SQS cannot be
        read."""
        if not 1 <= max_messages <= MAX_MESSAGES_PER_RECEIVE:
            raise ValueError(f"max_messages must be 1 to {MAX_MESSAGES_PER_RECEIVE}")
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            raise ValueError(f"wait_seconds must be 0 to {MAX_WAIT_SECONDS}")
        payload: dict[str, Any] = {
            "QueueUrl": self._queue_url,
            "MaxNumberOfMessages": max_messages,
            "WaitTimeSeconds": wait_seconds,
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
        }
        if visibility_timeout is not None:
            payload["VisibilityTimeout"] = visibility_timeout
        answer = await self.call(
            "ReceiveMessage",
            payload,
            limits=self._retry.events_call(wait_seconds),
            wait=wait_seconds,
            ceiling=receive_ceiling(max_messages),
        )
        raw = answer.get("Messages") or []
        if not isinstance(raw, list):
            raise UpstreamUnavailable("SQS answered ReceiveMessage with Messages that is no list")
        return [message for item in raw if (message := _message(item)) is not None]

    async def delete(self, receipt_handle: str) -> None:
        """Delete the message received with ``receipt_handle`` (its latest receipt)."""
        await self.call(
            "DeleteMessage",
            {"QueueUrl": self._queue_url, "ReceiptHandle": receipt_handle},
            limits=self._retry.events_call(),
        )

    async def change_visibility(self, receipt_handle: str, seconds: int) -> None:
        """Hide the message received with ``receipt_handle`` for ``seconds`` from now
        (0: visible again at once)."""
        await self.call(
            "ChangeMessageVisibility",
            {
                "QueueUrl": self._queue_url,
                "ReceiptHandle": receipt_handle,
                "VisibilityTimeout": seconds,
            },
            limits=self._retry.events_call(),
        )

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        limits: CallLimits,
        wait: float = 0.0,
        ceiling: int | None = None,
    ) -> dict[str, Any]:
        """Send ``action`` within ``limits`` (attempts and deadline under the one retry
        policy): throttling and faults are tried again, refused credentials refreshed
        and resent once. ``wait``: seconds SQS may hold the request (a long poll), added
        to the read timeout; ``ceiling``: the answer's own ceiling in bytes. Returns
        the answer's JSON object; raises a ``MeteringError`` with its ``fault``."""
        loop = asyncio.get_running_loop()
        attempts = self._retry.attempts(limits, loop.time())
        body = encode(payload)

        def refused(code: str) -> None:
            log.warning(
                "AWS refused the credentials for the events queue; refreshing",
                extra={"action": action, "code": code},
            )

        async def resend_allowed() -> bool:
            # The resend with refreshed credentials is an attempt like any other.
            return attempts.start(loop.time())

        # One per call: a call refreshes refused credentials once.
        auth = CredentialsAuth(
            self._credentials,
            service=SIGNING_NAME,
            region=self._region,
            before_resend=resend_allowed,
            on_refused=refused,
        )
        failure: MeteringError | None = None
        while attempts.start(loop.time()):
            started = loop.time()
            try:
                with transport_errors(action):
                    async with asyncio.timeout(max(attempts.deadline - started, 0.001)):
                        response = await self._send(action, body, auth, wait, ceiling)
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                failure = exc
            else:
                if response.status_code == 200:
                    attempts.succeeded()
                    return _json_object(response.content, action)
                failure = _error(response)
                if failure.fault not in _RETRIED:
                    raise failure
            delay = attempts.retry_delay(loop.time(), throttled=failure.fault is Fault.THROTTLING)
            if delay is None:
                break
            await self._sleep(delay)
        raise failure or UpstreamTimeout(f"no time left to send {action} to SQS")

    async def _send(
        self, action: str, body: bytes, auth: httpx.Auth, wait: float, ceiling: int | None
    ) -> httpx.Response:
        """One attempt, through ``auth``'s flow (which may resend it once, re-signed)."""
        base = self._client.timeout
        # A long poll is an answer that takes ``wait`` seconds by design.
        read = None if base.read is None else base.read + wait
        request = self._client.build_request(
            "POST",
            self._origin,
            content=body,
            headers={"X-Amz-Target": f"{TARGET_PREFIX}.{action}", "Content-Type": CONTENT_TYPE},
            timeout=httpx.Timeout(
                connect=base.connect, read=read, write=base.write, pool=base.pool
            ),
            extensions={ANSWER_CEILING: ceiling} if ceiling is not None else None,
        )
        return await self._client.send(request, auth=auth)


def _error(response: httpx.Response) -> AwsServiceError:
    """SQS's error answer, classified. Its message is kept for a person (it names the
    permission a role lacks), never for a refusal of the credentials."""
    code, message = parse_error(response.status_code, response.headers, response.content)
    return AwsServiceError(
        code,
        message,
        upstream_status=response.status_code,
        fault=classify_sqs(code, response.status_code),
        aws_request_id=response.headers.get("x-amzn-requestid"),
    )


def _message(item: object) -> SqsMessage | None:
    """One entry of ``Messages``; ``None`` (and a warning) for one that cannot be
    deleted or named: without a message id or a receipt handle."""
    if not isinstance(item, dict):
        log.warning("SQS answered ReceiveMessage with a message that is no object")
        return None
    message_id = item.get("MessageId")
    receipt_handle = item.get("ReceiptHandle")
    if not isinstance(message_id, str) or not isinstance(receipt_handle, str):
        log.warning(
            "SQS answered ReceiveMessage with a message without its id or receipt handle",
            extra={"message_id": message_id if isinstance(message_id, str) else None},
        )
        return None
    body = item.get("Body")
    attributes = item.get("Attributes")
    count = attributes.get("ApproximateReceiveCount") if isinstance(attributes, dict) else None
    return SqsMessage(
        message_id=message_id,
        receipt_handle=receipt_handle,
        # A message without a body is no event: the poller reads it as unreadable.
        body=body if isinstance(body, str) else "",
        receive_count=int(count)
        if isinstance(count, str) and count.isascii() and count.isdigit()
        else 1,
    )


def _json_object(content: bytes, action: str) -> dict[str, Any]:
    try:
        data = json.loads(content) if content else {}
    except ValueError as exc:
        raise UpstreamUnavailable(f"SQS answered {action} with a body that is not JSON") from exc
    if not isinstance(data, dict):
        raise UpstreamUnavailable(f"SQS answered {action} with a body that is not a JSON object")
    return data
