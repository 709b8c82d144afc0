"""Sync calls against the strict fake: answers read by code, resends that stay
idempotent, AWS's current window and quantity range, AWS's request quota kept."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from app.metering.billing import month_close
from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"


def _meter() -> dict[str, Any]:
    return {"UsageDimension": f"dim-{uuid.uuid4().hex[:10]}", "UsageQuantity": 3}


def _text(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    "code",
    [
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "InvalidClientTokenId",
        "IncompleteSignature",
    ],
)
def test_credentials_refused_with_400_are_refreshed_and_the_call_succeeds(
    aws_sidecar: Sidecar, fake_aws: FakeAws, code: str
) -> None:
    fake_aws.metering.faults.auth_failure(1, code=code, status=400, action="MeterUsage")
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    assert [r.status for r in fake_aws.metering.requests] == [400, 200]
    assert len({r.body for r in fake_aws.metering.requests}) == 1


def test_credentials_refused_throughout_are_502_and_readyz_names_the_cause(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.auth_failure(100, code="InvalidSignatureException", status=400)
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "CredentialsRejected"
    assert response.json()["retryable"] is True
    # One attempt, one refresh, one more attempt.
    assert len(fake_aws.metering.requests) == 2
    ready = aws_sidecar.client.get("/readyz")
    # Degraded, not unready: the app keeps serving, queued usage waits.
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    detail = ready.json()["checks"]["aws"]["detail"]
    assert detail.startswith("AWS has refused our credentials since ")
    assert "InvalidSignatureException" in detail
    assert (
        'metering_aws_problem{cause="credentials"} 1.0' in aws_sidecar.client.get("/metrics").text
    )
    fake_aws.metering.faults.clear()
    assert aws_sidecar.client.post("/v1/meter-usage", json=_meter()).status_code == 200
    ready = aws_sidecar.client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["aws"]["ok"] is True


@pytest.mark.parametrize(
    ("code", "status"),
    [("TooManyRequestsException", 429), ("RequestLimitExceeded", 400), ("Throttling", 400)],
)
def test_every_throttling_code_and_status_is_retried(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws, code: str, status: int
) -> None:
    fake_aws.metering.faults.throttle(2, code=code, status=status)
    response = own_aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 200, response.text
    assert [r.status for r in fake_aws.metering.requests] == [status, status, 200]


def test_throttled_by_429_throughout_is_429_with_retry_after(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.throttle(100, code="TooManyRequestsException", status=429)
    response = own_aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 429, response.text
    # AWS's own code, or, when AWS's throttling has slowed this replica down so far
    # that no slot is left before the call's deadline (a loaded machine's slower
    # retries get there), the sidecar's refusal under AWS's code for its quota.
    assert response.json()["code"] in ("TooManyRequestsException", "ThrottlingException")
    assert response.json()["retryable"] is True
    assert int(response.headers["retry-after"]) >= 1
    assert fake_aws.metering.requests, "AWS was asked before the call was refused"
    assert {r.status for r in fake_aws.metering.requests} == {429}


def test_access_denied_with_400_is_answered_at_once_and_not_as_a_5xx(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.auth_failure(1, code="AccessDeniedException", status=400)
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "AccessDeniedException"
    assert response.json()["retryable"] is False
    assert len(fake_aws.metering.requests) == 1


def test_an_unknown_code_is_not_retried_but_may_be_resent(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.server_error(1, status=400, code="BrandNewException")
    response = aws_sidecar.client.post("/v1/meter-usage", json=_meter())
    assert response.status_code == 400, response.text
    problem = response.json()
    assert problem["code"] == "BrandNewException"
    assert problem["retryable"] is True
    # A retryable MeterUsage names what it sent, so a resend stays idempotent.
    assert problem["ClientToken"] == fake_aws.metering.requests[0].json()["ClientToken"]
    assert len(fake_aws.metering.requests) == 1


def test_a_timed_out_meter_usage_names_its_token_and_a_resend_is_the_same_record(
    aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    # AWS takes the record but answers too late for the sidecar's 1 s read timeout.
    fake_aws.metering.faults.delay(1.5, 100, action="MeterUsage")
    body = _meter()
    response = aws_sidecar.client.post("/v1/meter-usage", json=body)
    assert response.status_code == 504, response.text
    problem = response.json()
    assert problem["retryable"] is True
    token, timestamp = problem["ClientToken"], problem["Timestamp"]
    uuid.UUID(token)
    datetime.fromisoformat(timestamp)
    sent = [r.json() for r in fake_aws.metering.requests]
    assert {s["ClientToken"] for s in sent} == {token}
    # The caller resends exactly what the problem names, once AWS answers in time.
    fake_aws.metering.faults.clear()
    resend = aws_sidecar.client.post(
        "/v1/meter-usage", json={**body, "ClientToken": token, "Timestamp": timestamp}
    )
    assert resend.status_code == 200, resend.text
    records = [
        r
        for r in fake_aws.metering.meter_usage_records.values()
        if r.dimension == body["UsageDimension"]
    ]
    assert len(records) == 1
    assert resend.json()["MeteringRecordId"] == records[0].metering_record_id
    # Only retryable problems carry them.
    bad = aws_sidecar.client.post("/v1/meter-usage", json={**body, "ProductCode": "x y"})
    assert "ClientToken" not in bad.json()


def test_a_batch_record_seven_hours_old_is_sent(aws_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    now = datetime.now(UTC)
    event = now - timedelta(hours=7)
    record = {
        "Timestamp": _text(event),
        "CustomerAWSAccountId": "111122223333",
        "Dimension": f"dim-{uuid.uuid4().hex[:8]}",
        "QuantityAsDecimal": "3000000000.5",
        "LicenseArn": LICENSE,
    }
    response = aws_sidecar.client.post("/v1/batch-meter-usage", json={"UsageRecords": [record]})
    if now >= month_close(event):
        # Within 7 hours of 06:00 UTC on the 1st: last month has closed, for AWS too.
        assert response.status_code == 422, response.text
        return
    assert response.status_code == 200, response.text
    assert response.json()["Results"][0]["Status"] == "Success"
    (billed,) = fake_aws.metering.batch_records.values()
    assert billed.quantity == Decimal("3000000000.5")


@pytest.fixture
def quota_sidecar(fake_aws: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """A sidecar with AWS's published quotas (the default) and a 4-second deadline."""
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        **{
            **FAST_RETRIES,
            "METERING_REQUEST_DEADLINE": "4",
            "METERING_READ_TIMEOUT": "10",
            "METERING_ACCESS_LOG": "false",
        },
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


async def _storm(url: str, calls: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        return await asyncio.gather(
            *(client.post("/v1/meter-usage", json=_meter()) for _ in range(calls))
        )


def test_a_burst_of_150_calls_stays_inside_awss_quota(
    quota_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.set_quota("MeterUsage", rate=10)
    responses = asyncio.run(_storm(quota_sidecar.url, 150))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, [r.text for r in responses if r.status_code >= 500]
    ok = statuses.count(200)
    # 10 at once, then 10 a second until a second before the 4-second deadline.
    assert 25 <= ok <= 45, ok
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["retryable"] is True
    # AWS saw about as many requests as it allows, and throttled at most a few: the
    # sidecar releases calls at AWS's rate by its own clock, and on a loaded machine
    # some arrive bunched inside AWS's second (5 of 150 seen under a load average of 5).
    sent = fake_aws.metering.requests_for("MeterUsage")
    throttled = fake_aws.metering.throttled_by_quota("MeterUsage")
    assert throttled <= 8
    assert len(sent) <= ok + throttled + 6
    metrics = quota_sidecar.client.get("/metrics").text
    assert 'metering_quota_refusals_total{action="MeterUsage"}' in metrics
