"""AWS Marketplace's subscription events, read into one shape whatever carried them.

A seller's SQS queue receives the same lifecycle in two dialects:

- **EventBridge** (``source: aws.agreement-marketplace``, us-east-1): ``detail-type``
  ``Purchase Agreement Created|Amended|Ended - Manufacturer`` (or ``- Proposer``),
  ``License Updated - Manufacturer``, ``License Deprovisioned - Manufacturer``;
  ``detail`` has ``agreement.id``, ``product.code``, ``license.arn`` and
  ``acceptor.accountId``. The event's ``id`` names it.
- **SNS** (``aws-mp-subscription-notification``: ``action`` ``subscribe-success``,
  ``subscribe-fail``, ``unsubscribe-pending``, ``unsubscribe-success``;
  ``aws-mp-entitlement-notification``: ``entitlement-updated``), with
  ``customer-identifier`` and ``product-code``; in the SNS envelope
  (``Type: Notification``, ``Message`` a JSON string, ``MessageId``) or raw.

``parse_event`` turns any of them into a ``SubscriptionEvent`` whose ``kind`` says
what it means for metering:

- ``ending``: the final hour opens (``unsubscribe-pending``; ``Purchase Agreement
  Ended`` or ``License Deprovisioned``: AWS's pages disagree on which opens it, so
  whichever comes first does, and nothing is lost by sending early);
- ``ended``: no record is taken any more (``unsubscribe-success``);
- ``subscribed``: the customer is (again) active (``subscribe-success``,
  ``Purchase Agreement Created``);
- ``changed``: the subscription changed, not its life (``entitlement-updated``,
  ``Purchase Agreement Amended``, ``License Updated``);
- ``failed``: a subscription that never started (``subscribe-fail``);
- ``unknown``: a type this sidecar does not know: recorded, changes nothing.

A body that is no such event raises ``UnreadableEvent``; its message never
repeats the body.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from app.metering.shapes import parse_timestamp

EVENTBRIDGE_SOURCE = "aws.agreement-marketplace"


class EventKind(StrEnum):
    """What an event means for a customer's metering (see the module docstring)."""

    SUBSCRIBED = "subscribed"
    ENDING = "ending"
    ENDED = "ended"
    CHANGED = "changed"
    FAILED = "failed"
    UNKNOWN = "unknown"


# SNS ``action`` -> kind.
_SNS_KINDS = {
    "subscribe-success": EventKind.SUBSCRIBED,
    "subscribe-fail": EventKind.FAILED,
    "unsubscribe-pending": EventKind.ENDING,
    "unsubscribe-success": EventKind.ENDED,
    "entitlement-updated": EventKind.CHANGED,
}
# EventBridge ``detail-type`` without its role (`` - Manufacturer``/`` - Proposer``) -> kind.
_EVENTBRIDGE_KINDS = {
    "Purchase Agreement Created": EventKind.SUBSCRIBED,
    "Purchase Agreement Amended": EventKind.CHANGED,
    "Purchase Agreement Ended": EventKind.ENDING,
    "License Updated": EventKind.CHANGED,
    "License Deprovisioned": EventKind.ENDING,
}
_ROLES = (" - Manufacturer", " - Proposer")


class UnreadableEvent(ValueError):
    """The body is no AWS Marketplace event the sidecar can read."""


@dataclass(frozen=True, slots=True)
class SubscriptionEvent:
    """One subscription event, whatever dialect carried it.

    ``event_id`` names it for idempotency: EventBridge's ``id``, the SNS
    ``MessageId``, else the carrier's id (the SQS message's), else a digest of
    the body. ``type`` is AWS's own name for it (``unsubscribe-pending``,
    ``Purchase Agreement Ended - Manufacturer``).
    """

    event_id: str
    source: str  # "eventbridge" or "sns"
    type: str
    kind: EventKind
    time: datetime | None
    customer_identifier: str | None = None
    customer_aws_account_id: str | None = None
    product_code: str | None = None
    license_arn: str | None = None
    agreement_id: str | None = None

    @property
    def license_id(self) -> str | None:
        """The ``l-...`` id of ``license_arn`` (AWS's examples sometimes drop ``arn:``)."""
        return license_id(self.license_arn)


def license_id(license_arn: str | None) -> str | None:
    """The ``l-...`` id at the end of a License Manager ARN, the part to compare on."""
    if not license_arn:
        return None
    tail = license_arn.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return tail or None


def parse_event(body: str | bytes, *, carrier_id: str | None = None) -> SubscriptionEvent:
    """Read one event as SQS (or a seller forwarding it) delivers it.

    ``carrier_id`` names the delivery (the SQS message id) for an event that
    names itself nowhere (a raw SNS message). Raises ``UnreadableEvent``.
    """
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    document = _json_object(raw, "the body")
    if document.get("Type") == "Notification" and "Message" in document:
        message = document["Message"]
        if not isinstance(message, str):
            raise UnreadableEvent("the SNS envelope's Message is not text")
        inner = _json_object(message, "the SNS envelope's Message")
        envelope_id = _text(document.get("MessageId"))
        return _sns(inner, envelope_id or carrier_id or _digest(raw), document.get("Timestamp"))
    if document.get("source") == EVENTBRIDGE_SOURCE or "detail-type" in document:
        return _eventbridge(document, carrier_id or _digest(raw))
    if "action" in document:
        return _sns(document, carrier_id or _digest(raw), None)
    raise UnreadableEvent(
        "not an AWS Marketplace event: neither an EventBridge event (source "
        f"{EVENTBRIDGE_SOURCE}), an SNS envelope, nor an SNS message with an action"
    )


def _eventbridge(document: dict[str, Any], fallback_id: str) -> SubscriptionEvent:
    detail_type = _text(document.get("detail-type"))
    if detail_type is None:
        raise UnreadableEvent("the EventBridge event has no detail-type")
    if document.get("source") not in (None, EVENTBRIDGE_SOURCE):
        raise UnreadableEvent(f"the EventBridge event's source is not {EVENTBRIDGE_SOURCE}")
    detail = document.get("detail")
    if not isinstance(detail, dict):
        raise UnreadableEvent("the EventBridge event has no detail object")
    name = detail_type
    for role in _ROLES:
        name = name.removesuffix(role)
    return SubscriptionEvent(
        event_id=_text(document.get("id")) or fallback_id,
        source="eventbridge",
        type=detail_type,
        kind=_EVENTBRIDGE_KINDS.get(name, EventKind.UNKNOWN),
        time=_time(document.get("time")),
        customer_aws_account_id=_digits(_nested(detail, "acceptor", "accountId")),
        product_code=_text(_nested(detail, "product", "code")),
        license_arn=_text(_nested(detail, "license", "arn")),
        agreement_id=_text(_nested(detail, "agreement", "id")),
    )


def _sns(message: dict[str, Any], event_id: str, timestamp: object) -> SubscriptionEvent:
    action = _text(message.get("action"))
    if action is None:
        raise UnreadableEvent("the SNS message has no action")
    return SubscriptionEvent(
        event_id=event_id,
        source="sns",
        type=action,
        kind=_SNS_KINDS.get(action, EventKind.UNKNOWN),
        time=_time(timestamp),
        customer_identifier=_text(message.get("customer-identifier")),
        customer_aws_account_id=_digits(message.get("customer-aws-account-id")),
        product_code=_text(message.get("product-code")),
        license_arn=_text(message.get("license-arn")),
        agreement_id=_text(message.get("agreement-id") or message.get("offer-identifier")),
    )


def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise UnreadableEvent(f"{what} is not JSON") from None
    if not isinstance(document, dict):
        raise UnreadableEvent(f"{what} is not a JSON object")
    return document


def _nested(document: dict[str, Any], *path: str) -> object:
    value: object = document
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _text(value: object) -> str | None:
    if isinstance(value, str) and value.strip() and len(value) <= 2048:
        return value.strip()
    return None


def _digits(value: object) -> str | None:
    text = _text(value)
    return text if text is not None and text.isascii() and text.isdigit() else None


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        return None


def _digest(raw: str) -> str:
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
