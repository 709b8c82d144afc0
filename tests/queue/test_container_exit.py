"""Container mode at SIGTERM: the pod's last, partial hour is sent until AWS takes it or
the shutdown deadline comes, not for one cycle of a few attempts."""

from __future__ import annotations

import signal

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import run_sidecar


def test_a_container_sidecar_keeps_sending_its_partial_hour_through_the_deadline(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        **{
            **FAST_RETRIES,
            "METERING_QUEUE_MODE": "container",
            "METERING_SHUTDOWN_TIMEOUT": "10",
            "METERING_ACCESS_LOG": "false",
        },
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        queued = sidecar.client.post(
            "/v1/usage-records", json={"UsageRecords": [{"Dimension": "d", "Quantity": 3}]}
        )
        assert queued.status_code == 202, queued.text
        # AWS fails the first eight attempts: more than one cycle's sends make.
        fake_aws.metering.faults.server_error(8, action="MeterUsage")
        code = sidecar.stop(signal.SIGTERM, timeout=30)
        log = sidecar.log()
    assert code in (0, -signal.SIGTERM), log[-2000:]
    sent = fake_aws.metering.requests_for("MeterUsage")
    assert len(sent) == 9, log[-3000:]
    (billed,) = [r.json() for r in sent if r.status == 200]
    assert billed["UsageDimension"] == "d"
    assert billed["UsageQuantity"] == 3
    assert "partial hour not fully sent" not in log
