"""The sandbox rehearses every answer exactly as the AWS path gives it.

For every error botocore's service model lists for each action, and for the
sidecar's own ``Timeout`` and ``CredentialsRefused``, one call goes (a) to a
sandbox sidecar with ``X-Metering-Sandbox-Error: <code>`` and (b) to an aws-mode
sidecar whose strict fake AWS answers every attempt with that code (or delays
past the read timeout, or refuses the credentials). Both must answer with the
same status, ``code`` and ``retryable`` (REST), the same status and ``__type``
(the wire route), and for MeterUsage the same ``ClientToken``/``Timestamp``
extensions. A seller's CI that passes against the sandbox then meets in
production the answers it rehearsed.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.actions.sandbox import CREDENTIALS_REFUSED, REHEARSAL_HEADER, TIMEOUT, rehearsable
from app.aws.classify import modelled_errors
from app.metering.protocol import ACTIONS
from tests.conftest import PRODUCT, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar

# The aws-mode sidecar's read timeout, and how long the fake holds a Timeout answer.
READ_TIMEOUT = 0.3
DELAY = READ_TIMEOUT + 0.5
WIRE_HEADERS = {"Content-Type": "application/x-amz-json-1.1"}
REST_PATHS = {
    "MeterUsage": "/v1/meter-usage",
    "BatchMeterUsage": "/v1/batch-meter-usage",
    "ResolveCustomer": "/v1/resolve-customer",
    "RegisterUsage": "/v1/register-usage",
}


def _cases() -> list[tuple[str, str]]:
    """(action, code) for every rehearsable answer. Throttling last per action: it
    slows the aws-mode sidecar's own sending of that action down for a few seconds."""
    cases: list[tuple[str, str]] = []
    for action in ACTIONS:
        codes = sorted(rehearsable(action), key=lambda code: code == "ThrottlingException")
        cases.extend((action, code) for code in codes)
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def parity_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """An aws-mode sidecar on the fake: two attempts a call on both routes, a short read
    timeout, deadlines long enough for a slot after AWS throttled this sidecar."""
    env = aws_mode_env(
        fake_aws_session.url,
        static_key,
        METERING_MAX_ATTEMPTS="2",
        METERING_WIRE_MAX_ATTEMPTS="2",
        METERING_RETRY_BASE_DELAY="0.02",
        METERING_RETRY_MAX_DELAY="0.05",
        METERING_REQUEST_DEADLINE="8",
        METERING_WIRE_REQUEST_DEADLINE="8",
        METERING_READ_TIMEOUT=str(READ_TIMEOUT),
        METERING_CONNECT_TIMEOUT="1",
        METERING_ACCESS_LOG="false",
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


def _rest_body(action: str) -> dict[str, Any]:
    unique = uuid.uuid4().hex[:10]
    if action == "MeterUsage":
        return {"UsageDimension": f"dim-{unique}", "UsageQuantity": 1}
    if action == "BatchMeterUsage":
        now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
        record = {
            "Timestamp": now,
            "CustomerIdentifier": f"cust-{unique}",
            "Dimension": "users",
            "Quantity": 1,
        }
        return {"UsageRecords": [record]}
    if action == "ResolveCustomer":
        return {"RegistrationToken": f"token-{unique}"}
    return {"Nonce": f"nonce-{unique}"}


def _wire_body(action: str) -> dict[str, Any]:
    """The same call in AWS's JSON 1.1 shape, as an SDK sends it."""
    unique = uuid.uuid4().hex[:10]
    now = int(time.time())
    if action == "MeterUsage":
        return {
            "ProductCode": PRODUCT,
            "Timestamp": now,
            "UsageDimension": f"dim-{unique}",
            "UsageQuantity": 1,
        }
    if action == "BatchMeterUsage":
        record = {
            "Timestamp": now,
            "CustomerIdentifier": f"cust-{unique}",
            "Dimension": "users",
            "Quantity": 1,
        }
        return {"ProductCode": PRODUCT, "UsageRecords": [record]}
    if action == "ResolveCustomer":
        return {"RegistrationToken": f"token-{unique}"}
    return {"ProductCode": PRODUCT, "PublicKeyVersion": 1}


def _arm(fake: FakeAws, action: str, code: str) -> None:
    """Make the fake give ``code`` for ``action`` on every attempt."""
    if code == TIMEOUT:
        fake.metering.faults.delay(DELAY, 100, action=action)
    elif code == CREDENTIALS_REFUSED:
        fake.metering.faults.auth_failure(
            100, code="UnrecognizedClientException", action=action, status=403
        )
    else:
        fake.metering.faults.modelled_error(100, code, action=action)


def _rest(sidecar: Sidecar, action: str, headers: dict[str, str]) -> dict[str, Any]:
    response = sidecar.client.post(REST_PATHS[action], json=_rest_body(action), headers=headers)
    return _rest_answer(response)


def _rest_answer(response: httpx.Response) -> dict[str, Any]:
    """What must agree of a REST answer."""
    assert response.headers["content-type"] == "application/problem+json", response.text
    problem = response.json()
    return {
        "status": response.status_code,
        "problem status": problem["status"],
        "code": problem["code"],
        "type": problem["type"],
        "retryable": problem["retryable"],
        "extensions": sorted(k for k in ("ClientToken", "Timestamp") if k in problem),
        "Retry-After": "retry-after" in response.headers,
    }


def _wire(sidecar: Sidecar, action: str, headers: dict[str, str]) -> dict[str, Any]:
    response = sidecar.client.post(
        "/",
        json=_wire_body(action),
        headers={**WIRE_HEADERS, "X-Amz-Target": f"AWSMPMeteringService.{action}", **headers},
    )
    body = response.json()
    return {
        "status": response.status_code,
        "__type": body["__type"],
        "x-amzn-ErrorType": response.headers["x-amzn-errortype"],
    }


def test_every_modelled_error_and_the_sidecars_faults_are_rehearsable() -> None:
    # The cases come from the model itself: none left out, none invented.
    for action in ACTIONS:
        assert set(rehearsable(action)) == modelled_errors()[action] | {
            TIMEOUT,
            CREDENTIALS_REFUSED,
        }
    assert ("ResolveCustomer", "ExpiredTokenException") in CASES
    assert ("RegisterUsage", "CustomerNotEntitledException") in CASES
    assert len(CASES) == sum(len(modelled_errors()[a]) + 2 for a in ACTIONS)


@pytest.mark.parametrize(("action", "code"), CASES, ids=[f"{a}-{c}" for a, c in CASES])
def test_the_sandbox_answers_as_the_aws_path_does(
    sandbox: Sidecar, parity_sidecar: Sidecar, fake_aws: FakeAws, action: str, code: str
) -> None:
    rehearse = {REHEARSAL_HEADER: code}
    sandbox_rest = _rest(sandbox, action, rehearse)
    sandbox_wire = _wire(sandbox, action, rehearse)

    _arm(fake_aws, action, code)
    aws_rest = _rest(parity_sidecar, action, {})
    aws_wire = _wire(parity_sidecar, action, {})
    # The aws-mode answers came from AWS's (the fake's) answers, not from anything local.
    assert fake_aws.metering.requests_for(action), "the aws-mode sidecar sent nothing"
    fake_aws.metering.faults.clear()

    assert sandbox_rest == aws_rest
    assert sandbox_wire == aws_wire
    expected_type = {TIMEOUT: "UpstreamTimeout", CREDENTIALS_REFUSED: "CredentialsRejected"}
    assert sandbox_rest["code"] == expected_type.get(code, code)
    assert sandbox_rest["type"] == f"urn:metering-sidecar:problem:{sandbox_rest['code']}"
    if action == "MeterUsage":
        # A retryable MeterUsage names what it sent, so the resend stays idempotent.
        retryable = sandbox_rest["retryable"]
        assert sandbox_rest["extensions"] == (["ClientToken", "Timestamp"] if retryable else [])


@pytest.mark.parametrize("code", ["ThrottlingException", "Timeout", "NoSuchException"])
def test_in_aws_mode_the_header_changes_nothing(
    parity_sidecar: Sidecar, fake_aws: FakeAws, code: str
) -> None:
    rehearse = {REHEARSAL_HEADER: code}
    rest = parity_sidecar.client.post(
        "/v1/meter-usage", json=_rest_body("MeterUsage"), headers=rehearse
    )
    assert rest.status_code == 200, rest.text
    assert rest.json()["MeteringRecordId"]
    wire = parity_sidecar.client.post(
        "/",
        json=_wire_body("BatchMeterUsage"),
        headers={
            **WIRE_HEADERS,
            "X-Amz-Target": "AWSMPMeteringService.BatchMeterUsage",
            **rehearse,
        },
    )
    assert wire.status_code == 200, wire.text
    assert wire.json()["Results"][0]["Status"] == "Success"
    # Both went to AWS, which answered them, and the header did not go along.
    sent = fake_aws.metering.requests
    assert [(r.action, r.status) for r in sent] == [("MeterUsage", 200), ("BatchMeterUsage", 200)]
    assert all(name.lower() != REHEARSAL_HEADER.lower() for r in sent for name, _ in r.headers)
