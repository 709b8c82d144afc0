"""Sandbox mode over HTTP: AWS's rules answered locally, every response marked."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import PRODUCT
from tests.sidecar import Sidecar, run_sidecar

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def _dimension() -> str:
    return f"dim-{uuid.uuid4().hex[:12]}"


def _now_text() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def test_every_response_says_sandbox(sandbox: Sidecar) -> None:
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/nowhere")):
        response = sandbox.client.request(method, path)
        assert response.headers["x-metering-sandbox"] == "true", path
    response = sandbox.client.post("/v1/meter-usage", json={"UsageDimension": _dimension()})
    assert response.status_code == 200
    assert response.headers["x-metering-sandbox"] == "true"


def test_meter_usage_hour_grain_is_idempotent_by_value(sandbox: Sidecar) -> None:
    dimension = _dimension()
    first = sandbox.client.post(
        "/v1/meter-usage", json={"UsageDimension": dimension, "UsageQuantity": 17}
    )
    assert first.status_code == 200, first.text
    record_id = first.json()["MeteringRecordId"]
    assert record_id
    # Same hour, same quantity by value (17 == 17.00): AWS returns the same record.
    again = sandbox.client.post(
        "/v1/meter-usage",
        json={"UsageDimension": dimension, "UsageQuantityAsDecimal": "17.00"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["MeteringRecordId"] == record_id
    # Another quantity for the same hour: refused, as AWS refuses it.
    other = sandbox.client.post(
        "/v1/meter-usage", json={"UsageDimension": dimension, "UsageQuantity": 18}
    )
    assert other.status_code == 409
    problem = other.json()
    assert other.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "DuplicateRequestException"
    assert problem["retryable"] is False
    assert problem["aws_request_id"]


def test_client_token_reused_with_other_parameters_conflicts(sandbox: Sidecar) -> None:
    token = str(uuid.uuid4())
    first = sandbox.client.post(
        "/v1/meter-usage",
        json={"UsageDimension": _dimension(), "UsageQuantity": 1, "ClientToken": token},
    )
    assert first.status_code == 200
    second = sandbox.client.post(
        "/v1/meter-usage",
        json={"UsageDimension": _dimension(), "UsageQuantity": 1, "ClientToken": token},
    )
    assert second.status_code == 409
    assert second.json()["code"] == "IdempotencyConflictException"


def test_meter_usage_dry_run(sandbox: Sidecar) -> None:
    dimension = _dimension()
    response = sandbox.client.post(
        "/v1/meter-usage", json={"UsageDimension": dimension, "UsageQuantity": 5, "DryRun": True}
    )
    assert response.status_code == 200
    assert response.json() == {"DryRun": True}
    # A dry run records nothing: another quantity for the hour is still free.
    real = sandbox.client.post(
        "/v1/meter-usage", json={"UsageDimension": dimension, "UsageQuantity": 6}
    )
    assert real.status_code == 200


def test_batch_meter_usage_outcomes(sandbox: Sidecar) -> None:
    dimension = _dimension()
    timestamp = _now_text()
    records: list[dict[str, Any]] = [
        {
            "Timestamp": timestamp,
            "CustomerAWSAccountId": "111122223333",
            "Dimension": dimension,
            "QuantityAsDecimal": "2.5",
            "LicenseArn": LICENSE,
        },
        {
            "Timestamp": timestamp,
            "CustomerAWSAccountId": "444455556666",
            "Dimension": dimension,
            "Quantity": 1,
            "LicenseArn": LICENSE,
        },
    ]
    first = sandbox.client.post("/v1/batch-meter-usage", json={"UsageRecords": records})
    assert first.status_code == 200, first.text
    body = first.json()
    assert [r["Status"] for r in body["Results"]] == ["Success", "Success"]
    assert body["UnprocessedRecords"] == []
    # Timestamps come back as RFC 3339 text.
    assert body["Results"][0]["UsageRecord"]["Timestamp"] == timestamp
    ids = [r["MeteringRecordId"] for r in body["Results"]]

    records[1]["Quantity"] = 2
    second = sandbox.client.post("/v1/batch-meter-usage", json={"UsageRecords": records})
    statuses = [r["Status"] for r in second.json()["Results"]]
    assert statuses == ["Success", "DuplicateRecord"]
    assert second.json()["Results"][0]["MeteringRecordId"] == ids[0]


def test_batch_unsubscribed_customer(sandbox: Sidecar) -> None:
    response = sandbox.client.post(
        "/v1/batch-meter-usage",
        json={
            "UsageRecords": [
                {
                    "Timestamp": _now_text(),
                    "CustomerIdentifier": "unsubscribed-cust",
                    "Dimension": _dimension(),
                    "Quantity": 3,
                }
            ]
        },
    )
    assert response.status_code == 200, response.text
    result = response.json()["Results"][0]
    assert result["Status"] == "CustomerNotSubscribed"
    assert "MeteringRecordId" not in result


def test_resolve_customer(sandbox: Sidecar) -> None:
    response = sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": "abc"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "CustomerIdentifier",
        "CustomerAWSAccountId",
        "ProductCode",
        "LicenseArn",
        "Metadata",
    }
    assert body["CustomerAWSAccountId"].isdigit()
    assert body["LicenseArn"].startswith("arn:aws:license-manager::")
    assert body["Metadata"]["AgreementId"].startswith("agmt-")
    # Stable for the same token.
    assert (
        sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": "abc"}).json()
        == body
    )


def test_resolve_customer_errors(sandbox: Sidecar) -> None:
    expired = sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": "expired-1"})
    assert expired.status_code == 400
    assert expired.json()["code"] == "ExpiredTokenException"
    invalid = sandbox.client.post("/v1/resolve-customer", json={"RegistrationToken": "invalid-1"})
    assert invalid.status_code == 400
    assert invalid.json()["code"] == "InvalidTokenException"


def test_register_usage(sandbox: Sidecar) -> None:
    response = sandbox.client.post("/v1/register-usage", json={"Nonce": "n-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["Signature"].count(".") == 2
    rotation = datetime.fromisoformat(body["PublicKeyRotationTimestamp"])
    assert rotation > datetime.now(UTC) + timedelta(days=1)
    bad = sandbox.client.post("/v1/register-usage", json={"PublicKeyVersion": 2})
    assert bad.status_code == 400
    assert bad.json()["code"] == "InvalidPublicKeyVersionException"


def test_request_id_is_kept_or_made(sandbox: Sidecar) -> None:
    kept = sandbox.client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123"
    made = sandbox.client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32


def test_unknown_routes_and_methods_are_problems(sandbox: Sidecar) -> None:
    missing = sandbox.client.get("/v2/meter")
    assert missing.status_code == 404
    assert missing.json()["code"] == "NotFound"
    wrong = sandbox.client.get("/v1/meter-usage")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == "MethodNotAllowed"
    assert "POST" in wrong.headers["allow"]


def test_body_over_one_mebibyte_is_413(sandbox: Sidecar) -> None:
    big = b'{"RegistrationToken": "' + b"x" * (1024 * 1024) + b'"}'
    response = sandbox.client.post("/v1/resolve-customer", content=big)
    assert response.status_code == 413
    assert response.json()["code"] == "PayloadTooLarge"

    # Without a Content-Length (chunked), the limit still holds.
    def chunks() -> Any:
        yield b'{"RegistrationToken": "'
        for _ in range(17):
            yield b"x" * 65536
        yield b'"}'

    chunked = sandbox.client.post("/v1/resolve-customer", content=chunks())
    assert chunked.status_code == 413


def test_auth_token_guards_v1_only() -> None:
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_AUTH_TOKEN": "s3cret",
    }
    with run_sidecar(env) as sidecar:
        body = {"UsageDimension": _dimension(), "UsageQuantity": 1}
        missing = sidecar.client.post("/v1/meter-usage", json=body)
        assert missing.status_code == 401
        assert missing.json()["code"] == "Unauthorized"
        wrong = sidecar.client.post(
            "/v1/meter-usage", json=body, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        # 401 comes before the body is even parsed.
        garbage = sidecar.client.post("/v1/meter-usage", content=b"{not json")
        assert garbage.status_code == 401
        bearer = sidecar.client.post(
            "/v1/meter-usage", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert bearer.status_code == 200
        header = sidecar.client.post(
            "/v1/resolve-customer",
            json={"RegistrationToken": "t"},
            headers={"X-Metering-Token": "s3cret"},
        )
        assert header.status_code == 200
        assert sidecar.client.get("/healthz").status_code == 200
        assert "s3cret" not in sidecar.log()
