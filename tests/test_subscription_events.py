"""AWS Marketplace's events, read into one shape whatever dialect carried them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from app.metering.subscriptions import (
    EventKind,
    UnreadableEvent,
    license_id,
    parse_event,
)

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def eventbridge(detail_type: str, **detail: object) -> dict[str, object]:
    return {
        "version": "0",
        "id": "6f7c2a11-0000-4000-8000-000000000001",
        "detail-type": detail_type,
        "source": "aws.agreement-marketplace",
        "account": "999988887777",
        "time": "2026-12-01T10:59:12Z",
        "region": "us-east-1",
        "resources": [],
        "detail": {
            "agreement": {"id": "agmt-1234567890abcdef", "status": "ACTIVE"},
            "product": {"code": "prod-demo", "id": "prod-abc"},
            "license": {"arn": LICENSE},
            "acceptor": {"accountId": "111122223333"},
            "proposer": {"accountId": "999988887777"},
            **detail,
        },
    }


def sns_message(action: str) -> dict[str, str]:
    return {
        "action": action,
        "customer-identifier": "cust-Xyz123",
        "product-code": "prod-demo",
        "isFreeTrialTermPresent": "false",
    }


def envelope(message: dict[str, str], message_id: str = "sns-msg-1") -> dict[str, str]:
    return {
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": "arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-x",
        "Message": json.dumps(message),
        "Timestamp": "2026-12-01T10:59:30.123Z",
    }


@pytest.mark.parametrize(
    ("detail_type", "kind"),
    [
        ("Purchase Agreement Created - Manufacturer", EventKind.SUBSCRIBED),
        ("Purchase Agreement Created - Proposer", EventKind.SUBSCRIBED),
        ("Purchase Agreement Amended - Manufacturer", EventKind.CHANGED),
        ("Purchase Agreement Ended - Manufacturer", EventKind.ENDING),
        ("Purchase Agreement Ended - Proposer", EventKind.ENDING),
        ("License Updated - Manufacturer", EventKind.CHANGED),
        ("License Deprovisioned - Manufacturer", EventKind.ENDING),
        ("Offer Released", EventKind.UNKNOWN),
    ],
)
def test_eventbridge_events(detail_type: str, kind: EventKind) -> None:
    event = parse_event(json.dumps(eventbridge(detail_type)))
    assert event.kind is kind
    assert event.type == detail_type
    assert event.source == "eventbridge"
    assert event.event_id == "6f7c2a11-0000-4000-8000-000000000001"
    assert event.customer_aws_account_id == "111122223333"
    assert event.product_code == "prod-demo"
    assert event.license_arn == LICENSE
    assert event.license_id == "l-0123456789abcdef"
    assert event.agreement_id == "agmt-1234567890abcdef"
    assert event.customer_identifier is None
    assert event.time == datetime(2026, 12, 1, 10, 59, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("action", "kind"),
    [
        ("subscribe-success", EventKind.SUBSCRIBED),
        ("subscribe-fail", EventKind.FAILED),
        ("unsubscribe-pending", EventKind.ENDING),
        ("unsubscribe-success", EventKind.ENDED),
        ("entitlement-updated", EventKind.CHANGED),
        ("something-new", EventKind.UNKNOWN),
    ],
)
def test_sns_messages_in_the_envelope_and_raw(action: str, kind: EventKind) -> None:
    wrapped = parse_event(json.dumps(envelope(sns_message(action))).encode(), carrier_id="sqs-1")
    assert wrapped.kind is kind
    assert wrapped.source == "sns"
    assert wrapped.type == action
    assert wrapped.event_id == "sns-msg-1"  # the envelope names it, not the carrier
    assert wrapped.customer_identifier == "cust-Xyz123"
    assert wrapped.product_code == "prod-demo"
    assert wrapped.time == datetime(2026, 12, 1, 10, 59, 30, 123000, tzinfo=UTC)
    raw = parse_event(json.dumps(sns_message(action)), carrier_id="sqs-2")
    assert (raw.kind, raw.event_id, raw.customer_identifier) == (kind, "sqs-2", "cust-Xyz123")
    assert raw.time is None


def test_an_event_without_any_id_is_named_by_its_body() -> None:
    body = json.dumps(sns_message("unsubscribe-pending"))
    first = parse_event(body)
    assert first.event_id.startswith("sha256:")
    assert parse_event(body).event_id == first.event_id
    assert parse_event(json.dumps(sns_message("subscribe-success"))).event_id != first.event_id


def test_the_license_is_compared_on_its_id() -> None:
    # AWS's own example drops the leading "arn:".
    assert license_id("aws:license-manager::123456789012:license:l-abc") == "l-abc"
    assert license_id(LICENSE) == "l-0123456789abcdef"
    assert license_id(None) is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"hello": "world"}',
        b'{"Type": "Notification", "Message": 5}',
        b'{"Type": "Notification", "Message": "not json"}',
        b'{"Type": "Notification", "Message": "{\\"no\\": \\"action\\"}"}',
        b'{"source": "aws.agreement-marketplace", "detail-type": "License Updated"}',
        b'{"source": "aws.ec2", "detail-type": "EC2 Instance State", "detail": {}}',
        b"[" * 100_000,
    ],
)
def test_what_is_no_event_is_unreadable(body: bytes) -> None:
    with pytest.raises(UnreadableEvent) as refused:
        parse_event(body)
    assert body.decode(errors="replace")[:40] not in str(refused.value) or not body


def test_a_malformed_account_or_time_is_left_out() -> None:
    event = parse_event(
        json.dumps({**eventbridge("Purchase Agreement Ended - Manufacturer"), "time": "soon"})
    )
    assert event.time is None
    bad = eventbridge("Purchase Agreement Ended - Manufacturer", acceptor={"accountId": "12ab"})
    assert parse_event(json.dumps(bad)).customer_aws_account_id is None
