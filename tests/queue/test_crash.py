"""kill -9 at each point of the send path, then restart: nothing lost, nothing doubled.

Each test runs its own fake AWS on a fixed port (so it can be down, then
back) and keeps the sidecar's queue file across restarts.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, serve
from tests.queue.test_queue_api import QUEUE_FAST, record, wait_until
from tests.sidecar import Sidecar, free_port, run_sidecar


class Upstream:
    """A fake AWS that can be started and stopped on one port."""

    def __init__(self) -> None:
        self.registry = KeyRegistry()
        self.key: IssuedKey = self.registry.issue("arn:aws:iam::123456789012:user/crash", None)
        self.metering = FakeMetering(self.registry, region="us-east-1")
        self.port = free_port()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Serve until the block ends."""
        with serve(self.metering, port=self.port):
            yield

    def sent_records(self) -> list[dict[str, object]]:
        """Every record of every BatchMeterUsage the fake processed."""
        return [
            r
            for call in self.metering.requests_for("BatchMeterUsage")
            if call.status == 200
            for r in call.json()["UsageRecords"]
        ]


@pytest.fixture
def upstream() -> Upstream:
    """A fresh fake AWS, not yet started."""
    return Upstream()


@contextmanager
def sidecar(upstream: Upstream, queue_path: Path, **extra: str) -> Iterator[Sidecar]:
    """A sidecar on ``queue_path`` sending to ``upstream``."""
    env = {
        "METERING_ENDPOINT_URL": f"http://127.0.0.1:{upstream.port}",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_PATH": str(queue_path),
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": upstream.key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": upstream.key.secret_access_key,
        "METERING_READ_TIMEOUT": "10",
        "METERING_CONNECT_TIMEOUT": "1",
        **QUEUE_FAST,
        **extra,
    }
    with run_sidecar(env) as process:
        yield process


def _queue(process: Sidecar, customers: list[str], quantity: int = 3) -> list[str]:
    response = process.client.post(
        "/v1/usage-records",
        json={"UsageRecords": [record(c, quantity) for c in customers]},
    )
    assert response.status_code == 202, response.text
    return [a["Id"] for a in response.json()["Accepted"]]


def _all_accepted(process: Sidecar, ids: list[str]) -> bool:
    return all(
        process.client.get(f"/v1/usage-records/{i}").json()["Status"] == "accepted" for i in ids
    )


def _assert_once_each(upstream: Upstream, customers: list[str], quantity: int = 3) -> None:
    billed = list(upstream.metering.batch_records)
    assert sorted(g[1] for g in billed) == sorted(customers), "each grain billed exactly once"
    for grain_record in upstream.metering.batch_records.values():
        assert grain_record.quantity == quantity


def _customers(n: int) -> list[str]:
    return [str(uuid.uuid4().int)[:12] for _ in range(n)]


def test_killed_before_sending(upstream: Upstream, tmp_path: Path) -> None:
    customers = _customers(3)
    queue_path = tmp_path / "queue.sqlite3"
    # AWS unreachable: the grains freeze and fail to go out.
    with sidecar(upstream, queue_path) as process:
        ids = _queue(process, customers)
        wait_until(
            lambda: all(
                process.client.get(f"/v1/usage-records/{i}").json()["Grain"]["Status"] == "frozen"
                for i in ids
            ),
            message="grains frozen",
        )
        process.stop(signal.SIGKILL)
    with upstream.running(), sidecar(upstream, queue_path) as process:
        wait_until(lambda: _all_accepted(process, ids), message="sent after restart")
    _assert_once_each(upstream, customers)


def test_killed_after_sending_before_recording(upstream: Upstream, tmp_path: Path) -> None:
    customers = _customers(3)
    queue_path = tmp_path / "queue.sqlite3"
    with upstream.running():
        # AWS takes the call but answers late: the sidecar dies before it hears back.
        upstream.metering.faults.delay(1.5, 1, action="BatchMeterUsage")
        with sidecar(upstream, queue_path) as process:
            ids = _queue(process, customers)
            wait_until(lambda: bool(upstream.metering.requests), message="call reached AWS")
            process.stop(signal.SIGKILL)
        wait_until(lambda: len(upstream.metering.batch_records) == 3, message="AWS processed it")
        with sidecar(upstream, queue_path) as process:
            wait_until(lambda: _all_accepted(process, ids), message="settled after restart")
            views = [process.client.get(f"/v1/usage-records/{i}").json() for i in ids]
    _assert_once_each(upstream, customers)
    # The resend was byte-identical, so AWS gave back the ids of the first call.
    first_ids = {r.metering_record_id for r in upstream.metering.batch_records.values()}
    assert {v["MeteringRecordId"] for v in views} == first_ids
    calls = upstream.metering.requests_for("BatchMeterUsage")
    assert len(calls) == 2
    assert calls[0].json()["UsageRecords"] == calls[1].json()["UsageRecords"]


def test_killed_mid_batch(upstream: Upstream, tmp_path: Path) -> None:
    customers = _customers(30)  # one product: a call of 25, then a call of 5
    queue_path = tmp_path / "queue.sqlite3"
    with upstream.running():
        upstream.metering.faults.delay(1.5, 2, action="BatchMeterUsage")
        with sidecar(upstream, queue_path) as process:
            ids = _queue(process, customers)
            wait_until(
                lambda: len(upstream.metering.requests_for("BatchMeterUsage")) == 2,
                message="second call reached AWS",
            )
            process.stop(signal.SIGKILL)
        with sidecar(upstream, queue_path) as process:
            wait_until(lambda: _all_accepted(process, ids), timeout=30, message="all settled")
    _assert_once_each(upstream, customers)
    assert len(upstream.sent_records()) >= 30


def test_upstream_down_for_a_while_then_back(upstream: Upstream, tmp_path: Path) -> None:
    customers = _customers(4)
    with sidecar(upstream, tmp_path / "queue.sqlite3") as process:
        ids = _queue(process, customers)
        wait_until(
            lambda: all(
                process.client.get(f"/v1/usage-records/{i}").json()["Grain"]["Attempts"] >= 2
                for i in ids
            ),
            message="attempts failing while AWS is down",
        )
        with upstream.running():
            wait_until(lambda: _all_accepted(process, ids), message="delivered once back")
    _assert_once_each(upstream, customers)


def test_container_mode_sends_the_partial_hour_on_sigterm(
    upstream: Upstream, tmp_path: Path
) -> None:
    with upstream.running():
        with sidecar(upstream, tmp_path / "queue.sqlite3", METERING_QUEUE_MODE="container") as p:
            response = p.client.post(
                "/v1/usage-records",
                json={"UsageRecords": [{"Dimension": "vcpu", "Quantity": 7}]},
            )
            assert response.status_code == 202, response.text
            assert upstream.metering.requests == []
            exit_code = p.stop(signal.SIGTERM)
            assert exit_code in (0, -signal.SIGTERM), p.log()
        (call,) = upstream.metering.requests_for("MeterUsage")
        assert call.status == 200
        assert call.json()["UsageQuantity"] == 7
        assert len(upstream.metering.meter_usage_records) == 1
