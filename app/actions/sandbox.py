"""Sandbox mode: AWS's answers, computed locally, with AWS's idempotency rules. Sends nothing.

What a caller can rely on (it is what users' own CI runs against):

- MeterUsage keeps one record per (ProductCode, UsageDimension, hour): the
  same content again returns the same MeteringRecordId, other content is
  ``DuplicateRequestException``; a ClientToken reused with other parameters
  is ``IdempotencyConflictException``; ``DryRun`` answers ``DryRunOperation``.
- BatchMeterUsage keeps one record per (LicenseArn or ProductCode, customer,
  Dimension, hour): ``Success`` (same id for the same content) or
  ``DuplicateRecord``. Unsubscribed customers come back
  ``CustomerNotSubscribed``: a ``CustomerIdentifier`` that starts with
  ``unsubscribed``, or a ``CustomerAWSAccountId`` that starts with ``000000``
  (``UNSUBSCRIBED_PREFIXES``); the usage queue's dispatcher sends here too, so
  such records end ``rejected``.
- ResolveCustomer answers a stable customer (of the configured product) for
  any token; tokens starting
  with ``expired`` give ``ExpiredTokenException``, with ``invalid``
  ``InvalidTokenException``.
- RegisterUsage answers a JWT (HS256, signed with a key made at start) for
  PublicKeyVersion 1, ``InvalidPublicKeyVersionException`` otherwise.
- **Every other answer, rehearsed**: a call made while ``rehearsing(code)`` (the
  routes do it for a request with ``X-Metering-Sandbox-Error: <code>``) is
  answered with ``code`` as if AWS had answered it (any error the service model
  lists for the action), or as if the network or AWS had failed the sidecar
  (``Timeout``, ``CredentialsRefused``): the same error, status, ``code`` and
  ``retryable`` as the AWS backend gives a caller after its retries, at once.
  Another code is a ``RequestInvalid`` naming the ones the action takes.

Records older than AWS's longest window are forgotten, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import secrets
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from app.actions.backend import BackendResponse
from app.aws.classify import modelled_errors, modelled_status, settled
from app.metering.billing import HOUR, hour_of, quantity_value, utc_now
from app.metering.errors import (
    AwsServiceError,
    CredentialsRejected,
    FieldError,
    MeteringError,
    RequestInvalid,
    UpstreamTimeout,
)
from app.metering.grains import batch_grain_id_of
from app.metering.shapes import parse_timestamp
from app.runtime.retry import Attempts

_FORGET_AFTER = timedelta(hours=25)
_PUBLIC_KEY_ROTATION = timedelta(days=30)

# The request header that asks the sandbox to rehearse an answer.
REHEARSAL_HEADER = "X-Metering-Sandbox-Error"
# The sidecar's own failures a caller can rehearse besides AWS's modelled errors:
# AWS not answering in time (504 UpstreamTimeout), and AWS refusing the sidecar's
# credentials even freshly fetched ones (502 CredentialsRejected).
TIMEOUT = "Timeout"
CREDENTIALS_REFUSED = "CredentialsRefused"
SIDECAR_FAULTS = (TIMEOUT, CREDENTIALS_REFUSED)
# BatchMeterUsage customers the sandbox treats as unsubscribed, by identifier form.
# Six leading zeros: no account id a test makes up by chance, and none the sandbox's
# own ResolveCustomer hands out (it moves such an id off the prefix).
UNSUBSCRIBED_PREFIXES = {"CustomerIdentifier": "unsubscribed", "CustomerAWSAccountId": "000000"}

# What the call being served asked to rehearse; set only around a call (``rehearsing``),
# so background work (the queue's dispatcher) never sees a caller's rehearsal.
_rehearsal: ContextVar[str | None] = ContextVar("sandbox_rehearsal", default=None)


@contextlib.contextmanager
def rehearsing(code: str | None) -> Iterator[None]:
    """Have the sandbox answer the calls made inside with ``code`` (None: normally).
    The AWS backend never reads it: in aws mode the request header changes nothing."""
    token = _rehearsal.set(code)
    try:
        yield
    finally:
        _rehearsal.reset(token)


def rehearsable(action: str) -> tuple[str, ...]:
    """The answers ``action`` can rehearse: its modelled errors, then the sidecar's faults."""
    return (*sorted(modelled_errors().get(action, frozenset())), *SIDECAR_FAULTS)


def unsubscribed(record: Mapping[str, Any]) -> bool:
    """Whether the sandbox answers ``record`` ``CustomerNotSubscribed``."""
    return any(
        isinstance(record.get(form), str) and record[form].startswith(prefix)
        for form, prefix in UNSUBSCRIBED_PREFIXES.items()
    )


def _allocations(raw: object) -> frozenset[tuple[Decimal, frozenset[tuple[str, str]]]]:
    allocations = raw if isinstance(raw, list) else []
    return frozenset(
        (
            quantity_value(
                a.get("AllocatedUsageQuantity"), a.get("AllocatedUsageQuantityAsDecimal")
            ),
            frozenset((t["Key"], t["Value"]) for t in a.get("Tags") or []),
        )
        for a in allocations
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _fail(action: str, code: str, message: str, status: int | None = None) -> AwsServiceError:
    """AWS's answer ``code`` to ``action``, with AWS's status for it, read as the AWS
    backend finally reads it (``settled``: the sandbox has no credentials to refuse)."""
    status = status or modelled_status(code)
    return AwsServiceError(
        code,
        message,
        upstream_status=status,
        fault=settled(code, status, action),
        aws_request_id=str(uuid.uuid4()),
    )


def _rehearsed(action: str, code: str, attempts: Attempts) -> MeteringError:
    """The error the AWS backend gives a caller when AWS (or the way to it) answers
    ``action`` with ``code`` on every attempt; ``RequestInvalid`` for a code ``action``
    cannot meet."""
    allowed = rehearsable(action)
    if code not in allowed:
        # The value is not repeated: a header may hold anything a caller pasted.
        return RequestInvalid(
            [
                FieldError(
                    REHEARSAL_HEADER,
                    f"not an answer {action} can rehearse; one of: {', '.join(allowed)}",
                )
            ]
        )
    request_id = str(uuid.uuid4())
    if code == TIMEOUT:
        return UpstreamTimeout(f"AWS did not answer {action} in time (rehearsed by the sandbox)")
    if code == CREDENTIALS_REFUSED:
        return CredentialsRejected(
            f"AWS refused freshly obtained credentials for {action} (UnrecognizedClientException;"
            " rehearsed by the sandbox)",
            aws_request_id=request_id,
        )
    error = _fail(action, code, f"{code} (rehearsed by the sandbox: {REHEARSAL_HEADER})")
    if error.status == 429:
        # As the AWS backend says once its retries are spent: when a retry may pass.
        error.retry_after = max(1, math.ceil(attempts.next_ceiling()))
    return error


class SandboxBackend:
    """An in-process stand-in for AWS Marketplace Metering."""

    def __init__(
        self, *, product_code: str | None = None, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self._product_code = product_code or "sandbox-product"
        self._clock = clock
        self._meter_grains: dict[tuple[Any, ...], tuple[object, str]] = {}
        self._batch_grains: dict[tuple[Any, ...], tuple[object, str]] = {}
        self._client_tokens: dict[str, tuple[object, datetime]] = {}
        self._jwt_key = secrets.token_bytes(32)
        self._last_prune = clock()

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        attempts: Attempts,
    ) -> BackendResponse:
        """Answer ``action`` as AWS would: one attempt, answered at once."""
        attempts.start(asyncio.get_running_loop().time())
        rehearsal = _rehearsal.get()
        if rehearsal is not None:
            raise _rehearsed(action, rehearsal, attempts)
        self._prune()
        handler = {
            "MeterUsage": self._meter_usage,
            "BatchMeterUsage": self._batch_meter_usage,
            "ResolveCustomer": self._resolve_customer,
            "RegisterUsage": self._register_usage,
        }.get(action)
        if handler is None:
            raise _fail(action, "UnknownOperationException", f"unknown operation {action}")
        return BackendResponse(handler(payload), str(uuid.uuid4()))

    def _prune(self) -> None:
        now = self._clock()
        if now - self._last_prune < HOUR:
            return
        self._last_prune = now
        horizon = hour_of(now) - _FORGET_AFTER
        for grains in (self._meter_grains, self._batch_grains):
            for key in [k for k in grains if k[-1] < horizon]:
                del grains[key]
        for token in [t for t, (_, at) in self._client_tokens.items() if at < horizon]:
            del self._client_tokens[token]

    def _meter_usage(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        if payload.get("DryRun"):
            raise _fail(
                "MeterUsage",
                "DryRunOperation",
                "Request would have succeeded, but DryRun flag is set.",
                412,
            )
        timestamp = parse_timestamp(payload["Timestamp"])
        content = (
            quantity_value(payload.get("UsageQuantity"), payload.get("UsageQuantityAsDecimal")),
            _allocations(payload.get("UsageAllocations")),
        )
        token = payload.get("ClientToken")
        if token is not None:
            parameters = json.dumps(
                {k: v for k, v in payload.items() if k != "ClientToken"},
                default=str,
                sort_keys=True,
            )
            seen = self._client_tokens.get(token)
            if seen is not None and seen[0] != parameters:
                raise _fail(
                    "MeterUsage",
                    "IdempotencyConflictException",
                    "ClientToken was already used with different parameters.",
                )
            self._client_tokens.setdefault(token, (parameters, hour_of(timestamp)))
        grain = (payload["ProductCode"], payload["UsageDimension"], hour_of(timestamp))
        known = self._meter_grains.get(grain)
        if known is None:
            record_id = str(uuid.uuid4())
            self._meter_grains[grain] = (content, record_id)
            return {"MeteringRecordId": record_id}
        if known[0] != content:
            raise _fail(
                "MeterUsage",
                "DuplicateRequestException",
                "A metering record for this product, dimension and hour already exists "
                "with a different quantity.",
            )
        return {"MeteringRecordId": known[1]}

    def _batch_meter_usage(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        results: list[dict[str, Any]] = []
        for record in payload.get("UsageRecords", []):
            timestamp = parse_timestamp(record["Timestamp"])
            echo = {**record, "Timestamp": timestamp.timestamp()}
            if unsubscribed(record):
                results.append({"UsageRecord": echo, "Status": "CustomerNotSubscribed"})
                continue
            grain = batch_grain_id_of(record, payload.get("ProductCode"))
            content = (
                quantity_value(record.get("Quantity"), record.get("QuantityAsDecimal")),
                _allocations(record.get("UsageAllocations")),
            )
            known = self._batch_grains.get(grain)
            if known is None:
                record_id = str(uuid.uuid4())
                self._batch_grains[grain] = (content, record_id)
                results.append(
                    {"UsageRecord": echo, "MeteringRecordId": record_id, "Status": "Success"}
                )
            elif known[0] == content:
                results.append(
                    {"UsageRecord": echo, "MeteringRecordId": known[1], "Status": "Success"}
                )
            else:
                results.append({"UsageRecord": echo, "Status": "DuplicateRecord"})
        return {"Results": results, "UnprocessedRecords": []}

    def _resolve_customer(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        token = str(payload["RegistrationToken"])
        if token.startswith("expired"):
            raise _fail(
                "ResolveCustomer", "ExpiredTokenException", "The registration token has expired."
            )
        if token.startswith("invalid"):
            raise _fail(
                "ResolveCustomer", "InvalidTokenException", "The registration token is invalid."
            )
        digest = hashlib.sha256(token.encode()).hexdigest()
        account = str(int(digest[:15], 16))[-12:].rjust(12, "1")
        if account.startswith(UNSUBSCRIBED_PREFIXES["CustomerAWSAccountId"]):
            # A customer just resolved is subscribed: never the unsubscribed trigger.
            account = "1" + account[1:]
        return {
            "CustomerIdentifier": "",
            "CustomerAWSAccountId": account,
            "ProductCode": self._product_code,
            "LicenseArn": f"arn:aws:license-manager::{account}:license:l-{digest[:32]}",
            "Metadata": {"AgreementId": f"agmt-{digest[32:58]}"},
        }

    def _register_usage(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        if payload.get("PublicKeyVersion") != 1:
            raise _fail(
                "RegisterUsage", "InvalidPublicKeyVersionException", "PublicKeyVersion must be 1."
            )
        now = self._clock()
        header = {"alg": "HS256", "typ": "JWT", "kid": "metering-sidecar-sandbox"}
        claims = {
            "productCode": payload["ProductCode"],
            "publicKeyVersion": 1,
            "nonce": payload.get("Nonce"),
            "issuedAt": now.isoformat(),
            "sandbox": True,
        }
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = hmac.new(self._jwt_key, signing_input.encode(), hashlib.sha256).digest()
        rotation = hour_of(now) + _PUBLIC_KEY_ROTATION
        return {
            "Signature": f"{signing_input}.{_b64(signature)}",
            "PublicKeyRotationTimestamp": rotation.timestamp(),
        }
