"""Fake AWS Marketplace Metering endpoint: an ASGI app speaking AWS JSON 1.1.

Each request is recorded, SigV4-verified with this package's own verifier,
checked against the per-action request quotas (token buckets, like AWS's
per-account rate limits), subjected to injected faults, validated against
botocore's service model and only then handed to the operation handlers in
``metering_actions``.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .asgi import Receive, Scope, Send, header, headers_of, read_body, send_response
from .faults import Fault, InjectedDisconnect
from .keys import KeyRegistry
from .metering_actions import MeteringState
from .metering_rules import AwsError, error_for_violations
from .model import operation_names, validate_input
from .sigv4 import SignatureFailure, verify_request

__all__ = ["CONTENT_TYPE", "SIGNING_NAME", "TARGET_PREFIX", "FakeMetering", "RecordedRequest"]

TARGET_PREFIX = "AWSMPMeteringService"
CONTENT_TYPE = "application/x-amz-json-1.1"
SIGNING_NAME = "aws-marketplace"

_INCOMPLETE_SIGNATURE_MESSAGE = (
    "Authorization header requires 'Credential' parameter. Authorization header requires "
    "'Signature' parameter. Authorization header requires 'SignedHeaders' parameter. "
    "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header."
)
# What AWS says for the credential errors a test can force with auth_failure().
_AUTH_FAULT_MESSAGES = {
    "ExpiredTokenException": "The security token included in the request is expired",
    "UnrecognizedClientException": "The security token included in the request is invalid.",
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "InvalidSignatureException": "The request signature we calculated does not match the "
    "signature you provided. Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details.",
    "IncompleteSignature": _INCOMPLETE_SIGNATURE_MESSAGE,
    "IncompleteSignatureException": _INCOMPLETE_SIGNATURE_MESSAGE,
    "MissingAuthenticationTokenException": "Missing Authentication Token",
    "AccessDeniedException": "User is not authorized to perform this action.",
}
_SERVER_ERROR_MESSAGES = {
    "InternalServiceErrorException": "An internal error occurred.",
    "ServiceUnavailableException": "Service Unavailable",
}
# What AWS says for a modelled error a test forces with modelled_error(), where
# the fake knows it; any other gets a plain sentence naming the code.
_MODELLED_ERROR_MESSAGES = {
    **_SERVER_ERROR_MESSAGES,
    "ThrottlingException": "Rate exceeded",
    "CustomerNotEntitledException": "The customer is not entitled to the product.",
    "DisabledApiException": "The API is disabled in the Region.",
    "ExpiredTokenException": "The submitted registration token has expired.",
}


@dataclass
class RecordedRequest:
    """One request as the fake received it, plus how it was answered."""

    action: str | None
    headers: list[tuple[str, str]]
    body: bytes
    access_key_id: str | None
    signature_valid: bool = False
    status: int = 0
    # A FaultKind that answered it, or "quota" if the request quota refused it.
    fault: str | None = None
    error_code: str | None = None
    # The x-amzn-RequestId the fake answered with, if it answered.
    request_id: str | None = None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def json(self) -> Any:
        """The body decoded as JSON (raises if it is not JSON)."""
        return json.loads(self.body)


def _claimed_access_key(headers: list[tuple[str, str]]) -> str | None:
    """Best-effort access key id from the Authorization header, even if malformed."""
    auth = header(headers, "authorization") or ""
    marker = "Credential="
    start = auth.find(marker)
    if start < 0:
        return None
    return auth[start + len(marker) :].split("/", 1)[0].split(",", 1)[0].strip() or None


@dataclass
class _TokenBucket:
    """A request quota: holds up to ``burst`` tokens, refilled at ``rate`` per second.

    Not locked itself; ``FakeMetering`` only touches it under its quota lock.
    """

    rate: float
    burst: float
    tokens: float
    updated: float

    def take(self, now: float) -> bool:
        """Refill for the time since the last call, then spend one token if there is one."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _reject_constant(name: str) -> float:
    # AWS's JSON parser has no NaN/Infinity; Python's would accept them.
    raise ValueError(f"invalid JSON constant {name}")


class FakeMetering(MeteringState):
    """ASGI fake of ``metering.marketplace`` (JSON 1.1, SigV4 service ``aws-marketplace``).

    Public state (all guarded by ``self.lock``): ``requests``,
    ``meter_usage_records``, ``batch_records``, ``client_tokens``,
    ``registrations``; configuration: ``products``, ``dimensions``,
    ``unsubscribed_customers``, ``invalid_licenses``, ``license_products``,
    ``registration_tokens``, ``expired_tokens``, ``unentitled``, ``meter_window``,
    ``batch_window``, ``future_tolerance``; fault injection via ``faults``;
    request quotas via ``set_quota``/``clear_quotas``, observed with
    ``throttled_by_quota``.
    """

    def __init__(
        self,
        registry: KeyRegistry,
        region: str = "us-east-1",
        products: set[str] | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """Create the fake; ``clock`` drives the business rules (timestamp windows).

        SigV4 clock-skew and key-expiry checks always use the wall clock, because
        real signers such as botocore sign with the wall clock.
        """
        super().__init__(products=products, clock=clock)
        self.registry = registry
        self.region = region
        self.requests: list[RecordedRequest] = []
        self._operations = frozenset(operation_names())
        self._handlers: dict[str, Callable[[dict[str, Any], RecordedRequest, int], Any]] = {
            "MeterUsage": lambda p, r, _n: self.meter_usage(p, r.access_key_id),
            "BatchMeterUsage": lambda p, _r, n: self.batch_meter_usage(p, n),
            "ResolveCustomer": lambda p, _r, _n: self.resolve_customer(p),
            "RegisterUsage": lambda p, _r, _n: self.register_usage(p),
        }
        self._requests_lock = threading.Lock()
        self._in_flight = 0
        self._quota_lock = threading.Lock()
        self._quotas: dict[str, _TokenBucket] = {}
        self._quota_throttled: Counter[str] = Counter()

    def reset(self) -> None:
        """Clear records, requests, faults, quotas and tokens (configuration sets too)."""
        self.reset_state()
        with self._requests_lock:
            self.requests.clear()
        with self._quota_lock:
            self._quotas.clear()
            self._quota_throttled.clear()

    def set_quota(self, action: str, rate: float, burst: float | None = None) -> None:
        """Limit ``action`` to ``rate`` requests per second, with bursts of ``burst``.

        A token bucket of capacity ``burst`` (default ``rate``), starting full and
        refilling continuously on the monotonic wall clock, not the business clock.
        A request that finds it empty gets 400 ``ThrottlingException`` and is not
        processed. AWS's defaults: MeterUsage 10/s, BatchMeterUsage 10/s,
        RegisterUsage 5/s. Setting a quota again replaces it with a full bucket.
        """
        capacity = rate if burst is None else burst
        if action not in self._operations:
            raise ValueError(f"unknown action {action!r}")
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError("quota rate must be a finite number >= 0")
        if not (math.isfinite(capacity) and capacity >= 1):
            raise ValueError("quota burst must be a finite number >= 1")
        with self._quota_lock:
            self._quotas[action] = _TokenBucket(rate, capacity, capacity, time.monotonic())

    def clear_quotas(self) -> None:
        """Remove every quota; ``throttled_by_quota`` keeps counting until ``reset``."""
        with self._quota_lock:
            self._quotas.clear()

    def throttled_by_quota(self, action: str | None = None) -> int:
        """How many requests (for ``action``, or in all) a quota has refused."""
        with self._quota_lock:
            if action is None:
                return sum(self._quota_throttled.values())
            return self._quota_throttled[action]

    def _take_quota(self, action: str | None) -> bool:
        """Spend a token of ``action``'s quota; ``False`` (and counted) if none is left."""
        if action is None:
            return True
        with self._quota_lock:
            bucket = self._quotas.get(action)
            if bucket is None or bucket.take(time.monotonic()):
                return True
            self._quota_throttled[action] += 1
            return False

    def requests_for(self, action: str) -> list[RecordedRequest]:
        """Snapshot of the recorded requests for one action."""
        with self._requests_lock:
            return [r for r in self.requests if r.action == action]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        with self._requests_lock:
            self._in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            with self._requests_lock:
                self._in_flight -= 1

    def quiet(self, timeout: float = 10.0) -> None:
        """Wait until no request is being handled (a delayed one still lands after its
        client gave up): what it records must not leak into the next test."""
        deadline = time.monotonic() + timeout
        while True:
            with self._requests_lock:
                if self._in_flight == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._in_flight} requests still in flight")
            time.sleep(0.02)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        headers = headers_of(scope)
        target = header(headers, "x-amz-target") or ""
        prefix, _, action = target.partition(".")
        recorded = RecordedRequest(
            action=action if prefix == TARGET_PREFIX and action else None,
            headers=headers,
            body=body,
            access_key_id=_claimed_access_key(headers),
        )
        with self._requests_lock:
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
                SIGNING_NAME,
            )
        except SignatureFailure as failure:
            await self._send_error(
                send, recorded, AwsError(failure.code, failure.message, failure.status)
            )
            return
        recorded.signature_valid = True

        if not self._take_quota(recorded.action):
            recorded.fault = "quota"
            await self._send_error(send, recorded, AwsError("ThrottlingException", "Rate exceeded"))
            return

        fault = self.faults.take(recorded.action)
        if fault is not None:
            recorded.fault = fault.kind
            if fault.kind == "delay":
                await asyncio.sleep(fault.seconds)
            else:
                await self._apply_fault(send, recorded, fault)
                return

        try:
            result = self._dispatch(scope, headers, body, recorded)
        except AwsError as error:
            await self._send_error(send, recorded, error)
            return
        recorded.status = 200
        await send_response(send, 200, json.dumps(result).encode(), self._headers(recorded))

    def _dispatch(
        self,
        scope: Scope,
        headers: list[tuple[str, str]],
        body: bytes,
        recorded: RecordedRequest,
    ) -> Any:
        """Protocol checks, model validation, then the operation handler."""
        action = recorded.action
        if scope["method"] != "POST" or action is None or action not in self._operations:
            raise AwsError("UnknownOperationException", "Unknown operation.")
        content_type = (header(headers, "content-type") or "").split(";", 1)[0].strip()
        if content_type.lower() != CONTENT_TYPE:
            # Coral cannot pick a protocol without the right content type.
            raise AwsError(
                "UnknownOperationException", f"Unsupported content type {content_type!r}."
            )
        try:
            params = json.loads(body or b"{}", parse_constant=_reject_constant)
        except ValueError as exc:
            raise AwsError("SerializationException", f"Malformed JSON body: {exc}") from None
        if not isinstance(params, dict):
            raise AwsError("SerializationException", "Request body must be a JSON object.")
        _reject_non_finite(params)
        violations = validate_input(action, params)
        if violations:
            raise error_for_violations(violations)
        return self._handlers[action](params, recorded, len(body))

    async def _apply_fault(self, send: Send, recorded: RecordedRequest, fault: Fault) -> None:
        if fault.kind == "drop_connection":
            recorded.status = 0
            # Start a chunked 200, send one chunk, then abort. Chunked rather than a
            # short Content-Length: botocore reads with enforce_content_length=False
            # and would accept a truncated fixed-length body as a (garbled) success,
            # but every HTTP client detects a missing terminating chunk.
            partial = b'{"MeteringRecordId": "'
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE.encode())],
                }
            )
            await send({"type": "http.response.body", "body": partial, "more_body": True})
            raise InjectedDisconnect("fault injected: drop_connection")
        if fault.kind == "throttle":
            error = AwsError(fault.code, "Rate exceeded", fault.status)
        elif fault.kind == "auth_failure":
            message = _AUTH_FAULT_MESSAGES.get(fault.code, "Access denied.")
            error = AwsError(fault.code, message, fault.status)
        elif fault.kind == "modelled_error":
            message = _MODELLED_ERROR_MESSAGES.get(fault.code, f"{fault.code} (injected).")
            error = AwsError(fault.code, message, fault.status)
        else:
            message = _SERVER_ERROR_MESSAGES.get(fault.code, "Internal failure.")
            error = AwsError(fault.code, message, fault.status)
        await self._send_error(send, recorded, error)

    def _headers(self, recorded: RecordedRequest) -> list[tuple[str, str]]:
        recorded.request_id = str(uuid.uuid4())
        return [("content-type", CONTENT_TYPE), ("x-amzn-requestid", recorded.request_id)]

    async def _send_error(self, send: Send, recorded: RecordedRequest, error: AwsError) -> None:
        recorded.status = error.status
        recorded.error_code = error.code
        body = json.dumps({"__type": error.code, "message": error.message}).encode()
        headers = [
            *self._headers(recorded),
            ("x-amzn-errortype", error.code),
            *error.extra_headers,
        ]
        await send_response(send, error.status, body, headers)


def _reject_non_finite(value: Any) -> None:
    """Reject numbers JSON allows but epoch/quantity handling cannot (e.g. 1e400)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise AwsError("SerializationException", "Number out of range.")
    if isinstance(value, dict):
        for item in value.values():
            _reject_non_finite(item)
    elif isinstance(value, list):
        for item in value:
            _reject_non_finite(item)
