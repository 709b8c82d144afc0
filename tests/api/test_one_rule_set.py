"""One set of validation rules: the queue refuses what a BatchMeterUsage call made now would,
with the same message, and every pattern matches the whole value (no trailing newline)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.sidecar import Sidecar

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _record(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "Timestamp": _now(),
        "CustomerAWSAccountId": "123456789012",
        "Dimension": "users",
        "Quantity": 1,
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def _errors(response: Any) -> dict[str, str]:
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "ValidationError"
    return {e["field"]: e["message"] for e in problem["errors"]}


def _queue_errors(sandbox: Sidecar, record: dict[str, Any]) -> dict[str, str]:
    response = sandbox.client.post("/v1/usage-records", json={"UsageRecords": [record]})
    return _errors(response)


# (case, record, the field both paths name): the record as BatchMeterUsage takes it.
SHARED_RULES: list[tuple[str, dict[str, Any], str]] = [
    ("both customer forms", _record(CustomerIdentifier="c-1"), "UsageRecords[0]"),
    ("no customer", _record(CustomerAWSAccountId=None), "UsageRecords[0]"),
    ("both quantity forms", _record(QuantityAsDecimal="1"), "UsageRecords[0].QuantityAsDecimal"),
    (
        "allocations not summing",
        _record(
            Quantity=None,
            QuantityAsDecimal="1.5",
            UsageAllocations=[{"AllocatedUsageQuantityAsDecimal": "1.4"}],
        ),
        "UsageRecords[0].UsageAllocations",
    ),
    (
        "allocation of the other form",
        _record(Quantity=2, UsageAllocations=[{"AllocatedUsageQuantityAsDecimal": "2"}]),
        "UsageRecords[0].UsageAllocations[0].AllocatedUsageQuantityAsDecimal",
    ),
    (
        "in the future",
        _record(Timestamp=(datetime.now(UTC) + timedelta(hours=2)).isoformat()),
        "UsageRecords[0].Timestamp",
    ),
    (
        "past the window",
        _record(Timestamp=(datetime.now(UTC) - timedelta(hours=25)).isoformat()),
        "UsageRecords[0].Timestamp",
    ),
]


@pytest.mark.parametrize(
    ("case", "record", "field"), SHARED_RULES, ids=[c[0] for c in SHARED_RULES]
)
def test_the_queue_and_a_call_made_now_refuse_alike(
    sandbox: Sidecar, case: str, record: dict[str, Any], field: str
) -> None:
    now = sandbox.client.post("/v1/batch-meter-usage", json={"UsageRecords": [record]})
    queued = _queue_errors(sandbox, record)
    assert field in _errors(now), case
    assert field in queued, case
    assert queued[field] == _errors(now)[field], case


def test_a_product_code_beside_a_license_is_refused_alike(sandbox: Sidecar) -> None:
    now = _errors(
        sandbox.client.post(
            "/v1/batch-meter-usage",
            json={"ProductCode": "prod-x", "UsageRecords": [_record(LicenseArn=LICENSE)]},
        )
    )
    queued = _queue_errors(sandbox, _record(LicenseArn=LICENSE, ProductCode="prod-x"))
    assert queued["UsageRecords[0].ProductCode"] == now["ProductCode"]
    assert "bill twice" in now["ProductCode"]


# Every patterned field, given a valid value and a newline: (route, body, field named).
_NL = "\n"
TRAILING_NEWLINES: list[tuple[str, dict[str, Any], str]] = [
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(CustomerAWSAccountId="123456789012" + _NL)]},
        "UsageRecords[0].CustomerAWSAccountId",
    ),
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(LicenseArn=LICENSE + _NL)]},
        "UsageRecords[0].LicenseArn",
    ),
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(ProductCode="prod-demo" + _NL)]},
        "UsageRecords[0].ProductCode",
    ),
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(IdempotencyKey="key-1" + _NL)]},
        "UsageRecords[0].IdempotencyKey",
    ),
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(Quantity=None, QuantityAsDecimal="1.5" + _NL)]},
        "UsageRecords[0].QuantityAsDecimal",
    ),
    (
        "/v1/usage-records",
        {"UsageRecords": [_record(Timestamp=_now() + _NL)]},
        "UsageRecords[0].Timestamp",
    ),
    (
        "/v1/batch-meter-usage",
        {"UsageRecords": [_record(CustomerAWSAccountId="123456789012" + _NL)]},
        "UsageRecords[0].CustomerAWSAccountId",
    ),
    (
        "/v1/batch-meter-usage",
        {
            "UsageRecords": [
                _record(
                    Quantity=1,
                    UsageAllocations=[
                        {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k" + _NL, "Value": "v"}]}
                    ],
                )
            ]
        },
        "UsageRecords[0].UsageAllocations[0].Tags[0].Key",
    ),
    (
        "/v1/batch-meter-usage",
        {"ProductCode": "prod-demo" + _NL, "UsageRecords": [_record()]},
        "ProductCode",
    ),
    (
        "/v1/meter-usage",
        {"ProductCode": "prod-demo" + _NL, "UsageDimension": "users", "UsageQuantity": 1},
        "ProductCode",
    ),
    (
        "/v1/meter-usage",
        {"UsageDimension": "users", "UsageQuantityAsDecimal": "2" + _NL},
        "UsageQuantityAsDecimal",
    ),
    (
        "/v1/register-usage",
        {"ProductCode": "prod-demo" + _NL, "PublicKeyVersion": 1},
        "ProductCode",
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    TRAILING_NEWLINES,
    ids=[f"{c[0]} {c[2]}" for c in TRAILING_NEWLINES],
)
def test_a_trailing_newline_is_refused_naming_the_field(
    sandbox: Sidecar, route: str, body: dict[str, Any], field: str
) -> None:
    assert field in _errors(sandbox.client.post(route, json=body))


def test_a_query_hour_with_a_trailing_newline_is_refused(sandbox: Sidecar) -> None:
    response = sandbox.client.get("/v1/usage-records", params={"hour": "1795696815\n"})
    assert response.status_code == 422, response.text
    response = sandbox.client.get("/v1/usage-records", params={"hour": "1795696815"})
    assert response.status_code == 200, response.text
    response = sandbox.client.get("/v1/usage-grains", params={"hour": "1795696815\n"})
    assert response.status_code == 422, response.text
