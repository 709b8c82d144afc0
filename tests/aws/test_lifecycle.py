"""Process lifecycle: draining in-flight calls on SIGTERM, and what one request logs."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid

import httpx

from tests.conftest import FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import run_sidecar


def test_sigterm_drains_in_flight_calls(fake_aws: FakeAws, static_key: IssuedKey) -> None:
    env = aws_mode_env(fake_aws.url, static_key, METERING_READ_TIMEOUT="5")
    fake_aws.metering.faults.delay(1.5, 1)
    with run_sidecar(env, wait_ready=True) as sidecar:
        outcome: list[httpx.Response] = []

        def call() -> None:
            with httpx.Client(base_url=sidecar.url, timeout=10) as client:
                body = {"UsageDimension": f"d-{uuid.uuid4().hex[:8]}", "UsageQuantity": 1}
                outcome.append(client.post("/v1/meter-usage", json=body))

        caller = threading.Thread(target=call)
        caller.start()
        # Wait until the call has reached the fake, then ask the process to stop.
        deadline = time.monotonic() + 5
        while not fake_aws.metering.requests and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake_aws.metering.requests
        exit_code = sidecar.stop(signal.SIGTERM)
        caller.join(10)
        # uvicorn re-raises the signal once it has shut down cleanly.
        assert exit_code in (0, -signal.SIGTERM), sidecar.log()
        assert outcome, "the in-flight call got no answer"
        assert outcome[0].status_code == 200, outcome[0].text
        assert "metering-sidecar stopping" in sidecar.log()


def test_access_log_line_carries_both_request_ids(fake_aws: FakeAws, static_key: IssuedKey) -> None:
    env = aws_mode_env(fake_aws.url, static_key)
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post(
            "/v1/meter-usage",
            json={"UsageDimension": f"d-{uuid.uuid4().hex[:8]}", "UsageQuantity": 1},
            headers={"X-Request-Id": "trace-42"},
        )
        assert response.status_code == 200
        time.sleep(0.2)
        lines = [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "app.access"]
    (line,) = [a for a in access if a.get("request_id") == "trace-42"]
    assert line["route"] == "/v1/meter-usage"
    assert line["status"] == 200
    assert line["aws_request_id"] == response.headers["x-amzn-requestid"]
    assert all(isinstance(x["msg"], str) and x["level"] for x in lines)
