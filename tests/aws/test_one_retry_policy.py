"""One retry policy: every request a call sends is one of its attempts, whatever sends it.

The sidecar here runs with ``METERING_MAX_ATTEMPTS=4`` (``FAST_RETRIES``): a REST
call never sends more than four requests, counting the transport's retries,
BatchMeterUsage's UnprocessedRecords rounds and the resend with refreshed
credentials alike.
"""

from __future__ import annotations

import ast
from typing import Any

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws
from tests.sidecar import REPO, Sidecar

MAX_ATTEMPTS = int(FAST_RETRIES["METERING_MAX_ATTEMPTS"])


def _batch(count: int) -> dict[str, Any]:
    from tests.aws.test_forwarding import _batch as batch

    body: dict[str, Any] = batch(count)
    return body


def test_unprocessed_rounds_and_retries_share_the_calls_attempts(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.unprocessed(1000)
    fake_aws.metering.faults.throttle(1, action="BatchMeterUsage")
    response = own_aws_sidecar.client.post("/v1/batch-meter-usage", json=_batch(2))
    assert response.status_code == 200, response.text
    assert len(response.json()["UnprocessedRecords"]) == 2
    # One throttled request, then rounds of unprocessed records: four requests in all,
    # not four rounds of up to four attempts each.
    assert len(fake_aws.metering.requests_for("BatchMeterUsage")) == MAX_ATTEMPTS


def test_the_resend_with_refreshed_credentials_is_an_attempt(
    own_aws_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.products = {PRODUCT}
    fake_aws.metering.faults.throttle(MAX_ATTEMPTS - 1, action="MeterUsage")
    fake_aws.metering.faults.auth_failure(1, action="MeterUsage")
    response = own_aws_sidecar.client.post(
        "/v1/meter-usage", json={"UsageDimension": "users", "UsageQuantity": 1}
    )
    # The fourth request was refused; no fifth goes out below the policy.
    assert len(fake_aws.metering.requests_for("MeterUsage")) == MAX_ATTEMPTS
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "CredentialsRejected"
    assert response.json()["retryable"] is True
    # With attempts left, the refreshed credentials do go out (and are taken).
    fake_aws.metering.faults.auth_failure(1, action="MeterUsage")
    again = own_aws_sidecar.client.post(
        "/v1/meter-usage", json={"UsageDimension": "users", "UsageQuantity": 1}
    )
    assert again.status_code == 200, again.text


def test_only_the_retry_module_decides_pauses_and_attempts() -> None:
    """Nothing under app/ builds its own backoff or attempts but ``app.runtime.retry`` (and the
    credential chain's refresh loop, which is botocore's schedule, not a resend)."""
    allowed = {REPO / "app" / "runtime" / "retry.py", REPO / "app" / "aws" / "credentials.py"}
    for path in sorted((REPO / "app").rglob("*.py")):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"Backoff", "Attempts", "RetryBudget"}, (
                    f"{path.relative_to(REPO)} builds its own {node.func.id}"
                )
