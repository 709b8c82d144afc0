"""Several sidecar processes on one PostgreSQL store, as a SaaS app's replicas run them:
usage summed across all of them, each grain sent once, a killed replica's work taken
over, and a database that goes away costing nothing that was answered 202 (the local
spool: tests/queue/test_spool_sidecars.py goes further)."""

from __future__ import annotations

import random
import signal
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, serve
from tests.pg import PgServer, new_database_name
from tests.queue.test_queue_api import LICENSE, wait_until
from tests.sidecar import Sidecar, run_sidecar

SHARED = {
    "METERING_QUEUE_GRACE": "0",
    "METERING_QUEUE_POLL_INTERVAL": "0.3",
    "METERING_QUEUE_RETRY_BASE_DELAY": "0.3",
    "METERING_QUEUE_RETRY_MAX_DELAY": "1",
    "METERING_QUEUE_CLAIM_LEASE": "3",
    "METERING_READ_TIMEOUT": "20",
    "METERING_ACCESS_LOG": "false",
}


def _hour(hours_ago: int) -> datetime:
    return (datetime.now(UTC) - timedelta(hours=hours_ago)).replace(
        minute=0, second=0, microsecond=0
    )


def _record(customer: str, quantity: int, minute: int, **fields: Any) -> dict[str, Any]:
    # 20 hours back: usage meeting a frozen grain rolls forward hour by hour, and
    # must land in an hour that has closed too, to be sent while the test waits.
    when = _hour(20) + timedelta(minutes=minute)
    return {
        "CustomerAWSAccountId": customer,
        "LicenseArn": LICENSE,
        "Dimension": "gb",
        "Quantity": quantity,
        "Timestamp": when.isoformat().replace("+00:00", "Z"),
        **fields,
    }


def _replica_env(url: str, dsn: str, key: IssuedKey) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
        **SHARED,
    }


def _post_all(replicas: list[Sidecar], calls: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Post every call, spread over the replicas, from concurrent threads; return the
    records each 202 accepted, with the id it got."""
    accepted: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(index: int, share: list[list[dict[str, Any]]]) -> None:
        with httpx.Client(base_url=replicas[index].url, timeout=30) as client:
            for records in share:
                response = client.post("/v1/usage-records", json={"UsageRecords": records})
                assert response.status_code == 202, response.text
                with lock:
                    for receipt in response.json()["Accepted"]:
                        accepted.append({**records[receipt["Index"]], "Id": receipt["Id"]})

    threads = [
        threading.Thread(target=worker, args=(i, calls[i :: len(replicas)]))
        for i in range(len(replicas))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return accepted


def _status(sidecar: Sidecar, record_id: str) -> dict[str, Any]:
    response = sidecar.client.get(f"/v1/usage-records/{record_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
def shared_dsn(postgres_server: PgServer) -> Iterator[str]:
    """A fresh database for three replicas to share."""
    name = new_database_name()
    yield postgres_server.create_database(name)
    postgres_server.drop_database(name)


def test_three_replicas_sum_into_one_record_per_grain_even_when_one_is_killed(
    shared_dsn: str,
) -> None:
    registry = KeyRegistry()
    keys = [registry.issue(f"arn:aws:iam::123456789012:user/replica-{i}", None) for i in range(3)]
    metering = FakeMetering(registry, region="us-east-1")
    # AWS holds the first BatchMeterUsage for a while: its sender is killed meanwhile.
    metering.faults.delay(6.0, 1, action="BatchMeterUsage")
    rng = random.Random(11)
    customers = [f"{300000000000 + n}" for n in range(40)]
    calls = [
        [_record(rng.choice(customers), rng.randint(1, 9), rng.randint(0, 59)) for _ in range(20)]
        for _ in range(30)
    ]
    with serve(metering) as fake, ExitStack() as stack:
        replicas = [
            stack.enter_context(
                run_sidecar(_replica_env(fake.url, shared_dsn, key), wait_ready=True)
            )
            for key in keys
        ]
        accepted = _post_all(replicas, calls)
        assert len(accepted) == 600
        # Whoever sent the held batch dies with it in flight.
        wait_until(lambda: bool(metering.requests_for("BatchMeterUsage")), 20, "first batch")
        held = metering.requests_for("BatchMeterUsage")[0]
        victim = next(i for i, key in enumerate(keys) if key.access_key_id == held.access_key_id)
        replicas[victim].stop(signal.SIGKILL)
        survivors = [r for i, r in enumerate(replicas) if i != victim]

        # An IdempotencyKey is the fleet's: a replay on another replica is the same record.
        key_record = _record(customers[0], 1, 5, IdempotencyKey=f"job-{uuid.uuid4()}")
        first = survivors[0].client.post("/v1/usage-records", json={"UsageRecords": [key_record]})
        replay = survivors[1].client.post("/v1/usage-records", json={"UsageRecords": [key_record]})
        assert first.status_code == replay.status_code == 202
        (first_receipt,) = first.json()["Accepted"]
        (replay_receipt,) = replay.json()["Accepted"]
        assert replay_receipt["Id"] == first_receipt["Id"]
        assert replay_receipt["Replayed"] is True
        accepted.append({**key_record, "Id": first_receipt["Id"]})

        def settled() -> bool:
            page = survivors[0].client.get("/v1/usage-records", params={"status": "pending"})
            return page.status_code == 200 and page.json()["Items"] == []

        wait_until(settled, 60, "every record settled")
        statuses = {r["Id"]: _status(survivors[0], r["Id"]) for r in accepted}
        # Every record ended accepted (a DuplicateRecord would have left it rejected),
        # and reads the same on every replica.
        assert {s["Status"] for s in statuses.values()} == {"accepted"}
        for survivor in survivors:
            assert 'outcome="duplicate_record"' not in survivor.client.get("/metrics").text
        for record_id in [r["Id"] for r in accepted[::37]]:
            assert _status(survivors[1], record_id) == statuses[record_id]

    # AWS saw one record per grain, never a DuplicateRecord, each the exact sum of what
    # was answered 202 (usage that met a frozen grain counted in the hour it rolled to).
    expected: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for record in accepted:
        grain = statuses[record["Id"]]["Grain"]
        hour = datetime.fromisoformat(grain["Hour"])
        expected[(record["CustomerAWSAccountId"], hour)] += record["Quantity"]
    billed = {(r.customer, r.hour): r.quantity for r in metering.batch_records.values()}
    assert billed == dict(expected)
    rolled = [s for s in statuses.values() if s["RolledForward"]]
    assert rolled, "some usage should have met a grain frozen by another replica"
    # The batch the killed replica had in flight was taken over and resent, identical.
    resent = [c for c in metering.requests_for("BatchMeterUsage") if c.body == held.body]
    assert len(resent) >= 2
    assert {c.access_key_id for c in resent[1:]} <= {keys[i].access_key_id for i in range(3)}


def test_a_database_stopped_mid_ingest_is_spooled_and_costs_nothing_answered_202(
    private_postgres: PgServer,
) -> None:
    dsn = private_postgres.create_database("queue")
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        # Nothing is sent while this test runs: the point is what the store keeps.
        "METERING_QUEUE_GRACE": "3600",
        "METERING_QUEUE_STATEMENT_TIMEOUT": "2",
        "METERING_QUEUE_STORE_DEADLINE": "3",
        "METERING_ACCESS_LOG": "false",
    }
    calls = [
        [
            {
                "CustomerAWSAccountId": f"{400000000000 + n % 7}",
                "LicenseArn": LICENSE,
                "Dimension": "gb",
                "Quantity": 1,
                "IdempotencyKey": f"call-{c}-record-{n}",
            }
            for n in range(10)
        ]
        for c in range(50)
    ]
    statuses: list[str] = []
    with run_sidecar(env, wait_ready=True) as sidecar:
        for index, records in enumerate(calls):
            if index == 20:
                private_postgres.stop("fast")
            if index == 25:
                # Not ready would take the app's pod out of its Service: degraded.
                ready = sidecar.client.get("/readyz")
                assert ready.status_code == 200
                assert ready.json()["status"] == "degraded"
                assert ready.json()["checks"]["queue"]["ok"] is False
                private_postgres.start()
            response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
            assert response.status_code == 202, response.text
            statuses += [r["Status"] for r in response.json()["Accepted"]]
        assert "spooled" in statuses, "stopping the database must show"
        # A client resends calls (same keys): each record is a replay where its first copy
        # is seen (in the spool, or in the store once it answers), or it is spooled while
        # the store is down, and found to be a replay when moved.
        resent: list[str] = []
        for records in calls[18:30]:
            again = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
            assert again.status_code == 202, again.text
            for receipt in again.json()["Accepted"]:
                assert receipt["Replayed"] or receipt["Status"] == "spooled", receipt
                if not receipt["Replayed"]:
                    resent.append(receipt["Id"])

        def moved() -> bool:
            metrics = sidecar.client.get("/metrics").text
            return "metering_spool_waiting_records 0.0" in metrics

        wait_until(moved, 60, "the spool moved")
        wait_until(lambda: sidecar.client.get("/readyz").json()["status"] == "ready", 30, "ready")
        for record_id in resent:
            view = sidecar.client.get(f"/v1/usage-records/{record_id}").json()
            assert view["Status"] == "replayed", view
            assert view["Spool"]["ReplayOf"] != record_id
    with psycopg.connect(dsn) as conn:
        (records,) = conn.execute("SELECT COUNT(*) FROM usage_records").fetchone() or (0,)
        (total,) = conn.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone() or (0,)
    # Every record exactly once: none lost to the outage, none counted twice.
    assert records == total == 500
