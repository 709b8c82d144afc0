"""aws mode against the signature-verifying fake: signing, forwarding, retries, error mapping."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from tests.conftest import PRODUCT, FakeAws
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def _now_text() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _meter(dimension: str | None = None, quantity: int = 3) -> dict[str, Any]:
    return {
        "UsageDimension": dimension or f"dim-{uuid.uuid4().hex[:10]}",
        "UsageQuantity": quantity,
    }


def _batch(n: int = 2) -> dict[str, Any]:
    dimension = f"dim-{uuid.uuid4().hex[:10]}"
    return {
        "UsageRecords": [
            {
                "Timestamp": _now_text(),
                "CustomerAWSAccountId": f"1111222233{i:02d}",
                "Dimension": dimension,
                "QuantityAsDecimal": f"{i + 1}.5",
                "LicenseArn": LICENSE,
            }
            for i in range(n)
        ]
    }


def _assert_all_signed(fake: FakeAws, key: IssuedKey) -> None:
    assert fake.metering.requests, "the fake received nothing"
    for request in fake.metering.requests:
        assert request.signature_valid, request
        assert request.access_key_id == key.access_key_id


def test_all_four_actions_are_signed_and_forwarded(
    aws_sidecar: Sidecar, fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    fake_aws.metering.registration_tokens["reg-token-1"] = {
        "CustomerIdentifier": "",
        "CustomerAWSAccountId": "123456789012",
        "ProductCode": PRODUCT,
        "LicenseArn": LICENSE,
        "Metadata": {"AgreementId": "agmt-123"},
    }
    meter = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert meter.status_code == 200, meter.text
    assert meter.json()["MeteringRecordId"]
    assert meter.headers["x-amzn-requestid"]
    assert "x-metering-sandbox" not in meter.headers

    batch = aws_sidecar.client.post("/v1/batch-meter-usage", json=_batch())
    assert batch.status_code == 200, batch.text
    assert [r["Status"] for r in batch.json()["Results"]] == ["Success", "Success"]

    resolved = aws_sidecar.client.post(
        "/v1/resolve-customer", json={"RegistrationToken": "reg-token-1"}
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["CustomerAWSAccountId"] == "123456789012"
    assert resolved.json()["Metadata"] == {"AgreementId": "agmt-123"}

    registered = aws_sidecar.client.post("/v1/register-usage", json={"Nonce": "abc"})
    assert registered.status_code == 200, registered.text
    assert registered.json()["Signature"]
    datetime.fromisoformat(registered.json()["PublicKeyRotationTimestamp"])

    _assert_all_signed(fake_aws, static_key)
    actions = [r.action for r in fake_aws.metering.requests]
    assert actions == ["MeterUsage", "BatchMeterUsage", "ResolveCustomer", "RegisterUsage"]
    sent = fake_aws.metering.requests[0].json()
    # Defaults filled in: product, timestamp, and a ClientToken.
    assert sent["ProductCode"] == PRODUCT
    assert isinstance(sent["Timestamp"], int | float)
    uuid.UUID(sent["ClientToken"])
    # LicenseArn records go without ProductCode, even with one configured.
    assert "ProductCode" not in fake_aws.metering.requests[1].json()


def test_caller_cannot_route_the_request(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    response = aws_sidecar.client.post(
        "/v1/meter-usage",
        json=_meter(),
        headers={"Host": "evil.example.com", "X-Forwarded-Host": "evil.example.com"},
    )
    assert response.status_code == 200, response.text
    (request,) = fake_aws.metering.requests
    host = dict(request.headers)["host"]
    assert host == fake_aws.url.removeprefix("http://")


def test_throttled_twice_then_accepted(own_aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.throttle(2, action="MeterUsage")
    response = own_aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    requests = fake_aws.metering.requests_for("MeterUsage")
    assert len(requests) == 3
    # Each attempt resent the very same body: same ClientToken, same Timestamp.
    assert len({r.body for r in requests}) == 1
    assert all(r.signature_valid for r in requests)


def test_throttled_throughout_is_429_with_retry_after(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.throttle(100)
    started = time.monotonic()
    response = own_aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    elapsed = time.monotonic() - started
    assert response.status_code == 429, response.text
    problem = response.json()
    assert problem["code"] == "ThrottlingException"
    assert problem["retryable"] is True
    assert problem["aws_request_id"]
    assert int(response.headers["retry-after"]) >= 1
    # Bounded: at most max_attempts (4) attempts, inside the 4 s deadline.
    assert len(fake_aws.metering.requests) == 4
    assert elapsed < 4.5


def test_server_errors_are_retried(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.server_error(2)
    ok = aws_sidecar.client.post("/v1/batch-meter-usage", json=_batch())
    assert ok.status_code == 200, ok.text
    assert len(fake_aws.metering.requests) == 3

    fake_aws.metering.faults.server_error(100, status=503, code="ServiceUnavailableException")
    failed = aws_sidecar.client.post("/v1/resolve-customer", json={"RegistrationToken": "x"})
    assert failed.status_code == 502, failed.text
    assert failed.json()["code"] == "ServiceUnavailableException"
    assert failed.json()["retryable"] is True


def test_internal_service_error_after_retries_is_502(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.server_error(100)
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 502
    assert response.json()["code"] == "InternalServiceErrorException"


def test_dropped_connections_are_retried(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.drop_connection(1)
    ok = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert ok.status_code == 200, ok.text

    fake_aws.metering.faults.drop_connection(100)
    failed = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert failed.status_code == 502, failed.text
    assert failed.json()["code"] == "UpstreamUnavailable"


def test_upstream_timeout_is_504(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.delay(1.5, 100)
    started = time.monotonic()
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "UpstreamTimeout"
    assert time.monotonic() - started < 5.5


def test_slow_once_then_fine(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.delay(1.5, 1)
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text


def test_unprocessed_records_are_resent_and_merged(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.unprocessed(2)
    body = _batch(3)
    response = aws_sidecar.client.post("/v1/batch-meter-usage", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["UnprocessedRecords"] == []
    assert sorted(r["UsageRecord"]["CustomerAWSAccountId"] for r in result["Results"]) == sorted(
        r["CustomerAWSAccountId"] for r in body["UsageRecords"]
    )
    assert all(r["Status"] == "Success" for r in result["Results"])
    assert len(fake_aws.metering.batch_records) == 3
    assert len(fake_aws.metering.requests_for("BatchMeterUsage")) == 2


def test_unprocessed_until_the_end_are_returned(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.unprocessed(1000)
    response = aws_sidecar.client.post("/v1/batch-meter-usage", json=_batch(2))
    assert response.status_code == 200, response.text
    assert len(response.json()["UnprocessedRecords"]) == 2
    assert response.json()["Results"] == []


def test_aws_errors_map_to_the_contract_statuses(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    metering = fake_aws.metering
    metering.products = {PRODUCT}
    bad_product = aws_sidecar.client.post(
        "/v1/meter-usage", json={**_meter(), "ProductCode": "prod-unknown"}
    )
    assert bad_product.status_code == 400
    assert bad_product.json()["code"] == "InvalidProductCodeException"
    assert bad_product.json()["aws_request_id"]

    metering.unentitled = True
    unentitled = aws_sidecar.client.post("/v1/register-usage", json={})
    assert unentitled.status_code == 403
    assert unentitled.json()["code"] == "CustomerNotEntitledException"
    metering.unentitled = False

    dimension = f"dim-{uuid.uuid4().hex[:8]}"
    assert aws_sidecar.client.post("/v1/meter-usage", json=_meter(dimension, 1)).status_code == 200
    duplicate = aws_sidecar.client.post("/v1/meter-usage", json=_meter(dimension, 2))
    assert duplicate.status_code == 409
    assert duplicate.json()["code"] == "DuplicateRequestException"

    token = str(uuid.uuid4())
    first = aws_sidecar.client.post("/v1/meter-usage", json={**_meter(), "ClientToken": token})
    assert first.status_code == 200
    conflict = aws_sidecar.client.post("/v1/meter-usage", json={**_meter(), "ClientToken": token})
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "IdempotencyConflictException"

    invalid = aws_sidecar.client.post("/v1/resolve-customer", json={"RegistrationToken": "nope"})
    assert invalid.status_code == 400
    assert invalid.json()["code"] == "InvalidTokenException"


def test_expired_registration_token_is_not_a_credential_problem(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.expired_tokens.add("old-token")
    response = aws_sidecar.client.post(
        "/v1/resolve-customer", json={"RegistrationToken": "old-token"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "ExpiredTokenException"
    assert response.json()["retryable"] is False
    # The code also means "our credentials expired": refreshed once, resent once; the
    # same answer with fresh credentials is about the buyer's token, and final.
    assert len(fake_aws.metering.requests) == 2
    assert len({r.body for r in fake_aws.metering.requests}) == 1


def test_refused_credentials_are_refreshed_once(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.faults.auth_failure(1, code="ExpiredTokenException")
    ok = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert ok.status_code == 200, ok.text
    assert len(fake_aws.metering.requests) == 2

    fake_aws.metering.faults.auth_failure(100, code="UnrecognizedClientException")
    refused = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert refused.status_code == 502, refused.text
    assert refused.json()["code"] == "CredentialsRejected"
    # One attempt, one refresh, one more attempt: never a storm.
    assert len(fake_aws.metering.requests) == 4
    metrics = aws_sidecar.client.get("/metrics").text
    assert 'metering_credential_refreshes_total{result="success",trigger="forced"}' in metrics


def test_dry_run_is_forwarded(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    response = aws_sidecar.client.post("/v1/meter-usage", json={**_meter(), "DryRun": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"DryRun": True}
    assert fake_aws.metering.requests[0].json()["DryRun"] is True
    assert fake_aws.metering.meter_usage_records == {}


def test_local_validation_sends_nothing(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    response = aws_sidecar.client.post(
        "/v1/meter-usage", json={"UsageDimension": "d", "UsageQuantity": -1}
    )
    assert response.status_code == 422
    assert fake_aws.metering.requests == []


def test_metrics_count_requests_upstream_calls_and_retries(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.throttle(1, action="MeterUsage")
    assert own_aws_sidecar.client.post("/v1/meter-usage", json=_meter()).status_code == 200
    text = own_aws_sidecar.client.get("/metrics").text
    assert (
        'metering_upstream_retries_total{action="MeterUsage",reason="ThrottlingException"}' in text
    )
    assert 'metering_upstream_requests_total{action="MeterUsage",outcome="throttled"}' in text
    assert 'metering_upstream_requests_total{action="MeterUsage",outcome="success"}' in text
    assert (
        'metering_http_requests_total{method="POST",route="/v1/meter-usage",status="200"}' in text
    )
    assert "metering_upstream_request_duration_seconds_bucket" in text
    assert "metering_credential_expiry_seconds +Inf" in text


def test_secrets_never_reach_the_log(
    aws_sidecar: Sidecar, fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    fake_aws.metering.faults.auth_failure(1)
    aws_sidecar.client.post("/v1/resolve-customer", json={"RegistrationToken": "secret-reg-tok"})
    aws_sidecar.client.post(
        "/v1/meter-usage", json=_meter(), headers={"Authorization": "Bearer caller-secret"}
    )
    log = aws_sidecar.log()
    assert static_key.secret_access_key not in log
    assert "secret-reg-tok" not in log
    assert "caller-secret" not in log
    assert "AWS4-HMAC-SHA256" not in log
    metrics = aws_sidecar.client.get("/metrics").text
    assert static_key.access_key_id not in metrics
    assert static_key.access_key_id not in log
