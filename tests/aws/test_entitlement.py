"""The entitlement gate (METERING_REGISTER_USAGE): RegisterUsage at start, against the strict
fake, with readiness held until it succeeds and the result at GET /v1/entitlement."""

from __future__ import annotations

import base64
import json
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar

# The gate's backoff starts at the credential retry interval: fast here.
GATE_ON = {"METERING_REGISTER_USAGE": "true", "METERING_CREDENTIAL_RETRY_INTERVAL": "0.2"}
RFC3339 = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z"


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


def _gate_env(fake: FakeAws, key: IssuedKey, **extra: str) -> dict[str, str]:
    return aws_mode_env(fake.url, key, **{**FAST_RETRIES, **GATE_ON, **extra})


def _gate_logs(sidecar: Sidecar) -> list[dict[str, Any]]:
    lines = []
    for text in sidecar.log().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("logger") == "app.entitlement":
            lines.append(line)
    return lines


def _claims(signature: str) -> dict[str, Any]:
    """The claims of a JWT-shaped Signature (not verified: the fake's is random)."""
    payload = signature.split(".")[1]
    decoded: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return decoded


def _entitlement_check(sidecar: Sidecar) -> dict[str, Any]:
    check: dict[str, Any] = sidecar.client.get("/readyz").json()["checks"]["entitlement"]
    return check


def _assert_entitled(sidecar: Sidecar) -> dict[str, Any]:
    ready = sidecar.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    check = ready.json()["checks"]["entitlement"]
    assert check["ok"] is True
    assert check.get("blocking", True) is True
    response = sidecar.client.get("/v1/entitlement")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["Enabled"] is True
    assert body["Entitled"] is True
    assert body["Signature"]
    assert re.fullmatch(RFC3339, body["PublicKeyRotationTimestamp"])
    assert re.fullmatch(RFC3339, body["RegisteredAt"])
    uuid.UUID(body["Nonce"])
    assert "Reason" not in body
    assert "Since" not in body
    return body


@pytest.fixture
def unentitled_sidecar(fake_aws: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """An aws-mode sidecar with the gate on, started while the buyer is not subscribed."""
    fake_aws.metering.unentitled = True
    with run_sidecar(_gate_env(fake_aws, static_key)) as sidecar:
        yield sidecar


def test_an_unentitled_buyer_holds_readiness_until_they_subscribe(
    unentitled_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    gate_sidecar = unentitled_sidecar
    # Refused more than once: the gate keeps trying.
    _wait_for(lambda: len(fake_aws.metering.requests_for("RegisterUsage")) >= 3)
    ready = gate_sidecar.client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["status"] == "not ready"
    check = ready.json()["checks"]["entitlement"]
    assert check["ok"] is False
    assert re.fullmatch(
        rf"RegisterUsage refused: CustomerNotEntitledException \(since {RFC3339}\)",
        check["detail"],
    ), check
    refused = gate_sidecar.client.get("/v1/entitlement")
    assert refused.status_code == 200, refused.text
    body = refused.json()
    assert body["Enabled"] is True
    assert body["Entitled"] is False
    assert body["Reason"] == "RegisterUsage refused: CustomerNotEntitledException"
    assert body["Since"] in check["detail"]
    assert "Signature" not in body
    # The reason's start stays put while the same answer repeats.
    seen = len(fake_aws.metering.requests_for("RegisterUsage"))
    _wait_for(lambda: len(fake_aws.metering.requests_for("RegisterUsage")) > seen)
    assert gate_sidecar.client.get("/v1/entitlement").json()["Since"] == body["Since"]
    # Loud, not a flood: one error line for the code within the minute.
    errors = [
        line
        for line in _gate_logs(gate_sidecar)
        if line["level"] == "error" and line.get("code") == "CustomerNotEntitledException"
    ]
    assert len(errors) == 1, errors

    fake_aws.metering.unentitled = False
    _wait_for(lambda: gate_sidecar.client.get("/readyz").status_code == 200)
    entitled = _assert_entitled(gate_sidecar)

    # Every attempt: the configured product, key version 1 and a fresh nonce.
    sent = [r.json() for r in fake_aws.metering.requests_for("RegisterUsage")]
    assert {s["ProductCode"] for s in sent} == {PRODUCT}
    assert {s["PublicKeyVersion"] for s in sent} == {1}
    nonces = [s["Nonce"] for s in sent]
    assert len(set(nonces)) == len(nonces)
    # It stopped at the success, whose nonce it keeps and AWS signed.
    assert [r.status for r in fake_aws.metering.requests_for("RegisterUsage")][-1] == 200
    assert nonces[-1] == entitled["Nonce"]
    (registration,) = fake_aws.metering.registrations
    assert registration["nonce"] == entitled["Nonce"]
    assert registration["productCode"] == PRODUCT
    assert _claims(entitled["Signature"])["nonce"] == entitled["Nonce"]
    time.sleep(0.5)
    assert len(fake_aws.metering.requests_for("RegisterUsage")) == len(sent)
    assert gate_sidecar.client.get("/v1/entitlement").json() == entitled


@pytest.mark.parametrize(
    ("arm", "code"),
    [
        (
            lambda fake: fake.metering.faults.server_error(6, action="RegisterUsage"),
            "InternalServiceErrorException",
        ),
        (
            lambda fake: fake.metering.faults.throttle(6, action="RegisterUsage"),
            "ThrottlingException",
        ),
    ],
    ids=["server_error", "throttle"],
)
def test_a_transient_failure_outlasting_one_call_is_retried_to_success(
    fake_aws: FakeAws, static_key: IssuedKey, arm: Callable[[FakeAws], None], code: str
) -> None:
    # Six failures: the first call's four attempts all fail, the gate calls again.
    arm(fake_aws)
    with run_sidecar(_gate_env(fake_aws, static_key)) as sidecar:
        _wait_for(lambda: sidecar.client.get("/readyz").status_code == 200)
        entitled = _assert_entitled(sidecar)
        requests = fake_aws.metering.requests_for("RegisterUsage")
        assert [r.status for r in requests][-1] == 200
        assert len([r for r in requests if r.status != 200]) == 6
        assert all(r.signature_valid for r in requests)
        # One nonce per call of the gate: the attempts within a call resend the same body.
        nonces = [r.json()["Nonce"] for r in requests]
        assert len(set(nonces)) == 2
        assert nonces[-1] == entitled["Nonce"]
        errors = [line for line in _gate_logs(sidecar) if line["level"] == "error"]
        assert [line["code"] for line in errors] == [code]


def test_with_the_gate_off_nothing_is_registered_or_checked(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    ready = aws_sidecar.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert "entitlement" not in ready.json()["checks"]
    response = aws_sidecar.client.get("/v1/entitlement")
    assert response.status_code == 200, response.text
    assert response.json() == {"Enabled": False}
    assert fake_aws.metering.requests_for("RegisterUsage") == []


def test_without_a_product_code_the_gate_says_so_and_sends_nothing(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    env = _gate_env(fake_aws, static_key)
    del env["METERING_PRODUCT_CODE"]
    with run_sidecar(env) as sidecar:
        _wait_for(lambda: any(line["level"] == "error" for line in _gate_logs(sidecar)))
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        check = ready.json()["checks"]["entitlement"]
        assert check == {"ok": False, "detail": "METERING_PRODUCT_CODE is not set"}
        body = sidecar.client.get("/v1/entitlement").json()
        assert body["Entitled"] is False
        assert body["Reason"] == "METERING_PRODUCT_CODE is not set"
        assert sidecar.client.get("/healthz").status_code == 200
        assert fake_aws.metering.requests_for("RegisterUsage") == []


def test_in_sandbox_mode_the_gate_registers_locally_and_the_token_rule_applies() -> None:
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_AUTH_TOKEN": "s3cret",
        **GATE_ON,
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        # /readyz needs no token; /v1/entitlement does.
        assert sidecar.client.get("/v1/entitlement").status_code == 401
        sidecar.client.headers["X-Metering-Token"] = "s3cret"
        entitled = _assert_entitled(sidecar)
        claims = _claims(entitled["Signature"])
        assert claims["nonce"] == entitled["Nonce"]
        assert claims["productCode"] == PRODUCT
        assert claims["sandbox"] is True


def test_a_gate_still_retrying_does_not_hold_up_shutdown(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    fake_aws.metering.unentitled = True
    # A 30 s backoff step: the gate is asleep in it when SIGTERM comes.
    env = _gate_env(fake_aws, static_key, METERING_CREDENTIAL_RETRY_INTERVAL="30")
    with run_sidecar(env) as sidecar:
        _wait_for(lambda: "refused" in _entitlement_check(sidecar)["detail"])
        started = time.monotonic()
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert sidecar.stop() in (0, -signal.SIGTERM), sidecar.log()
        assert time.monotonic() - started < 10
        log = sidecar.log()
        assert "metering-sidecar stopping" in log
        assert "Traceback" not in log
        assert "Task was destroyed" not in log
    assert len(fake_aws.metering.requests_for("RegisterUsage")) == 1
