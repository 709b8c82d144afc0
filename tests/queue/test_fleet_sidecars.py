"""Replicas on one shared store, as processes (and, for a skewed clock, in-process apps):
the account's quota kept by all of them together, one set of grain rules, the database's
clock for the fleet's decisions, and sending that goes on while the store is away."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.metering.billing import utc_now
from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, KeyRegistry, serve
from tests.pg import PgServer, new_database_name
from tests.queue.test_queue_api import LICENSE, wait_until
from tests.sidecar import REPO, Sidecar, isolated_env, run_sidecar

# The account's BatchMeterUsage quota in these tests, and AWS's (the fake's) alike.
RATE = 5


@pytest.fixture
def shared_dsn(postgres_server: PgServer) -> Iterator[str]:
    """A fresh database for the replicas to share."""
    name = new_database_name()
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def _sandbox_env(dsn: str, **extra: str) -> dict[str, str]:
    return {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "METERING_ACCESS_LOG": "false",
        **extra,
    }


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m app`` with ``args``, in an environment like a replica's."""
    with tempfile.TemporaryDirectory(prefix="fleet-command-") as home:
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            cwd=REPO,
            env=isolated_env(env, Path(home)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def test_a_replica_with_another_grace_refuses_to_start_until_the_fleet_changes(
    shared_dsn: str,
) -> None:
    fleet_env = _sandbox_env(shared_dsn)
    odd_env = _sandbox_env(shared_dsn, METERING_QUEUE_GRACE="60")
    with run_sidecar(fleet_env, wait_ready=True):
        with pytest.raises(RuntimeError) as refused, run_sidecar(odd_env):
            pass
        log = str(refused.value)
        assert "refusing to start" in log
        assert "METERING_QUEUE_GRACE is 60.0 here, 300.0 in the fleet" in log
        assert "python -m app fleet-settings --write" in log
        # Nothing else differs, and nothing else is named.
        assert "METERING_PRODUCT_CODE is" not in log
        # The command shows the difference and changes nothing without --write...
        shown = _command(odd_env, "fleet-settings")
        assert shown.returncode == 1, shown.stderr
        assert "METERING_QUEUE_GRACE is 60.0 here, 300.0 in the fleet" in shown.stdout
        with pytest.raises(RuntimeError), run_sidecar(odd_env):
            pass
        # ... and with --write makes these settings the fleet's.
        written = _command(odd_env, "fleet-settings", "--write")
        assert written.returncode == 0, written.stderr
        assert _command(odd_env, "fleet-settings").returncode == 0
    with run_sidecar(odd_env, wait_ready=True) as changed:
        assert changed.client.get("/readyz").status_code == 200
        # Now a replica with the old grace is the odd one.
        with pytest.raises(RuntimeError) as old, run_sidecar(fleet_env):
            pass
        assert "METERING_QUEUE_GRACE is 300.0 here, 60.0 in the fleet" in str(old.value)
    # Without a shared store the command has nothing to compare with.
    assert _command({"METERING_MODE": "sandbox"}, "fleet-settings").returncode == 2


def _replica_env(url: str, dsn: str, access_key_id: str, secret: str) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        # The account's quota, given to every replica alike.
        "METERING_QUOTA_BATCH_METER_USAGE": str(RATE),
        "METERING_QUEUE_GRACE": "0",
        "METERING_QUEUE_POLL_INTERVAL": "0.3",
        # Shorter than sending the queue takes at the quota: the claims are renewed.
        "METERING_QUEUE_CLAIM_LEASE": "3",
        "METERING_REQUEST_DEADLINE": "30",
        "METERING_READ_TIMEOUT": "20",
        "METERING_ACCESS_LOG": "false",
    }


def _license(n: int) -> str:
    return f"arn:aws:license-manager::123456789012:license:l-{n:016x}"


def test_three_replicas_keep_to_the_accounts_quota_together(shared_dsn: str) -> None:
    registry = KeyRegistry()
    keys = [registry.issue(f"arn:aws:iam::123456789012:user/replica-{i}", None) for i in range(3)]
    metering = FakeMetering(registry, region="us-east-1")
    # AWS's quota for the account: RATE a second; a request past it is throttled.
    metering.set_quota("BatchMeterUsage", RATE, burst=RATE)
    hour = (datetime.now(UTC) - timedelta(hours=2)).replace(minute=10, second=0, microsecond=0)
    # 320 grains of as many licenses: each its own BatchMeterUsage call. With 80 direct
    # calls beside them, 400 requests: more than a minute of the quota.
    queued = [
        {
            "CustomerAWSAccountId": "123456789012",
            "LicenseArn": _license(n),
            "Dimension": "gb",
            "Quantity": n + 1,
            "Timestamp": hour.isoformat().replace("+00:00", "Z"),
        }
        for n in range(320)
    ]
    direct: dict[int, list[int]] = {1: [], 2: []}
    with serve(metering) as fake, ExitStack() as stack:
        replicas = [
            stack.enter_context(
                run_sidecar(
                    _replica_env(fake.url, shared_dsn, key.access_key_id, key.secret_access_key),
                    wait_ready=True,
                )
            )
            for key in keys
        ]
        response = replicas[0].client.post("/v1/usage-records", json={"UsageRecords": queued})
        assert response.status_code == 202, response.text

        def caller(index: int) -> None:
            with httpx.Client(base_url=replicas[index].url, timeout=60) as client:
                for n in range(40):
                    record = {
                        "Timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                        "CustomerAWSAccountId": "123456789012",
                        "LicenseArn": _license(10_000 * index + n),
                        "Dimension": "calls",
                        "Quantity": 1,
                    }
                    answer = client.post("/v1/batch-meter-usage", json={"UsageRecords": [record]})
                    direct[index].append(answer.status_code)

        threads = [threading.Thread(target=caller, args=(i,)) for i in direct]
        for thread in threads:
            thread.start()

        def settled() -> bool:
            page = replicas[1].client.get("/v1/usage-records", params={"status": "pending"})
            return page.status_code == 200 and page.json()["Items"] == []

        wait_until(settled, 240, "every queued grain sent")
        for thread in threads:
            thread.join(120)
    sent = metering.requests_for("BatchMeterUsage")
    # No request was throttled: together the replicas kept to the account's quota...
    assert metering.throttled_by_quota("BatchMeterUsage") == 0
    assert {r.status for r in sent} == {200}
    # ... in every second AWS counted, whatever each replica's share was.
    per_second = Counter(int(r.received_at.timestamp()) for r in sent)
    assert max(per_second.values()) <= RATE, sorted(per_second.items())
    assert len(sent) == 400
    assert direct == {1: [200] * 40, 2: [200] * 40}
    # Each queued grain billed once. The direct calls came from two replicas, the queue's
    # sends from whichever replicas claimed its grains: all from one budget.
    billed = {r.product for r in metering.batch_records.values()}
    assert {_license(n) for n in range(320)} <= billed
    assert {keys[1].access_key_id, keys[2].access_key_id} <= {r.access_key_id for r in sent}


@asynccontextmanager
async def _replica(settings: Settings, clock: Any = utc_now) -> AsyncIterator[FastAPI]:
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        yield app


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sidecar")


async def test_a_replica_ahead_by_hours_sends_nothing_early(
    shared_dsn: str, tmp_path: Path
) -> None:
    def settings(name: str) -> Settings:
        return Settings(
            mode="sandbox",
            product_code=PRODUCT,
            queue_dsn=shared_dsn,
            queue_path=tmp_path / name / "spool.sqlite3",
            access_log=False,
        )

    async with AsyncExitStack() as stack:
        honest = await stack.enter_async_context(_replica(settings("honest")))
        # Two hours ahead: its own clock says the current hour closed long ago.
        ahead = await stack.enter_async_context(
            _replica(settings("ahead"), lambda: utc_now() + timedelta(hours=2))
        )
        record = {
            "CustomerAWSAccountId": "123456789012",
            "LicenseArn": LICENSE,
            "Dimension": "d",
            "Quantity": 3,
        }
        async with _client(honest) as client:
            answer = await client.post("/v1/usage-records", json={"UsageRecords": [record]})
            assert answer.status_code == 202, answer.text
            (receipt,) = answer.json()["Accepted"]
        sidecar = ahead.state.sidecar
        await sidecar.queue.dispatcher.run_once()
        async with _client(ahead) as client:
            grain = (await client.get(f"/v1/usage-grains/{receipt['GrainId']}")).json()
            # The hour is the database's current one: not due, not frozen, not sent.
            assert grain["Status"] == "open", grain
            assert grain["Hour"] == receipt["Hour"]
            ready = (await client.get("/readyz")).json()
            metrics = (await client.get("/metrics")).text
        clock = ready["checks"]["clock"]
        assert clock["blocking"] is False
        assert "s ahead of the shared store's" in clock["detail"]
        skew = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("metering_clock_skew_seconds ")
        )
        assert abs(skew - 7200) < 2


def test_sending_goes_on_at_a_share_of_the_quota_while_the_store_is_away(
    private_postgres: PgServer,
) -> None:
    dsn = private_postgres.create_database("fleet")
    registry = KeyRegistry()
    key = registry.issue("arn:aws:iam::123456789012:user/replica", None)
    metering = FakeMetering(registry, region="us-east-1")
    env = {
        **_replica_env("", dsn, key.access_key_id, key.secret_access_key),
        "METERING_QUOTA_BATCH_METER_USAGE": "8",
        "METERING_QUOTA_FALLBACK_DIVISOR": "4",
        "METERING_QUEUE_STORE_DEADLINE": "2",
    }
    with (
        serve(metering) as fake,
        run_sidecar({**env, "METERING_ENDPOINT_URL": fake.url}, wait_ready=True) as sidecar,
    ):
        assert sidecar.client.get("/readyz").json()["checks"]["quota"]["ok"] is True
        private_postgres.stop("fast")
        statuses = [_direct_call(sidecar, n).status_code for n in range(6)]
        # Sending never stops for the store...
        assert statuses == [200] * 6
        ready = sidecar.client.get("/readyz").json()
        quota = ready["checks"]["quota"]
        assert quota["ok"] is False
        assert "cannot be reached in the shared store" in quota["detail"]
        assert "divided by 4" in quota["detail"]
        assert "metering_quota_shared_unreachable 1.0" in sidecar.client.get("/metrics").text
        # ... and keeps to 8 / 4 = 2 a second meanwhile (a burst of 2, then the pace).
        sent = metering.requests_for("BatchMeterUsage")
        span = (sent[-1].received_at - sent[0].received_at).total_seconds()
        assert span >= (len(sent) - 2) / 2 - 0.1
        private_postgres.start()

        def shared_again() -> bool:
            _direct_call(sidecar, 99)
            return sidecar.client.get("/readyz").json()["checks"]["quota"]["ok"] is True

        wait_until(shared_again, 60, "the quota shared again")
        assert "metering_quota_shared_unreachable 0.0" in sidecar.client.get("/metrics").text


def _direct_call(sidecar: Sidecar, n: int) -> httpx.Response:
    record = {
        "Timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "CustomerAWSAccountId": "123456789012",
        "LicenseArn": _license(50_000 + n),
        "Dimension": "calls",
        "Quantity": 1,
    }
    started = time.monotonic()
    response = sidecar.client.post("/v1/batch-meter-usage", json={"UsageRecords": [record]})
    assert time.monotonic() - started < 30
    return response
