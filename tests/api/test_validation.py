"""Every constraint of the service model, checked before anything is sent: 422 naming each field."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.api.test_edge_inputs import CALENDAR_ENDS, CONTENT_TYPE
from tests.sidecar import Sidecar

NOW = datetime.now(UTC)
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def _ts(delta: timedelta = timedelta()) -> str:
    return (NOW + delta).isoformat().replace("+00:00", "Z")


def _record(**fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "Timestamp": _ts(),
        "CustomerAWSAccountId": "123456789012",
        "Dimension": "users",
        "Quantity": 1,
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def _tags(n: int, prefix: str = "k") -> list[dict[str, str]]:
    return [{"Key": f"{prefix}{i}", "Value": "v"} for i in range(n)]


METER_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("empty dimension", {"UsageDimension": ""}, {"UsageDimension"}),
    ("missing dimension", {}, {"UsageDimension"}),
    ("dimension too long", {"UsageDimension": "d" * 256}, {"UsageDimension"}),
    ("negative quantity", {"UsageDimension": "d", "UsageQuantity": -1}, {"UsageQuantity"}),
    (
        "quantity over int32",
        {"UsageDimension": "d", "UsageQuantity": 2147483648},
        {"UsageQuantity"},
    ),
    ("quantity as text", {"UsageDimension": "d", "UsageQuantity": "5"}, {"UsageQuantity"}),
    ("quantity as float", {"UsageDimension": "d", "UsageQuantity": 1.5}, {"UsageQuantity"}),
    ("quantity as bool", {"UsageDimension": "d", "UsageQuantity": True}, {"UsageQuantity"}),
    (
        "decimal with 7 places",
        {"UsageDimension": "d", "UsageQuantityAsDecimal": "1.1234567"},
        {"UsageQuantityAsDecimal"},
    ),
    (
        "decimal with leading zero",
        {"UsageDimension": "d", "UsageQuantityAsDecimal": "01.5"},
        {"UsageQuantityAsDecimal"},
    ),
    (
        "decimal as number",
        {"UsageDimension": "d", "UsageQuantityAsDecimal": 1.5},
        {"UsageQuantityAsDecimal"},
    ),
    (
        "both quantity forms",
        {"UsageDimension": "d", "UsageQuantity": 1, "UsageQuantityAsDecimal": "1"},
        {"UsageQuantityAsDecimal"},
    ),
    ("bad product code", {"UsageDimension": "d", "ProductCode": "a b"}, {"ProductCode"}),
    ("client token too long", {"UsageDimension": "d", "ClientToken": "t" * 65}, {"ClientToken"}),
    ("empty client token", {"UsageDimension": "d", "ClientToken": ""}, {"ClientToken"}),
    ("dry run as text", {"UsageDimension": "d", "DryRun": "yes"}, {"DryRun"}),
    ("unknown field", {"UsageDimension": "d", "Quantity": 5}, {"Quantity"}),
    (
        "too old",
        {"UsageDimension": "d", "Timestamp": _ts(-timedelta(hours=6, minutes=1))},
        {"Timestamp"},
    ),
    ("in the future", {"UsageDimension": "d", "Timestamp": _ts(timedelta(hours=1))}, {"Timestamp"}),
    ("naive timestamp", {"UsageDimension": "d", "Timestamp": "2026-11-26T10:00:00"}, {"Timestamp"}),
    ("timestamp garbage", {"UsageDimension": "d", "Timestamp": "yesterday"}, {"Timestamp"}),
    ("negative epoch", {"UsageDimension": "d", "Timestamp": -5}, {"Timestamp"}),
    (
        "allocations do not sum",
        {
            "UsageDimension": "d",
            "UsageQuantity": 5,
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 2, "Tags": _tags(1, "a")},
                {"AllocatedUsageQuantity": 2, "Tags": _tags(1, "b")},
            ],
        },
        {"UsageAllocations"},
    ),
    (
        "allocation of the other kind",
        {
            "UsageDimension": "d",
            "UsageQuantityAsDecimal": "2",
            "UsageAllocations": [{"AllocatedUsageQuantity": 2}],
        },
        {"UsageAllocations[0].AllocatedUsageQuantity"},
    ),
    (
        "allocation with both kinds",
        {
            "UsageDimension": "d",
            "UsageQuantity": 2,
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 2, "AllocatedUsageQuantityAsDecimal": "2"}
            ],
        },
        {"UsageAllocations[0]"},
    ),
    (
        "same tag set twice",
        {
            "UsageDimension": "d",
            "UsageQuantity": 2,
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 1, "Tags": _tags(2)},
                {"AllocatedUsageQuantity": 1, "Tags": list(reversed(_tags(2)))},
            ],
        },
        {"UsageAllocations[1].Tags"},
    ),
    (
        "two untagged buckets",
        {
            "UsageDimension": "d",
            "UsageQuantity": 2,
            "UsageAllocations": [{"AllocatedUsageQuantity": 1}, {"AllocatedUsageQuantity": 1}],
        },
        {"UsageAllocations[1].Tags"},
    ),
    (
        "six tags",
        {
            "UsageDimension": "d",
            "UsageQuantity": 1,
            "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": _tags(6)}],
        },
        {"UsageAllocations[0].Tags"},
    ),
    (
        "empty tag list",
        {
            "UsageDimension": "d",
            "UsageQuantity": 1,
            "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": []}],
        },
        {"UsageAllocations[0].Tags"},
    ),
    (
        "tag value with a bad character",
        {
            "UsageDimension": "d",
            "UsageQuantity": 1,
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k", "Value": "a|b"}]}
            ],
        },
        {"UsageAllocations[0].Tags[0].Value"},
    ),
    (
        "tag key too long",
        {
            "UsageDimension": "d",
            "UsageQuantity": 1,
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "k" * 101, "Value": "v"}]}
            ],
        },
        {"UsageAllocations[0].Tags[0].Key"},
    ),
    (
        "duplicate tag keys in one allocation",
        {
            "UsageDimension": "d",
            "UsageQuantity": 1,
            "UsageAllocations": [
                {
                    "AllocatedUsageQuantity": 1,
                    "Tags": [{"Key": "k", "Value": "a"}, {"Key": "k", "Value": "b"}],
                }
            ],
        },
        {"UsageAllocations[0].Tags"},
    ),
    (
        "no allocations in the list",
        {"UsageDimension": "d", "UsageAllocations": []},
        {"UsageAllocations"},
    ),
]


@pytest.mark.parametrize(("case", "body", "fields"), METER_CASES, ids=[c[0] for c in METER_CASES])
def test_meter_usage_constraints(
    sandbox: Sidecar, case: str, body: dict[str, Any], fields: set[str]
) -> None:
    response = sandbox.client.post("/v1/meter-usage", json=body)
    assert response.status_code == 422, (case, response.text)
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "ValidationError"
    assert problem["status"] == 422
    assert problem["retryable"] is False
    assert {e["field"] for e in problem["errors"]} == fields, problem


BATCH_CASES: list[tuple[str, dict[str, Any], set[str]]] = [
    (
        "26 records",
        {"UsageRecords": [_record(Dimension=f"d{i}") for i in range(26)]},
        {"UsageRecords"},
    ),
    (
        "both customer forms",
        {"UsageRecords": [_record(CustomerIdentifier="c-1")]},
        {"UsageRecords[0]"},
    ),
    (
        "no customer",
        {"UsageRecords": [_record(CustomerAWSAccountId=None)]},
        {"UsageRecords[0]"},
    ),
    (
        "account id with letters",
        {"UsageRecords": [_record(CustomerAWSAccountId="12ab")]},
        {"UsageRecords[0].CustomerAWSAccountId"},
    ),
    (
        "bad license arn",
        {"UsageRecords": [_record(LicenseArn="license-1")]},
        {"UsageRecords[0].LicenseArn"},
    ),
    (
        "product code with license",
        {"ProductCode": "prod-x", "UsageRecords": [_record(LicenseArn=LICENSE)]},
        {"ProductCode"},
    ),
    (
        "license and no license mixed",
        {
            "UsageRecords": [
                _record(LicenseArn=LICENSE),
                _record(Dimension="other"),
            ]
        },
        {"UsageRecords"},
    ),
    (
        "record too old (24h window)",
        {"UsageRecords": [_record(Timestamp=_ts(-timedelta(hours=24)))]},
        {"UsageRecords[0].Timestamp"},
    ),
    (
        "missing timestamp",
        {"UsageRecords": [_record(Timestamp=None)]},
        {"UsageRecords[0].Timestamp"},
    ),
    (
        "both quantity forms",
        {"UsageRecords": [_record(QuantityAsDecimal="1")]},
        {"UsageRecords[0].QuantityAsDecimal"},
    ),
    (
        "allocations not summing",
        {
            "UsageRecords": [
                _record(
                    Quantity=None,
                    QuantityAsDecimal="1.5",
                    UsageAllocations=[{"AllocatedUsageQuantityAsDecimal": "1.4"}],
                )
            ]
        },
        {"UsageRecords[0].UsageAllocations"},
    ),
    (
        "same grain twice with other quantities",
        {"UsageRecords": [_record(Quantity=1), _record(Quantity=2)]},
        {"UsageRecords[1]"},
    ),
    ("records not a list", {"UsageRecords": {"a": 1}}, {"UsageRecords"}),
    ("records missing", {}, {"UsageRecords"}),
]


@pytest.mark.parametrize(("case", "body", "fields"), BATCH_CASES, ids=[c[0] for c in BATCH_CASES])
def test_batch_meter_usage_constraints(
    sandbox: Sidecar, case: str, body: dict[str, Any], fields: set[str]
) -> None:
    response = sandbox.client.post("/v1/batch-meter-usage", json=body)
    assert response.status_code == 422, (case, response.text)
    assert {e["field"] for e in response.json()["errors"]} == fields, response.json()


def test_identical_records_in_one_batch_are_allowed(sandbox: Sidecar) -> None:
    record = _record(Dimension=f"d-{uuid.uuid4().hex[:8]}")
    response = sandbox.client.post("/v1/batch-meter-usage", json={"UsageRecords": [record, record]})
    assert response.status_code == 200, response.text


def test_batch_over_one_megabyte_is_refused_locally(sandbox: Sidecar) -> None:
    # 25 records x 40 allocations x 5 long tags: under the sidecar's 1 MiB body
    # limit, yet over the 1,000,000 bytes AWS takes per call.
    value = "v" * 172
    records = []
    for i in range(25):
        allocations = [
            {
                "AllocatedUsageQuantity": 0,
                "Tags": [{"Key": f"k{t}", "Value": f"{value}{a}"} for t in range(5)],
            }
            for a in range(40)
        ]
        records.append(_record(Dimension=f"d{i}", Quantity=0, UsageAllocations=allocations))
    body = json.dumps({"UsageRecords": records}, separators=(",", ":")).encode()
    assert 1_000_000 < len(body) <= 1024 * 1024
    response = sandbox.client.post("/v1/batch-meter-usage", content=body)
    assert response.status_code == 422, response.text
    assert "1 MB" in response.json()["errors"][0]["message"]


def test_register_usage_needs_a_product(sandbox: Sidecar) -> None:
    ok = sandbox.client.post("/v1/register-usage", json={"ProductCode": "prod-abc"})
    assert ok.status_code == 200
    bad = sandbox.client.post("/v1/register-usage", json={"PublicKeyVersion": 0})
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} == {"PublicKeyVersion"}


def test_resolve_customer_needs_a_token(sandbox: Sidecar) -> None:
    response = sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": ""})
    assert response.status_code == 422
    assert {e["field"] for e in response.json()["errors"]} == {"RegistrationToken"}


def test_problem_never_echoes_the_registration_token(sandbox: Sidecar) -> None:
    secret = "tok-" + "s" * 30
    response = sandbox.client.post(
        "/v1/resolve-customer", json={"RegistrationToken": secret, "Extra": secret}
    )
    assert response.status_code == 422
    assert secret not in response.text
    assert secret not in sandbox.log()


def test_epoch_seconds_are_accepted(sandbox: Sidecar) -> None:
    response = sandbox.client.post(
        "/v1/meter-usage",
        json={"UsageDimension": f"d-{uuid.uuid4().hex[:8]}", "Timestamp": NOW.timestamp()},
    )
    assert response.status_code == 200, response.text


def test_malformed_bodies(sandbox: Sidecar) -> None:
    for content in (b"", b"{", b"[]", b"null", b"42", b'"text"'):
        response = sandbox.client.post("/v1/meter-usage", content=content)
        assert response.status_code == 422, (content, response.text)
        assert response.json()["code"] == "ValidationError"


# Values no field of any request can hold, wherever they stand: numbers beyond every
# bound, and text with a lone UTF-16 surrogate (as a value or as a key).
UNREPRESENTABLE: list[object] = [1e308, -1e308, 10**400, -(10**400), "\ud800", "a\udfffb"]
# Values at the edges that some fields hold: timestamps at the calendar's ends (valid
# text, e.g. as a dimension), negative zero (the quantity 0).
EDGES: list[object] = [*UNREPRESENTABLE, *CALENDAR_ENDS, -0.0, 0, 253402300799]


def _holds_unrepresentable(value: object) -> bool:
    """Whether ``value`` holds, anywhere, a number or text that no field can hold."""
    if isinstance(value, dict):
        return any(_holds_unrepresentable(k) or _holds_unrepresentable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_unrepresentable(v) for v in value)
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return abs(value) > 2**53
    return False


_lone_surrogates = st.builds(
    lambda before, surrogate: before + surrogate,
    st.text(max_size=4),
    st.characters(categories=["Cs"]),
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(EDGES)
    | _lone_surrogates,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12) | _lone_surrogates, children, max_size=4)
    ),
    max_leaves=12,
)
_fields = st.sampled_from(
    [
        "UsageDimension",
        "UsageQuantity",
        "UsageQuantityAsDecimal",
        "Timestamp",
        "UsageAllocations",
        "UsageRecords",
        "ProductCode",
        "RegistrationToken",
        "PublicKeyVersion",
        "Nonce",
        "DryRun",
        "ClientToken",
    ]
)
_ACTIONS = {
    "meter-usage": "MeterUsage",
    "batch-meter-usage": "BatchMeterUsage",
    "resolve-customer": "ResolveCustomer",
    "register-usage": "RegisterUsage",
}
_RECORD = {"CustomerAWSAccountId": "123456789012", "Dimension": "d", "Quantity": 1}


def _edge_examples(test: Any) -> Any:
    """The edge inputs that used to be 500s, or to name no field, tried on every run."""
    cases: list[tuple[str, Any]] = [
        ("meter-usage", {"UsageDimension": "d", "Timestamp": CALENDAR_ENDS[0]}),
        ("meter-usage", {"UsageDimension": "d", "Timestamp": CALENDAR_ENDS[1]}),
        ("meter-usage", {"UsageDimension": "d", "Timestamp": 10**400}),
        ("meter-usage", {"UsageDimension": "d", "Timestamp": -0.0}),
        ("meter-usage", {"UsageDimension": "d", "UsageQuantity": 1e308}),
        ("meter-usage", {"UsageDimension": "d", "UsageQuantity": -0.0}),
        ("meter-usage", {"UsageDimension": "\ud800"}),
        ("meter-usage", {"UsageDimension": "d", "\udfff": 1}),
        (
            "batch-meter-usage",
            {"UsageRecords": [{**_RECORD, "Timestamp": CALENDAR_ENDS[0]}]},
        ),
        (
            "batch-meter-usage",
            {"UsageRecords": [{**_RECORD, "Timestamp": CALENDAR_ENDS[1]}]},
        ),
        ("batch-meter-usage", {"UsageRecords": [{**_RECORD, "Dimension": "\ud800"}]}),
        ("resolve-customer", {"RegistrationToken": "\ud800"}),
        ("register-usage", {"PublicKeyVersion": 1e308}),
        ("register-usage", {"Nonce": "n\udc00"}),
    ]
    for route, body in cases:
        test = example(route=route, body=body)(test)
    return test


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@_edge_examples
@given(
    route=st.sampled_from(list(_ACTIONS)),
    body=st.dictionaries(_fields, _json, max_size=5) | _json,
)
def test_nothing_a_caller_sends_is_a_500(sandbox: Sidecar, route: str, body: Any) -> None:
    # Encoded here: httpx's json= would refuse a lone surrogate; JSON spells it "\ud800".
    response = sandbox.client.post(f"/v1/{route}", content=json.dumps(body).encode())
    assert response.status_code in {200, 400, 409, 422}, response.text
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/problem+json"
        assert "Traceback" not in response.text
    if _holds_unrepresentable(body):
        assert response.status_code == 422, response.text


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@_edge_examples
@given(
    route=st.sampled_from(list(_ACTIONS)),
    body=st.dictionaries(_fields, _json, max_size=5) | _json,
)
def test_nothing_sent_on_the_wire_is_a_500(sandbox: Sidecar, route: str, body: Any) -> None:
    response = sandbox.client.post(
        "/",
        content=json.dumps(body).encode(),
        headers={
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": f"AWSMPMeteringService.{_ACTIONS[route]}",
        },
    )
    assert response.status_code < 500, response.text
    assert response.headers["content-type"].startswith(CONTENT_TYPE)
    if response.status_code != 200:
        assert set(response.json()) == {"__type", "message"}
    if _holds_unrepresentable(body):
        assert response.status_code == 400, response.text
        assert response.json()["__type"] == "ValidationException"
