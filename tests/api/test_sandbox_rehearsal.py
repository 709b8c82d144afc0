"""The sandbox rehearses answers on request (X-Metering-Sandbox-Error) and per customer.

That every rehearsed answer is the AWS path's own is tested against the fake AWS in
``tests/aws/test_sandbox_parity.py``; here: what the header refuses, that it
affects only the call that carries it, the unsubscribed customers in both
identifier forms (direct calls and the queue), and the OpenAPI document.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from app.actions.sandbox import (
    REHEARSAL_HEADER,
    SIDECAR_FAULTS,
    UNSUBSCRIBED_PREFIXES,
    rehearsable,
)
from app.metering.protocol import ACTIONS
from tests.conftest import PRODUCT
from tests.queue.test_queue_api import QUEUE_FAST, last_hour, wait_until
from tests.sidecar import REPO, Sidecar, run_sidecar

WIRE = {"Content-Type": "application/x-amz-json-1.1"}
UNSUBSCRIBED_ACCOUNT = UNSUBSCRIBED_PREFIXES["CustomerAWSAccountId"] + "123456"


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _meter() -> dict[str, Any]:
    return {"UsageDimension": f"dim-{uuid.uuid4().hex[:10]}", "UsageQuantity": 1}


def _license(account: str) -> str:
    return f"arn:aws:license-manager::{account}:license:l-{uuid.uuid4().hex[:16]}"


@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        # Not an answer of any action.
        ("/v1/meter-usage", _meter(), "NoSuchException"),
        # Another action's answer: MeterUsage has no ExpiredTokenException.
        ("/v1/meter-usage", _meter(), "ExpiredTokenException"),
        ("/v1/resolve-customer", {"RegistrationToken": "t"}, "DuplicateRequestException"),
        # Case matters, as it does in AWS's codes.
        ("/v1/register-usage", {}, "throttlingexception"),
        ("/v1/batch-meter-usage", {"UsageRecords": []}, ""),
    ],
)
def test_a_code_the_action_cannot_meet_is_a_422_naming_those_it_can(
    sandbox: Sidecar, path: str, body: dict[str, Any], code: str
) -> None:
    response = sandbox.client.post(path, json=body, headers={REHEARSAL_HEADER: code})
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "ValidationError"
    (error,) = problem["errors"]
    assert error["field"] == REHEARSAL_HEADER
    action = next(a for a in ACTIONS if path == f"/v1/{_kebab(a)}")
    for allowed in rehearsable(action):
        assert allowed in error["message"]


def _kebab(action: str) -> str:
    return "".join(f"-{c.lower()}" if c.isupper() else c for c in action).lstrip("-")


def test_the_wire_route_refuses_an_unknown_code_as_aws_refuses_bad_input(
    sandbox: Sidecar,
) -> None:
    response = sandbox.client.post(
        "/",
        json={"RegistrationToken": "t"},
        headers={
            **WIRE,
            "X-Amz-Target": "AWSMPMeteringService.ResolveCustomer",
            REHEARSAL_HEADER: "CustomerNotEntitledException",
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["__type"] == "ValidationException"
    assert REHEARSAL_HEADER in response.json()["message"]
    assert "ExpiredTokenException" in response.json()["message"]


def test_a_rehearsal_is_for_the_call_that_asks_for_it(sandbox: Sidecar) -> None:
    body = _meter()
    rehearsed = sandbox.client.post(
        "/v1/meter-usage", json=body, headers={REHEARSAL_HEADER: "DuplicateRequestException"}
    )
    assert rehearsed.status_code == 409, rehearsed.text
    assert rehearsed.json()["retryable"] is False
    # The next call on the same connection is answered normally, and the rehearsal
    # recorded nothing: the same usage is taken, once.
    first = sandbox.client.post("/v1/meter-usage", json=body)
    assert first.status_code == 200, first.text
    again = sandbox.client.post("/v1/meter-usage", json=body)
    assert again.json() == first.json()


def test_a_rehearsed_throttle_says_when_to_retry(sandbox: Sidecar) -> None:
    response = sandbox.client.post(
        "/v1/batch-meter-usage",
        json={
            "UsageRecords": [
                {"Timestamp": _now(), "CustomerIdentifier": "c-1", "Dimension": "d", "Quantity": 1}
            ]
        },
        headers={REHEARSAL_HEADER: "ThrottlingException"},
    )
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["retryable"] is True


def test_an_expired_registration_token_is_not_retryable(sandbox: Sidecar) -> None:
    # The trigger token and the header give the AWS path's verdict: about the token.
    by_token = sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": "expired-9"})
    by_header = sandbox.client.post(
        "/v1/resolve-customer",
        json={"RegistrationToken": "fine"},
        headers={REHEARSAL_HEADER: "ExpiredTokenException"},
    )
    for response in (by_token, by_header):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "ExpiredTokenException"
        assert response.json()["retryable"] is False


def test_unsubscribed_customers_in_both_forms(sandbox: Sidecar) -> None:
    dimension = f"dim-{uuid.uuid4().hex[:8]}"
    records: list[dict[str, Any]] = [
        {"CustomerIdentifier": "unsubscribed-7", "Dimension": dimension, "Quantity": 1},
        {
            "CustomerAWSAccountId": UNSUBSCRIBED_ACCOUNT,
            "LicenseArn": _license(UNSUBSCRIBED_ACCOUNT),
            "Dimension": dimension,
            "Quantity": 1,
        },
        {"CustomerIdentifier": "subscribed-7", "Dimension": dimension, "Quantity": 1},
        {
            "CustomerAWSAccountId": "100000123456",
            "LicenseArn": _license("100000123456"),
            "Dimension": dimension,
            "Quantity": 1,
        },
    ]
    statuses: list[list[str]] = []
    for record in records:
        # One call per form: a call with a LicenseArn names no ProductCode.
        response = sandbox.client.post(
            "/v1/batch-meter-usage", json={"UsageRecords": [{"Timestamp": _now(), **record}]}
        )
        assert response.status_code == 200, response.text
        statuses.append([r["Status"] for r in response.json()["Results"]])
    assert statuses == [
        ["CustomerNotSubscribed"],
        ["CustomerNotSubscribed"],
        ["Success"],
        ["Success"],
    ]


def test_a_resolved_customer_is_never_the_unsubscribed_trigger(sandbox: Sidecar) -> None:
    # This token's account id, as the sandbox derives it, would be 000000881203.
    answer = sandbox.client.post(
        "/v1/resolve-customer", json={"RegistrationToken": "token-1373123"}
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["CustomerAWSAccountId"] == "100000881203"


@pytest.fixture(scope="module")
def queue_sandbox() -> Iterator[Sidecar]:
    """A sandbox whose queue sends the previous hour's grains at once."""
    env = {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT, **QUEUE_FAST}
    with run_sidecar(env) as sidecar:
        yield sidecar


def test_the_queue_rejects_usage_of_unsubscribed_customers_in_both_forms(
    queue_sandbox: Sidecar,
) -> None:
    dimension = f"dim-{uuid.uuid4().hex[:8]}"
    records: list[dict[str, Any]] = [
        {"CustomerIdentifier": "unsubscribed-queue"},
        {
            "CustomerAWSAccountId": UNSUBSCRIBED_ACCOUNT,
            "LicenseArn": _license(UNSUBSCRIBED_ACCOUNT),
        },
        {"CustomerIdentifier": "subscribed-queue"},
        {"CustomerAWSAccountId": "100000654321", "LicenseArn": _license("100000654321")},
    ]
    response = queue_sandbox.client.post(
        "/v1/usage-records",
        json={
            "UsageRecords": [
                {**r, "Dimension": dimension, "Quantity": 2, "Timestamp": last_hour()}
                for r in records
            ]
        },
    )
    assert response.status_code == 202, response.text
    ids = [accepted["Id"] for accepted in response.json()["Accepted"]]
    assert len(ids) == 4

    def views() -> list[dict[str, Any]]:
        return [queue_sandbox.client.get(f"/v1/usage-records/{i}").json() for i in ids]

    wait_until(
        lambda: all(v["Status"] != "pending" for v in views()), message="the grains were sent"
    )
    assert [(v["Status"], v.get("Reason")) for v in views()] == [
        ("rejected", "CustomerNotSubscribed"),
        ("rejected", "CustomerNotSubscribed"),
        ("accepted", "Success"),
        ("accepted", "Success"),
    ]


def test_the_openapi_document_names_the_header_and_its_values() -> None:
    document = json.loads((REPO / "openapi" / "openapi.json").read_text())
    paths = {
        "MeterUsage": "/v1/meter-usage",
        "BatchMeterUsage": "/v1/batch-meter-usage",
        "ResolveCustomer": "/v1/resolve-customer",
        "RegisterUsage": "/v1/register-usage",
    }
    for action, path in paths.items():
        operation = document["paths"][path]["post"]
        (parameter,) = [p for p in operation["parameters"] if p["name"] == REHEARSAL_HEADER]
        assert parameter["in"] == "header"
        assert not parameter["required"]
        assert parameter["schema"]["enum"] == list(rehearsable(action))
        assert "ignored" in parameter["description"]
    wire = document["paths"]["/"]["post"]
    (parameter,) = [p for p in wire["parameters"] if p["name"] == REHEARSAL_HEADER]
    assert set(parameter["schema"]["enum"]) == {c for a in ACTIONS for c in rehearsable(a)}
    batch = document["paths"]["/v1/batch-meter-usage"]["post"]["description"]
    for prefix in UNSUBSCRIBED_PREFIXES.values():
        assert f"`{prefix}`" in batch


def test_the_readme_lists_what_each_action_can_rehearse() -> None:
    readme = (REPO / "README.md").read_text()
    for action in ACTIONS:
        (row,) = re.findall(rf"^\| {action} \| (.+) \|$", readme, flags=re.MULTILINE)
        listed = re.findall(r"`(\w+)`", row)
        # The table lists the model's codes; the sidecar's own faults have a row of their own.
        assert listed == [c for c in rehearsable(action) if c not in SIDECAR_FAULTS], action
    (faults,) = re.findall(r"^\| every action \| (.+) \|$", readme, flags=re.MULTILINE)
    assert all(f"`{fault}`" in faults for fault in SIDECAR_FAULTS)
    for prefix in UNSUBSCRIBED_PREFIXES.values():
        assert f"starts with `{prefix}`" in readme
