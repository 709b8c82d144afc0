"""Edge inputs on every route: timestamps at the ends of the calendar, numbers no field can
hold, text that is not Unicode. Each is a 422 naming the field (on the wire route, AWS's
400 ``ValidationException`` naming it), never a 500; in the queue, under ``AcceptPartial``,
the bad record is refused alone and the good ones of the call are queued."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sidecar import Sidecar

CONTENT_TYPE = "application/x-amz-json-1.1"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"

# Valid RFC 3339 whose UTC instant lies outside what Python's datetime holds (years
# 1..9999): converting them to UTC, or adding an hour, used to overflow (a 500).
CALENDAR_ENDS = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]
# Every timestamp outside the years 2000..9998 (UTC), as text and as epoch seconds.
BAD_TIMESTAMPS: list[object] = [
    *CALENDAR_ENDS,
    "9999-12-31T23:59:59+23:59",
    "0001-01-01T00:00:00-23:59",
    "9999-12-31T23:59:59.999999999Z",
    "9998-12-31T23:59:59-00:01",
    "0001-01-01T00:00:00Z",
    "1999-12-31T23:59:59Z",
    "2000-01-01T00:00:00+00:01",
    1e308,
    -1e308,
    -0.0,
    0,
    10**400,
    253402300799,
]
# Numbers an integer field (0..2,147,483,647, or 1.. for PublicKeyVersion) cannot hold.
BAD_INTEGERS: list[object] = [1e308, -1e308, 10**400, -(10**400), 2**31, 1.5, 1e-308, -1]
# Lone UTF-16 surrogates: JSON can spell them ("\ud800"), UTF-8 cannot encode them.
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "\ude00\ud83d"]

Kind = Literal["timestamp", "integer", "text"]


@dataclass(frozen=True)
class Target:
    """One field of one action, named as the errors name it."""

    action: str
    field: str
    kind: Kind


ROUTES = {
    "MeterUsage": "/v1/meter-usage",
    "BatchMeterUsage": "/v1/batch-meter-usage",
    "ResolveCustomer": "/v1/resolve-customer",
    "RegisterUsage": "/v1/register-usage",
}

TARGETS = [
    Target("MeterUsage", "Timestamp", "timestamp"),
    Target("MeterUsage", "UsageQuantity", "integer"),
    Target("MeterUsage", "UsageDimension", "text"),
    Target("MeterUsage", "ProductCode", "text"),
    Target("MeterUsage", "ClientToken", "text"),
    Target("MeterUsage", "UsageAllocations[0].AllocatedUsageQuantity", "integer"),
    Target("MeterUsage", "UsageAllocations[0].Tags[0].Key", "text"),
    Target("MeterUsage", "UsageAllocations[0].Tags[0].Value", "text"),
    Target("BatchMeterUsage", "UsageRecords[0].Timestamp", "timestamp"),
    Target("BatchMeterUsage", "UsageRecords[1].Timestamp", "timestamp"),
    Target("BatchMeterUsage", "UsageRecords[0].Quantity", "integer"),
    Target("BatchMeterUsage", "UsageRecords[1].Dimension", "text"),
    Target("BatchMeterUsage", "UsageRecords[0].CustomerAWSAccountId", "text"),
    Target("BatchMeterUsage", "UsageRecords[0].LicenseArn", "text"),
    Target("ResolveCustomer", "RegistrationToken", "text"),
    Target("RegisterUsage", "Nonce", "text"),
    Target("RegisterUsage", "ProductCode", "text"),
    Target("RegisterUsage", "PublicKeyVersion", "integer"),
]
QUEUE_TARGETS = [
    "Timestamp",
    "Quantity",
    "Dimension",
    "CustomerAWSAccountId",
    "IdempotencyKey",
    "UsageAllocations[0].Tags[0].Value",
]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _record(dimension: str = "d") -> dict[str, Any]:
    return {
        "Timestamp": _now(),
        "CustomerAWSAccountId": "123456789012",
        "Dimension": dimension,
        "Quantity": 1,
        "LicenseArn": LICENSE,
    }


def valid_body(action: str) -> dict[str, Any]:
    """A body of ``action`` the sandbox accepts, with every field the targets name."""
    if action == "MeterUsage":
        return {
            "ProductCode": "prod-edge",
            "Timestamp": _now(),
            "UsageDimension": f"d-{uuid.uuid4().hex[:8]}",
            "UsageQuantity": 1,
            "ClientToken": str(uuid.uuid4()),
            "UsageAllocations": [
                {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "a"}]}
            ],
        }
    if action == "BatchMeterUsage":
        return {"UsageRecords": [_record("d0"), _record("d1")]}
    if action == "ResolveCustomer":
        return {"RegistrationToken": "token-edge"}
    return {"ProductCode": "prod-edge", "PublicKeyVersion": 1, "Nonce": "n-1"}


def queued_record() -> dict[str, Any]:
    """A queue record the sandbox queues, with every field the queue targets name."""
    return {
        "CustomerAWSAccountId": "123456789012",
        "Dimension": f"d-{uuid.uuid4().hex[:8]}",
        "Quantity": 1,
        "UsageAllocations": [
            {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "a"}]}
        ],
    }


def with_field(body: dict[str, Any], field: str, value: object) -> dict[str, Any]:
    """A deep copy of ``body`` with ``field`` ("UsageRecords[0].Timestamp") set to ``value``."""
    copy: dict[str, Any] = json.loads(json.dumps(body))
    parts: list[str | int] = [
        int(index) if index else name for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", field)
    ]
    node: Any = copy
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return copy


def encode(body: object) -> bytes:
    """JSON as a client sends it; a lone surrogate travels as its escape, "\\ud800"."""
    return json.dumps(body).encode()


def post(sidecar: Sidecar, path: str, body: object) -> httpx.Response:
    """POST ``body`` to a REST route."""
    return sidecar.client.post(path, content=encode(body))


def wire(sidecar: Sidecar, action: str, body: object) -> httpx.Response:
    """POST ``body`` to ``/`` as an AWS SDK sends ``action`` (no token in the sandbox)."""
    return sidecar.client.post(
        "/",
        content=encode(body),
        headers={"Content-Type": CONTENT_TYPE, "X-Amz-Target": f"AWSMPMeteringService.{action}"},
    )


def assert_problem(response: httpx.Response, fields: set[str]) -> list[dict[str, str]]:
    """A 422 problem document whose errors name exactly ``fields``."""
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "ValidationError"
    errors: list[dict[str, str]] = problem["errors"]
    assert {e["field"] for e in errors} == fields, problem
    return errors


def assert_validation_exception(response: httpx.Response, field: str) -> str:
    """AWS's 400 ``ValidationException`` whose message names ``field``."""
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith(CONTENT_TYPE)
    assert response.headers["x-amzn-errortype"] == "ValidationException"
    body = response.json()
    assert body["__type"] == "ValidationException"
    message: str = body["message"]
    assert f"{field}: " in message, message
    return message


def assert_explains(kind: Kind, message: str) -> None:
    """The message says what is wrong: the range for timestamps, surrogates for text."""
    if kind == "timestamp":
        assert "years 2000 to 9998" in message, message
    elif kind == "text":
        assert "surrogate" in message, message


def assert_queued_alone(response: httpx.Response, field: str) -> str:
    """The call was 202: record 1 queued, record 0 refused naming ``field``."""
    assert response.status_code == 202, response.text
    receipt = response.json()
    assert [a["Index"] for a in receipt["Accepted"]] == [1], receipt
    (rejected,) = receipt["Rejected"]
    assert rejected["Index"] == 0
    assert {e["field"] for e in rejected["Errors"]} == {f"UsageRecords[0].{field}"}, receipt
    message: str = rejected["Errors"][0]["message"]
    return message


def _bad_values(kind: Kind) -> list[object]:
    if kind == "timestamp":
        return BAD_TIMESTAMPS
    if kind == "integer":
        return BAD_INTEGERS
    return [f"a{s}b" for s in LONE_SURROGATES]


def _kind_of(field: str) -> Kind:
    if field == "Timestamp":
        return "timestamp"
    return "integer" if field == "Quantity" else "text"


_CASES = [(t, v) for t in TARGETS for v in _bad_values(t.kind)]
_IDS = [f"{t.action}-{t.field}-{v!r:.40}" for t, v in _CASES]


# --- every target, every edge value: REST and wire ------------------------------------------


@pytest.mark.parametrize(("target", "value"), _CASES, ids=_IDS)
def test_edge_value_is_422_naming_the_field(
    sandbox: Sidecar, target: Target, value: object
) -> None:
    body = with_field(valid_body(target.action), target.field, value)
    errors = assert_problem(post(sandbox, ROUTES[target.action], body), {target.field})
    assert_explains(target.kind, errors[0]["message"])


@pytest.mark.parametrize(("target", "value"), _CASES, ids=_IDS)
def test_edge_value_is_validation_exception_on_the_wire(
    sandbox: Sidecar, target: Target, value: object
) -> None:
    body = with_field(valid_body(target.action), target.field, value)
    message = assert_validation_exception(wire(sandbox, target.action, body), target.field)
    assert_explains(target.kind, message)


@pytest.mark.parametrize("timestamp", CALENDAR_ENDS)
def test_calendar_ends_in_a_batch_refuse_the_call_naming_the_record(
    sandbox: Sidecar, timestamp: str
) -> None:
    # Both records out of range: both named, nothing else (no grain check on them).
    body = {"UsageRecords": [_record("a") | {"Timestamp": timestamp}] * 2}
    assert_problem(
        post(sandbox, "/v1/batch-meter-usage", body),
        {"UsageRecords[0].Timestamp", "UsageRecords[1].Timestamp"},
    )


@pytest.mark.parametrize("surrogate", LONE_SURROGATES)
def test_lone_surrogate_in_a_field_name_is_refused(sandbox: Sidecar, surrogate: str) -> None:
    body = {**valid_body("MeterUsage"), f"x{surrogate}": 1}
    errors = assert_problem(post(sandbox, "/v1/meter-usage", body), {""})
    assert "surrogate" in errors[0]["message"]
    response = wire(sandbox, "MeterUsage", body)
    assert_validation_exception(response, "body")


def test_surrogate_pairs_are_text(sandbox: Sidecar) -> None:
    # A high surrogate followed by a low one is one character (U+1F600), not an error.
    nonce = "launch-\ud83d\ude00"
    body = {"Nonce": nonce}
    assert post(sandbox, "/v1/register-usage", body).status_code == 200
    assert wire(sandbox, "RegisterUsage", {**body, "ProductCode": "prod-x"}).status_code == 200


def test_negative_zero_quantity_is_zero(sandbox: Sidecar) -> None:
    # -0 and -0.0 are the number 0, which every quantity field holds: billed as 0.
    dimension = f"d-{uuid.uuid4().hex[:8]}"
    zero = post(sandbox, "/v1/meter-usage", {"UsageDimension": dimension, "UsageQuantity": 0})
    assert zero.status_code == 200, zero.text
    for raw in (b"-0", b"-0.0"):
        body = b'{"UsageDimension": "' + dimension.encode() + b'", "UsageQuantity": ' + raw + b"}"
        again = sandbox.client.post("/v1/meter-usage", content=body)
        assert again.status_code == 200, again.text
        # Same hour, same quantity by value: the same record, as AWS answers.
        assert again.json() == zero.json()


def test_body_that_is_not_utf8_or_holds_an_unreadable_number_is_422(sandbox: Sidecar) -> None:
    for body in (b'{"UsageDimension": "\xff"}', b'{"UsageQuantity": 1' + b"0" * 5000 + b"}"):
        response = sandbox.client.post("/v1/meter-usage", content=body)
        errors = assert_problem(response, {""})
        assert "JSON" in errors[0]["message"]
        on_the_wire = sandbox.client.post(
            "/",
            content=body,
            headers={"X-Amz-Target": "AWSMPMeteringService.MeterUsage"},
        )
        assert on_the_wire.status_code == 400, on_the_wire.text
        assert on_the_wire.json()["__type"] == "ValidationException"


# --- the queue -----------------------------------------------------------------------------


_QUEUE_CASES = [(f, v) for f in QUEUE_TARGETS for v in _bad_values(_kind_of(f))]
_QUEUE_IDS = [f"{f}-{v!r:.40}" for f, v in _QUEUE_CASES]


@pytest.mark.parametrize(("field", "value"), _QUEUE_CASES, ids=_QUEUE_IDS)
def test_queue_refuses_the_bad_record_alone_under_accept_partial(
    sandbox: Sidecar, field: str, value: object
) -> None:
    bad = with_field(queued_record(), field, value)
    body = {"AcceptPartial": True, "UsageRecords": [bad, queued_record()]}
    message = assert_queued_alone(post(sandbox, "/v1/usage-records", body), field)
    assert_explains(_kind_of(field), message)


@pytest.mark.parametrize("timestamp", CALENDAR_ENDS)
def test_queue_refuses_the_whole_call_without_accept_partial(
    sandbox: Sidecar, timestamp: str
) -> None:
    bad = queued_record() | {"Timestamp": timestamp}
    body = {"UsageRecords": [queued_record(), bad]}
    errors = assert_problem(post(sandbox, "/v1/usage-records", body), {"UsageRecords[1].Timestamp"})
    assert_explains("timestamp", errors[0]["message"])


@pytest.mark.parametrize("path", ["/v1/usage-records", "/v1/usage-grains"])
@pytest.mark.parametrize("hour", [*CALENDAR_ENDS, "0", "1e308", str(10**400)])
def test_hour_filter_out_of_range_is_422(sandbox: Sidecar, path: str, hour: str) -> None:
    assert_problem(sandbox.client.get(path, params={"hour": hour}), {"hour"})


# --- properties ----------------------------------------------------------------------------

# The instants the sidecar takes: the years 2000 to 9998, UTC.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
END = datetime(9999, 1, 1, tzinfo=UTC)


def _out_of_range(text: str) -> bool:
    # Comparing aware datetimes never converts them, so it cannot overflow.
    return not EARLIEST <= datetime.fromisoformat(text) < END


_lone_surrogate_text = st.builds(
    lambda before, surrogate, after: before + surrogate + after,
    st.text("abc-_ ", max_size=3),
    st.characters(categories=["Cs"]),
    st.text("abc-_ ", max_size=3),
)
_edge_by_kind: dict[Kind, st.SearchStrategy[object]] = {
    "timestamp": st.sampled_from(BAD_TIMESTAMPS)
    | st.builds(
        lambda year, sign, hh, mm: f"{year:04d}-12-31T23:59:59{sign}{hh:02d}:{mm:02d}",
        st.sampled_from([1, 1999, 2000, 9998, 9999]),
        st.sampled_from("+-"),
        st.integers(0, 23),
        st.integers(0, 59),
    ).filter(_out_of_range),
    "integer": st.sampled_from(BAD_INTEGERS) | st.floats(min_value=2**31, allow_infinity=False),
    "text": _lone_surrogate_text,
}
_PROPERTY_SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def _edge_case(draw: st.DrawFn) -> tuple[Target, object]:
    target = draw(st.sampled_from(TARGETS))
    return target, draw(_edge_by_kind[target.kind])


@_PROPERTY_SETTINGS
@given(case=_edge_case())
def test_any_edge_value_is_422_rest_and_validation_exception_wire(
    sandbox: Sidecar, case: tuple[Target, object]
) -> None:
    target, value = case
    body = with_field(valid_body(target.action), target.field, value)
    assert_problem(post(sandbox, ROUTES[target.action], body), {target.field})
    assert_validation_exception(wire(sandbox, target.action, body), target.field)


@_PROPERTY_SETTINGS
@given(
    field=st.sampled_from(QUEUE_TARGETS).flatmap(
        lambda f: st.tuples(st.just(f), _edge_by_kind[_kind_of(f)])
    )
)
def test_any_edge_value_in_the_queue_is_refused_alone(
    sandbox: Sidecar, field: tuple[str, object]
) -> None:
    name, value = field
    bad = with_field(queued_record(), name, value)
    body = {"AcceptPartial": True, "UsageRecords": [bad, queued_record()]}
    assert_queued_alone(post(sandbox, "/v1/usage-records", body), name)
