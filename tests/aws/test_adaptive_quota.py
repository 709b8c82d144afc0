"""A replica slows down by itself when AWS throttles it (another sender shares the account's
quota), says so on /readyz and in a metric, and climbs back once AWS lets it."""

from __future__ import annotations

import re

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import run_sidecar


def _adaptive_rate(metrics: str) -> float:
    found = re.search(r'metering_quota_adaptive_rate\{action="MeterUsage"\} (\S+)', metrics)
    assert found, metrics
    return float(found.group(1))


def test_throttling_slows_the_replica_down_and_readyz_says_so(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        **{**FAST_RETRIES, "METERING_ACCESS_LOG": "false"},
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        assert _adaptive_rate(sidecar.client.get("/metrics").text) == 10
        # Someone else in the account uses the quota up: AWS throttles every request.
        fake_aws.metering.faults.throttle(1000, action="MeterUsage")
        for n in range(3):
            response = sidecar.client.post(
                "/v1/meter-usage", json={"UsageDimension": f"d{n}", "UsageQuantity": 1}
            )
            assert response.status_code == 429, response.text
        throttled = len(fake_aws.metering.requests_for("MeterUsage"))
        assert throttled >= 3
        rate = _adaptive_rate(sidecar.client.get("/metrics").text)
        assert rate < 10
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 200
        quota = ready.json()["checks"]["quota"]
        assert quota["blocking"] is False
        assert f"AWS throttled MeterUsage: this replica sends it at {rate:.3g}/s" in quota["detail"]
        assert "slows down by itself" in sidecar.log()
        # AWS lets everything through again: answers without throttling bring the rate
        # back to the configured one.
        fake_aws.metering.faults.clear()
        for n in range(40):
            response = sidecar.client.post(
                "/v1/meter-usage", json={"UsageDimension": f"e{n}", "UsageQuantity": 1}
            )
            assert response.status_code == 200, response.text
            if _adaptive_rate(sidecar.client.get("/metrics").text) == 10:
                break
        else:
            raise AssertionError("the rate did not climb back")
        assert (
            "AWS throttled" not in sidecar.client.get("/readyz").json()["checks"]["quota"]["detail"]
        )
