"""Fake Amazon SQS: one queue, over AWS JSON 1.0, strict where a client could go wrong.

Every request is recorded, SigV4-verified with this package's own verifier for
service ``sqs`` in the queue's region (a wrong signature gets the error AWS
gives), subjected to injected faults, validated against botocore's ``sqs``
service model, and only then handled:

- ``ReceiveMessage`` with long polling: the request is held until a message is
  visible or ``WaitTimeSeconds`` ends (or the client hangs up); a received
  message is hidden for its visibility timeout (the request's, else the queue's)
  and, unless deleted, is visible again afterwards, received again with a new
  receipt handle and ``ApproximateReceiveCount`` one higher.
- ``DeleteMessage`` by the latest receipt handle of a message; deleting it again
  with that handle succeeds, as on AWS. A receipt handle that is unknown, or
  superseded by a later receive, gets ``ReceiptHandleIsInvalid`` (stricter than
  AWS, which may take a stale handle and delete nothing).
- ``ChangeMessageVisibility`` of a message in flight (``MessageNotInflight``
  otherwise), 0 to 43200 seconds.

An unknown queue URL gets ``QueueDoesNotExist``; ``deny_access`` makes the
queue refuse the caller (``AccessDeniedException``); ``faults`` arms the
shared fault plan (throttling, server errors, delays, dropped connections).
Errors are shaped as SQS's JSON answers are: ``__type`` with its namespace,
``message``, and the query API's code in ``x-amzn-query-error`` (which botocore
reports as the error's code). Requests go to ``POST /`` of the queue URL's
origin, as botocore sends them.

Test helpers (thread safe): ``send(body) -> message_id``, ``visible()``,
``in_flight()``, ``deleted``, ``receive_count(message_id)``, ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import botocore.loaders
import botocore.model
import botocore.session

from .asgi import Receive, Scope, Send, header, headers_of, read_body, send_response
from .faults import Fault, FaultPlan, InjectedDisconnect
from .keys import IssuedKey, KeyRegistry
from .model import validate_shape
from .sigv4 import SignatureFailure, verify_request

__all__ = [
    "SQS_CONTENT_TYPE",
    "SQS_SIGNING_NAME",
    "SQS_TARGET_PREFIX",
    "FakeSqs",
    "SqsError",
    "SqsRequest",
    "sqs_client",
]

SQS_TARGET_PREFIX = "AmazonSQS"
SQS_CONTENT_TYPE = "application/x-amz-json-1.0"
SQS_SIGNING_NAME = "sqs"
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_WAIT_SECONDS = 20
MAX_VISIBILITY_TIMEOUT = 43200
_SQS_NAMESPACE = "com.amazonaws.sqs"
# The front end's namespace, for what is refused before SQS sees the request.
_COMMON_NAMESPACE = "com.amazon.coral.service"
# What the query API called the front end's refusals (x-amzn-query-error).
_QUERY_CODES = {
    "UnrecognizedClientException": "InvalidClientTokenId",
    "InvalidSignatureException": "SignatureDoesNotMatch",
    "IncompleteSignatureException": "IncompleteSignature",
    "MissingAuthenticationTokenException": "MissingAuthenticationToken",
    "ExpiredTokenException": "ExpiredToken",
    "AccessDeniedException": "AccessDenied",
    "QueueDoesNotExist": "AWS.SimpleQueueService.NonExistentQueue",
    "MessageNotInflight": "AWS.SimpleQueueService.MessageNotInflight",
    "UnsupportedOperation": "AWS.SimpleQueueService.UnsupportedOperation",
}
_FRONT_END_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "ExpiredTokenException",
        "AccessDeniedException",
        "UnknownOperationException",
        "SerializationException",
    }
)
# The characters SQS takes in a message body.
_ALLOWED_BODY = re.compile("^[\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]+$")
# How often a held ReceiveMessage looks for a visible message.
_POLL_INTERVAL = 0.02


@dataclass
class SqsError(Exception):
    """An SQS error answer: ``code`` (``__type``'s name), ``message``, HTTP ``status``."""

    code: str
    message: str
    status: int = 400

    def __str__(self) -> str:
        """Render as ``Code: message`` for assertion output."""
        return f"{self.code}: {self.message}"

    def body(self) -> bytes:
        """The JSON body, ``__type`` in its namespace."""
        namespace = _COMMON_NAMESPACE if self.code in _FRONT_END_CODES else _SQS_NAMESPACE
        return json.dumps({"__type": f"{namespace}#{self.code}", "message": self.message}).encode()

    def query_error(self) -> str:
        """The ``x-amzn-query-error`` header: the query API's code and who is at fault."""
        who = "Receiver" if self.status >= 500 else "Sender"
        return f"{_QUERY_CODES.get(self.code, self.code)};{who}"


@dataclass
class SqsRequest:
    """One request as the fake received it, and how it was answered."""

    action: str | None
    headers: list[tuple[str, str]]
    body: bytes
    access_key_id: str | None
    # The signature's scope: ``date/region/service/aws4_request``, as claimed.
    scope: str | None
    signature_valid: bool = False
    status: int = 0
    error_code: str | None = None
    fault: str | None = None

    def json(self) -> Any:
        """The body decoded as JSON (raises if it is not JSON)."""
        return json.loads(self.body)


@dataclass
class _Message:
    message_id: str
    body: str
    sent_ms: int
    receive_count: int = 0
    first_receive_ms: int | None = None
    # time.monotonic() from which it is visible.
    visible_at: float = 0.0
    receipt_handle: str | None = None
    deleted: bool = False


@dataclass
class _Held:
    """A ReceiveMessage waiting for messages."""

    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


def _service_model() -> Any:
    loader = botocore.loaders.create_loader()
    raw = loader.load_service_model("sqs", "service-2")
    return botocore.model.ServiceModel(raw, service_name="sqs")


_MODEL = _service_model()


def _authorization_part(headers: list[tuple[str, str]], index: int) -> str | None:
    """Part ``index`` of the Authorization header's Credential (0: the key id, 1-4 the
    scope), as claimed, even if malformed."""
    auth = header(headers, "authorization") or ""
    marker = "Credential="
    start = auth.find(marker)
    if start < 0:
        return None
    credential = auth[start + len(marker) :].split(",", 1)[0].strip()
    parts = credential.split("/", 1)
    if index == 0:
        return parts[0] or None
    return parts[1] if len(parts) > 1 else None


class FakeSqs:
    """ASGI fake of one SQS queue (see the module docstring).

    ``queue_path`` is ``/<account>/<name>``; the queue URL is the server's URL and
    that path (``queue_url(server_url)``), and requests name it in ``QueueUrl``.
    """

    def __init__(
        self,
        registry: KeyRegistry,
        *,
        region: str = "us-east-1",
        account: str = "123456789012",
        name: str = "marketplace-events",
        visibility_timeout: int = 30,
    ) -> None:
        """A queue ``name`` of ``account`` in ``region``, hiding a received message for
        ``visibility_timeout`` seconds unless the receive asks otherwise."""
        self.registry = registry
        self.region = region
        self.account = account
        self.name = name
        self.visibility_timeout = visibility_timeout
        self.faults = FaultPlan()
        self.requests: list[SqsRequest] = []
        self.exists = True
        self._lock = threading.Lock()
        self._messages: dict[str, _Message] = {}
        # receipt handle -> message id, for every handle ever given out.
        self._handles: dict[str, str] = {}
        self._denied: frozenset[str] | None = frozenset()
        self._in_flight_requests = 0
        self._closing = False

    @property
    def queue_path(self) -> str:
        """``/<account>/<name>``: the path of the queue's URL."""
        return f"/{self.account}/{self.name}"

    @property
    def arn(self) -> str:
        """The queue's ARN."""
        return f"arn:aws:sqs:{self.region}:{self.account}:{self.name}"

    def queue_url(self, server_url: str) -> str:
        """The queue's URL on the server at ``server_url``."""
        return server_url.rstrip("/") + self.queue_path

    # --- test helpers (any thread) -----------------------------------------------------

    def send(self, body: str) -> str:
        """Put a message on the queue, visible at once; its message id."""
        if not body or not _ALLOWED_BODY.match(body):
            raise ValueError("SQS takes a body of 1 or more characters it allows")
        if len(body.encode("utf-8")) > MAX_MESSAGE_BYTES:
            raise ValueError(f"SQS takes a body of {MAX_MESSAGE_BYTES} bytes at most")
        message_id = str(uuid.uuid4())
        with self._lock:
            self._messages[message_id] = _Message(message_id, body, int(time.time() * 1000))
        return message_id

    def visible(self) -> int:
        """Messages that a receive would get now."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for m in self._messages.values() if not m.deleted and m.visible_at <= now)

    def in_flight(self) -> int:
        """Messages received and hidden, not deleted."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for m in self._messages.values() if not m.deleted and m.visible_at > now)

    @property
    def deleted(self) -> int:
        """Messages deleted."""
        with self._lock:
            return sum(1 for m in self._messages.values() if m.deleted)

    def is_deleted(self, message_id: str) -> bool:
        """Whether the message ``message_id`` was deleted."""
        with self._lock:
            return self._messages[message_id].deleted

    def receive_count(self, message_id: str) -> int:
        """How many times the message has been received."""
        with self._lock:
            return self._messages[message_id].receive_count

    def deny_access(self, actions: Iterable[str] | None = None) -> None:
        """Refuse ``actions`` (every action: ``None``) to every caller, as a queue policy
        or a role without the permission does, until ``allow_access``."""
        with self._lock:
            self._denied = None if actions is None else frozenset(actions)

    def allow_access(self) -> None:
        """Take back ``deny_access``."""
        with self._lock:
            self._denied = frozenset()

    def requests_for(self, action: str) -> list[SqsRequest]:
        """Snapshot of the recorded requests for one action."""
        with self._lock:
            return [r for r in self.requests if r.action == action]

    def close(self) -> None:
        """Answer held receives at once (before the server stops)."""
        self._closing = True

    def quiet(self, timeout: float = 10.0) -> None:
        """Wait until no request is being handled."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._in_flight_requests == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._in_flight_requests} requests still in flight")
            time.sleep(0.02)

    # --- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        with self._lock:
            self._in_flight_requests += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight_requests -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        headers = headers_of(scope)
        target = header(headers, "x-amz-target") or ""
        prefix, _, action = target.partition(".")
        recorded = SqsRequest(
            action=action if prefix == SQS_TARGET_PREFIX and action else None,
            headers=headers,
            body=body,
            access_key_id=_authorization_part(headers, 0),
            scope=_authorization_part(headers, 1),
        )
        with self._lock:
            self.requests.append(recorded)
        try:
            verify_request(
                scope["method"],
                (scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1"),
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                body,
                self.registry,
                self.region,
                SQS_SIGNING_NAME,
            )
        except SignatureFailure as failure:
            await self._send_error(
                send, recorded, SqsError(failure.code, failure.message, failure.status)
            )
            return
        recorded.signature_valid = True
        fault = self.faults.take(recorded.action)
        if fault is not None:
            recorded.fault = fault.kind
            if fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
            else:
                await self._apply_fault(send, recorded, fault)
                return
        try:
            params = self._check(scope, headers, body, recorded)
            result = await self._dispatch(recorded, params, receive)
        except SqsError as error:
            await self._send_error(send, recorded, error)
            return
        recorded.status = 200
        await send_response(send, 200, json.dumps(result).encode(), self._headers())

    def _check(
        self, scope: Scope, headers: list[tuple[str, str]], body: bytes, recorded: SqsRequest
    ) -> dict[str, Any]:
        """The protocol, the caller's access, the model, the queue: the request's
        parameters, or the error SQS gives."""
        action = recorded.action
        if scope["method"] != "POST" or action is None or action not in _MODEL.operation_names:
            raise SqsError("UnknownOperationException", "Unknown operation.")
        content_type = (header(headers, "content-type") or "").split(";", 1)[0].strip()
        if content_type.lower() != SQS_CONTENT_TYPE:
            raise SqsError(
                "UnknownOperationException", f"Unsupported content type {content_type!r}."
            )
        if scope["path"] != "/":
            raise SqsError("UnknownOperationException", "Requests go to POST / of the origin.")
        try:
            params = json.loads(body or b"{}")
        except ValueError:
            raise SqsError("SerializationException", "Malformed JSON body.") from None
        if not isinstance(params, dict):
            raise SqsError("SerializationException", "Request body must be a JSON object.")
        with self._lock:
            denied = self._denied
        if denied is None or action in denied:
            key = self.registry.lookup(recorded.access_key_id or "")
            principal = key.principal if key is not None else "unknown"
            permission = f"sqs:{action.lower()}"
            raise SqsError(
                "AccessDeniedException",
                f"User: {principal} is not authorized to perform: {permission} on resource: "
                f"{self.arn} because no identity-based policy allows the {permission} action",
                403,
            )
        input_shape = _MODEL.operation_model(action).input_shape
        violations = validate_shape(input_shape, params, "") if input_shape is not None else []
        if violations:
            missing = [v for v in violations if v.message.endswith("Member must not be null")]
            if missing:
                name = missing[0].path[:1].upper() + missing[0].path[1:]
                raise SqsError(
                    "MissingParameter", f"The request must contain the parameter {name}."
                )
            raise SqsError("InvalidParameterValue", violations[0].message)
        queue_url = params.get("QueueUrl")
        if not self.exists or not isinstance(queue_url, str) or not self._names_queue(queue_url):
            raise SqsError("QueueDoesNotExist", "The specified queue does not exist.")
        return params

    def _names_queue(self, queue_url: str) -> bool:
        match = re.fullmatch(r"https?://[^/]+(/[^?#]*)", queue_url)
        return match is not None and match.group(1) == self.queue_path

    async def _dispatch(
        self, recorded: SqsRequest, params: dict[str, Any], receive: Receive
    ) -> dict[str, Any]:
        if recorded.action == "ReceiveMessage":
            return await self._receive_message(params, receive)
        if recorded.action == "DeleteMessage":
            self._delete_message(params)
            return {}
        if recorded.action == "ChangeMessageVisibility":
            self._change_visibility(params)
            return {}
        raise SqsError(
            "UnsupportedOperation", f"The fake does not implement {recorded.action}.", 400
        )

    async def _receive_message(self, params: dict[str, Any], receive: Receive) -> dict[str, Any]:
        count = _bounded(params, "MaxNumberOfMessages", 1, 10, default=1)
        wait = _bounded(params, "WaitTimeSeconds", 0, MAX_WAIT_SECONDS, default=0)
        visibility = _bounded(
            params,
            "VisibilityTimeout",
            0,
            MAX_VISIBILITY_TIMEOUT,
            default=self.visibility_timeout,
        )
        names = set(params.get("MessageSystemAttributeNames") or ())
        names |= set(params.get("AttributeNames") or ())
        held = _Held()
        watcher = asyncio.create_task(_watch_disconnect(receive, held))
        try:
            deadline = time.monotonic() + wait
            while True:
                taken = self._take(count, visibility)
                if taken or time.monotonic() >= deadline or held.disconnected.is_set():
                    break
                if self._closing:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_POLL_INTERVAL):
                        await held.disconnected.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if not taken:
            return {}
        return {"Messages": [_rendered(message, handle, names) for message, handle in taken]}

    def _take(self, count: int, visibility: int) -> list[tuple[_Message, str]]:
        """Receive up to ``count`` visible messages: hide them, new receipt handles."""
        now = time.monotonic()
        taken: list[tuple[_Message, str]] = []
        with self._lock:
            for message in self._messages.values():
                if len(taken) == count:
                    break
                if message.deleted or message.visible_at > now:
                    continue
                handle = secrets.token_urlsafe(96)
                message.receive_count += 1
                if message.first_receive_ms is None:
                    message.first_receive_ms = int(time.time() * 1000)
                message.visible_at = now + visibility
                message.receipt_handle = handle
                self._handles[handle] = message.message_id
                taken.append((message, handle))
        return taken

    def _latest(self, handle: str) -> _Message:
        """The message whose latest receipt handle is ``handle``."""
        message_id = self._handles.get(handle)
        message = self._messages.get(message_id) if message_id is not None else None
        if message is None or message.receipt_handle != handle:
            raise SqsError(
                "ReceiptHandleIsInvalid",
                f'The input receipt handle "{handle}" is not a valid receipt handle.',
            )
        return message

    def _delete_message(self, params: dict[str, Any]) -> None:
        with self._lock:
            message = self._latest(params["ReceiptHandle"])
            message.deleted = True

    def _change_visibility(self, params: dict[str, Any]) -> None:
        seconds = _bounded(params, "VisibilityTimeout", 0, MAX_VISIBILITY_TIMEOUT, default=None)
        now = time.monotonic()
        with self._lock:
            message = self._latest(params["ReceiptHandle"])
            if message.deleted or message.visible_at <= now:
                raise SqsError(
                    "MessageNotInflight",
                    f"Value {params['ReceiptHandle']} for parameter ReceiptHandle is invalid. "
                    "Reason: Message does not exist or is not available for visibility "
                    "timeout change.",
                )
            message.visible_at = now + seconds

    async def _apply_fault(self, send: Send, recorded: SqsRequest, fault: Fault) -> None:
        if fault.kind == "drop_connection":
            # A chunked 200 cut short: every HTTP client notices the missing last chunk.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", SQS_CONTENT_TYPE.encode())],
                }
            )
            await send({"type": "http.response.body", "body": b'{"Messages": [', "more_body": True})
            raise InjectedDisconnect("fault injected: drop_connection")
        if fault.kind == "throttle":
            error = SqsError(fault.code, "Rate exceeded", fault.status)
        elif fault.kind == "auth_failure":
            error = SqsError(fault.code, "Access to the resource is denied.", fault.status)
        else:
            error = SqsError(fault.code, "Internal failure.", fault.status)
        await self._send_error(send, recorded, error)

    def _headers(self) -> list[tuple[str, str]]:
        return [("content-type", SQS_CONTENT_TYPE), ("x-amzn-requestid", str(uuid.uuid4()))]

    async def _send_error(self, send: Send, recorded: SqsRequest, error: SqsError) -> None:
        recorded.status = error.status
        recorded.error_code = error.code
        headers = [*self._headers(), ("x-amzn-query-error", error.query_error())]
        await send_response(send, error.status, error.body(), headers)


def _bounded(params: dict[str, Any], name: str, low: int, high: int, *, default: int | None) -> int:
    """An integer parameter within SQS's range, or the ``InvalidParameterValue`` it gives."""
    value = params.get(name, default)
    if value is None:
        raise SqsError("MissingParameter", f"The request must contain the parameter {name}.")
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SqsError(
            "InvalidParameterValue",
            f"Value {value} for parameter {name} is invalid. "
            f"Reason: Must be between {low} and {high}, if provided.",
        )
    return value


def _rendered(message: _Message, handle: str, names: set[str]) -> dict[str, Any]:
    """One message of a ReceiveMessage answer, with the system attributes asked for."""
    every = {
        "ApproximateReceiveCount": str(message.receive_count),
        "SentTimestamp": str(message.sent_ms),
        "ApproximateFirstReceiveTimestamp": str(message.first_receive_ms),
        "SenderId": "AIDAFAKESQSSENDER",
    }
    attributes = every if "All" in names else {k: v for k, v in every.items() if k in names}
    rendered: dict[str, Any] = {
        "MessageId": message.message_id,
        "ReceiptHandle": handle,
        "MD5OfBody": hashlib.md5(message.body.encode("utf-8"), usedforsecurity=False).hexdigest(),
        "Body": message.body,
    }
    if attributes:
        rendered["Attributes"] = attributes
    return rendered


async def _watch_disconnect(receive: Receive, held: _Held) -> None:
    """Set ``held.disconnected`` when the client hangs up on a held request."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            held.disconnected.set()
            return
        # Nothing more of the request is due; never spin on whatever else arrives.
        await asyncio.sleep(_POLL_INTERVAL)


def sqs_client(
    url: str,
    key: IssuedKey,
    *,
    region: str = "us-east-1",
    secret: str | None = None,
    read_timeout: float = 30.0,
) -> Any:
    """botocore's own SQS client (AWS JSON 1.0 in botocore 1.44) for the fake at ``url``,
    signing with ``key``, without retries so that every answer shows."""
    from botocore.config import Config

    return botocore.session.get_session().create_client(
        "sqs",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=secret or key.secret_access_key,
        aws_session_token=key.session_token,
        config=Config(
            retries={"total_max_attempts": 1, "mode": "standard"}, read_timeout=read_timeout
        ),
    )
