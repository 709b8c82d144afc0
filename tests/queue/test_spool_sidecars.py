"""Sidecar processes on a PostgreSQL store that fails for real: stopped with SIGSTOP,
restarted, down when a sidecar starts, a commit's answer lost, the spool's disk full.
Every record answered 202 is billed exactly once (the fake AWS counts), the sidecars
stay ready (degraded), and none answers 5xx for usage while its spool can be written."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, serve
from tests.pg import PgServer, new_database_name
from tests.queue.pg_faults import TcpProxy, freeze, frozen, thaw
from tests.queue.test_queue_api import LICENSE, wait_until
from tests.sidecar import Sidecar, run_sidecar

ENV = {
    "METERING_QUEUE_GRACE": "0",
    "METERING_QUEUE_POLL_INTERVAL": "0.3",
    "METERING_QUEUE_RETRY_BASE_DELAY": "0.3",
    "METERING_QUEUE_RETRY_MAX_DELAY": "1",
    "METERING_QUEUE_CLAIM_LEASE": "3",
    "METERING_QUEUE_STORE_DEADLINE": "3",
    "METERING_QUEUE_STATEMENT_TIMEOUT": "2",
    "METERING_QUEUE_CONNECT_TIMEOUT": "2",
    "METERING_QUEUE_IDLE_TRANSACTION_TIMEOUT": "5",
    "METERING_READ_TIMEOUT": "20",
    "METERING_ACCESS_LOG": "false",
    # The fake AWS sets no quota here: what these tests are about is the store's
    # outages, and settling thousands of grains at AWS's 10 a second took half a minute.
    "METERING_QUOTA_BATCH_METER_USAGE": "40",
}


def _env(url: str, dsn: str, key: IssuedKey, **extra: str) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
        **ENV,
        **extra,
    }


def _record(customer: str, quantity: int, hours_ago: int, minute: int) -> dict[str, Any]:
    # Hours long closed: due at once (grace 0), and far enough back that usage rolling
    # forward past grains sent meanwhile still lands in a closed hour.
    hour = (datetime.now(UTC) - timedelta(hours=hours_ago)).replace(
        minute=0, second=0, microsecond=0
    )
    when = hour + timedelta(minutes=minute)
    return {
        "CustomerAWSAccountId": customer,
        "LicenseArn": LICENSE,
        "Dimension": "gb",
        "Quantity": quantity,
        "Timestamp": when.isoformat().replace("+00:00", "Z"),
    }


def _metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    """A sample from the sidecar's /metrics (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{wanted}}}" if wanted else name
    for line in sidecar.client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _log_lines(sidecar: Sidecar) -> list[dict[str, Any]]:
    lines = []
    for line in sidecar.log().splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def _stored(dsn: str) -> dict[str, tuple[str, datetime, str]]:
    """Every record in the store: id -> (customer, its grain's hour, its grain's status)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT r.id, g.customer_aws_account_id, g.hour, g.status FROM usage_records r "
            "JOIN grains g ON g.id = r.grain_id"
        ).fetchall()
    return {row[0]: (row[1], datetime.fromtimestamp(row[2], UTC), row[3]) for row in rows}


def _assert_billed_once(
    metering: FakeMetering, dsn: str, accepted: dict[str, dict[str, Any]]
) -> None:
    """Every record answered 202 is in the store once, in a grain AWS took, and AWS
    billed each grain once, with the exact sum of those records."""
    stored = _stored(dsn)
    assert set(accepted) <= set(stored), sorted(set(accepted) - set(stored))[:10]
    expected: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for record_id, record in accepted.items():
        customer, hour, status = stored[record_id]
        assert status == "accepted", (record_id, status)
        expected[(customer, hour)] += Decimal(record["Quantity"])
    billed = {(r.customer, r.hour): r.quantity for r in metering.batch_records.values()}
    assert billed == dict(expected)


def _settled(sidecars: list[Sidecar]) -> bool:
    """Nothing waits in any spool, and nothing in the store is unsent."""
    for sidecar in sidecars:
        if _metric(sidecar, "metering_spool_waiting_records") != 0:
            return False
    page = sidecars[0].client.get("/v1/usage-records", params={"status": "pending", "limit": 1})
    return page.status_code == 200 and page.json()["Items"] == []


def _wait_settled(sidecars: list[Sidecar], timeout: float) -> None:
    """Until ``_settled``; else fail saying what still waits, and where."""
    deadline = time.monotonic() + timeout
    while not _settled(sidecars):
        if time.monotonic() > deadline:
            spools = [_metric(s, "metering_spool_waiting_records") for s in sidecars]
            readiness = [s.client.get("/readyz").json() for s in sidecars]
            pending = sidecars[0].client.get(
                "/v1/usage-records", params={"status": "pending", "limit": 5}
            )
            tails = ["\n".join(s.log().splitlines()[-15:]) for s in sidecars]
            pytest.fail(
                f"not settled: spools {spools}; readiness {readiness}; "
                f"pending {pending.status_code} {pending.text[:3000]}; logs {tails}"
            )
        time.sleep(0.1)


@dataclass
class Traffic:
    """Clients posting usage to each sidecar, and one asking each for /readyz, until
    stopped; every answer kept."""

    sidecars: list[Sidecar]
    seed: int = 7
    statuses: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    spooled: int = 0
    readiness: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index, sidecar in enumerate(self.sidecars):
            self._threads.append(
                threading.Thread(target=self._post, args=(sidecar, self.seed + index))
            )
        self._threads.append(threading.Thread(target=self._ask_ready))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def count(self) -> int:
        with self._lock:
            return len(self.accepted)

    def _post(self, sidecar: Sidecar, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=sidecar.url, timeout=30) as client:
            while not self._stop.is_set():
                # Customers enough that a customer's usage rarely meets a grain already
                # sent: rolling forward hour by hour must not reach the current hour, which
                # is not sent while the test waits.
                records = [
                    _record(
                        f"{500000000000 + rng.randrange(3000)}",
                        rng.randint(1, 9),
                        # 22 hours at most: AWS's window (24 h from the event)
                        # minus the queue's margin must stay open whatever the minute.
                        rng.randint(12, 22),
                        rng.randint(0, 59),
                    )
                    for _ in range(5)
                ]
                try:
                    response = client.post("/v1/usage-records", json={"UsageRecords": records})
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures.append(repr(exc))
                    continue
                with self._lock:
                    self.statuses.append(response.status_code)
                    if response.status_code == 202:
                        for receipt in response.json()["Accepted"]:
                            self.accepted[receipt["Id"]] = records[receipt["Index"]]
                            self.spooled += receipt["Status"] == "spooled"
                    else:
                        self.failures.append(response.text)
                time.sleep(0.05)

    def _ask_ready(self) -> None:
        clients = [httpx.Client(base_url=s.url, timeout=10) for s in self.sidecars]
        try:
            while not self._stop.wait(0.5):
                for client in clients:
                    try:
                        response = client.get("/readyz")
                    except httpx.HTTPError as exc:
                        self.readiness.append((0, repr(exc)))
                        continue
                    self.readiness.append((response.status_code, response.json()["status"]))
        finally:
            for client in clients:
                client.close()


def _fake() -> tuple[FakeMetering, list[IssuedKey]]:
    registry = KeyRegistry()
    keys = [registry.issue(f"arn:aws:iam::123456789012:user/replica-{i}", None) for i in range(3)]
    return FakeMetering(registry, region="us-east-1"), keys


def test_three_replicas_through_a_stopped_and_a_restarted_database_bill_every_202_once(
    private_postgres: PgServer,
) -> None:
    dsn = private_postgres.create_database("queue")
    metering, keys = _fake()
    with serve(metering) as fake, ExitStack() as stack:
        replicas = [
            stack.enter_context(run_sidecar(_env(fake.url, dsn, key), wait_ready=True))
            for key in keys
        ]
        traffic = Traffic(replicas)
        traffic.start()
        try:
            wait_until(lambda: traffic.count() >= 150, 60, "usage flowing")
            # The database stops answering for 30 s: every process SIGSTOPped.
            with frozen(private_postgres):
                time.sleep(30)
                during = traffic.count()
            wait_until(lambda: traffic.count() >= during + 150, 60, "usage after the stop")
            # And then it is restarted under the traffic.
            private_postgres.stop("fast")
            time.sleep(3)
            private_postgres.start()
            after = traffic.count()
            wait_until(lambda: traffic.count() >= after + 150, 60, "usage after the restart")
        finally:
            traffic.stop()
        _wait_settled(replicas, 180)
        for replica in replicas:
            assert _metric(replica, "metering_spool_settled_records_total", outcome="rejected") == 0
            assert 'outcome="duplicate_record"' not in replica.client.get("/metrics").text
    # None answered 5xx (or anything but 202) for usage, and none stopped being ready.
    assert traffic.failures == []
    assert set(traffic.statuses) == {202}
    assert traffic.spooled > 0, "the outages must have sent usage to the spools"
    assert {status for status, _ in traffic.readiness} == {200}
    assert "degraded" in {state for _, state in traffic.readiness}
    _assert_billed_once(metering, dsn, traffic.accepted)


@pytest.mark.parametrize("down", ["stopped", "frozen"])
def test_a_sidecar_started_without_its_database_is_ready_spools_and_moves(
    private_postgres: PgServer, down: str
) -> None:
    dsn = private_postgres.create_database("queue")
    metering, keys = _fake()
    pids: list[int] = []
    if down == "stopped":
        private_postgres.stop("fast")
    else:
        pids = freeze(private_postgres)
    # A store deadline far longer than one connection attempt (2 s here): the start
    # waits for one attempt, not for the deadline (it waited both, 32 s, before).
    env = {"METERING_QUEUE_STORE_DEADLINE": "30"}
    try:
        with serve(metering) as fake, ExitStack() as stack:
            started = time.monotonic()
            sidecar = stack.enter_context(
                run_sidecar(
                    _env(fake.url, dsn, keys[0], **env), wait_ready=True, startup_timeout=60
                )
            )
            assert time.monotonic() - started < 20, "the start waited for the store deadline"
            ready = sidecar.client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["queue"]["ok"] is False
            accepted: dict[str, dict[str, Any]] = {}
            for n in range(4):
                records = [_record(f"60000000000{n}", n + i + 1, 20, 10 * i) for i in range(3)]
                response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
                assert response.status_code == 202, response.text
                for receipt in response.json()["Accepted"]:
                    assert receipt["Status"] == "spooled"
                    accepted[receipt["Id"]] = records[receipt["Index"]]
            first = next(iter(accepted))
            view = sidecar.client.get(f"/v1/usage-records/{first}").json()
            assert view["Status"] == "spooled"
            assert _metric(sidecar, "metering_spool_waiting_records") == 12
            assert _metric(sidecar, "metering_queue_store_problem") == 1
            # The database is back: migrations run, the spool moves, grains go out.
            if down == "stopped":
                private_postgres.start()
            else:
                thaw(pids)
            _wait_settled([sidecar], 90)
            assert sidecar.client.get(f"/v1/usage-records/{first}").json()["Status"] == ("accepted")
            ready = sidecar.client.get("/readyz").json()
            assert ready["status"] == "ready", ready
    finally:
        thaw(pids)
    _assert_billed_once(metering, dsn, accepted)


def test_sigterm_moves_what_it_can_and_names_what_stays(
    private_postgres: PgServer, tmp_path: Path
) -> None:
    dsn = private_postgres.create_database("queue")
    metering, keys = _fake()
    queue_path = tmp_path / "queue.sqlite3"
    extra = {"METERING_QUEUE_PATH": str(queue_path), "METERING_SHUTDOWN_TIMEOUT": "8"}
    accepted: dict[str, dict[str, Any]] = {}

    def post(sidecar: Sidecar, n: int) -> None:
        records = [_record(f"70000000000{n}", i + 1, 20, i) for i in range(2)]
        response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
        assert response.status_code == 202, response.text
        for receipt in response.json()["Accepted"]:
            assert receipt["Status"] == "spooled"
            accepted[receipt["Id"]] = records[receipt["Index"]]

    with serve(metering) as fake:
        env = _env(fake.url, dsn, keys[0], **extra)
        # The database stops answering, and comes back while the sidecar stops: what
        # was spooled moves within the shutdown deadline.
        with run_sidecar(env, wait_ready=True) as sidecar:
            pids = freeze(private_postgres)
            try:
                post(sidecar, 1)
                sidecar.process.send_signal(signal.SIGTERM)
                time.sleep(1.5)
            finally:
                thaw(pids)
            assert sidecar.process.wait(30) in (0, -signal.SIGTERM)
            lines = _log_lines(sidecar)
        assert not [line for line in lines if "stays in the local spool" in line["msg"]]
        assert set(accepted) <= set(_stored(dsn))
        # The database is down through the whole stop: what stays is named, with counts.
        with run_sidecar(env, wait_ready=True) as sidecar:
            private_postgres.stop("fast")
            post(sidecar, 2)
            post(sidecar, 3)
            started = time.monotonic()
            sidecar.process.send_signal(signal.SIGTERM)
            assert sidecar.process.wait(30) in (0, -signal.SIGTERM)
            elapsed = time.monotonic() - started
            lines = _log_lines(sidecar)
        # Within the shutdown deadline (8 s), with some slack for a busy machine.
        assert elapsed < 14, elapsed
        (left,) = [line for line in lines if "stays in the local spool" in line["msg"]]
        assert left["level"] == "error"
        assert left["records"] == 4
        assert left["path"] == str(queue_path)
        # A sidecar on the same volume moves it once the database answers.
        private_postgres.start()
        with run_sidecar(env, wait_ready=True) as sidecar:
            _wait_settled([sidecar], 90)
    _assert_billed_once(metering, dsn, accepted)


def test_a_commit_whose_answer_is_lost_is_answered_202_once_and_billed_once(
    postgres_server: PgServer,
) -> None:
    name = new_database_name()
    dsn = postgres_server.create_database(name)
    proxy, through = TcpProxy.for_dsn(dsn)
    metering, keys = _fake()
    try:
        with (
            serve(metering) as fake,
            run_sidecar(_env(fake.url, through, keys[0]), wait_ready=True) as sidecar,
        ):
            # The connection is cut once the server has answered the intake's COMMIT.
            proxy.lose_next_commit_answer()
            records = [_record("800000000001", q, 20, q) for q in (2, 3, 4)]
            response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
            assert proxy.answers_lost == 1
            assert response.status_code == 202, response.text
            receipts = response.json()["Accepted"]
            assert [r["Status"] for r in receipts] == ["spooled"] * 3
            accepted = {r["Id"]: records[r["Index"]] for r in receipts}
            _wait_settled([sidecar], 60)
            # The store had them: settled by id, not added again.
            assert (
                _metric(sidecar, "metering_spool_settled_records_total", outcome="already_stored")
                == 3
            )
            assert _metric(sidecar, "metering_spool_settled_records_total", outcome="moved") == 0
        _assert_billed_once(metering, dsn, accepted)
    finally:
        proxy.close()
        postgres_server.drop_database(name)


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root: the project's CI machines are)."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"this test mounts a tmpfs and needs root: {result.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_no_store_and_no_spool_is_the_one_way_to_be_unready(
    private_postgres: PgServer, tiny_volume: Path
) -> None:
    dsn = private_postgres.create_database("queue")
    metering, keys = _fake()
    extra = {"METERING_QUEUE_PATH": str(tiny_volume / "queue.sqlite3")}
    accepted: dict[str, dict[str, Any]] = {}
    with (
        serve(metering) as fake,
        run_sidecar(_env(fake.url, dsn, keys[0], **extra), wait_ready=True) as sidecar,
    ):
        # Most of the volume taken by something else: the spool has some room left.
        filler = tiny_volume / "filler"
        filler.write_bytes(b"\0" * max(0, shutil.disk_usage(tiny_volume).free - 600 * 1024))
        private_postgres.stop("fast")
        # The spool takes usage until its volume is full: then 503, and not ready.
        status, response = 202, None
        for n in range(100):
            records = [_record(f"9{n:05d}{i:06d}", 1, 20, i % 60) for i in range(500)]
            response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
            status = response.status_code
            if status != 202:
                break
            for receipt in response.json()["Accepted"]:
                accepted[receipt["Id"]] = records[receipt["Index"]]
        assert response is not None
        assert status == 503, "the tiny volume never filled up"
        assert response.json()["code"] == "QueueUnavailable"
        assert "local spool" in response.json()["detail"]
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not ready"
        assert ready.json()["checks"]["queue"]["ok"] is False
        assert "blocking" not in ready.json()["checks"]["queue"]
        # The store back, a full spool only degrades: usage goes to the store.
        private_postgres.start()
        wait_until(lambda: sidecar.client.get("/readyz").status_code == 200, 30, "ready")
        ready = sidecar.client.get("/readyz").json()
        assert ready["status"] == "degraded"
        assert ready["checks"]["spool"]["ok"] is False
        response = sidecar.client.post(
            "/v1/usage-records", json={"UsageRecords": [_record("999999999999", 1, 20, 0)]}
        )
        assert response.status_code == 202, response.text
        (receipt,) = response.json()["Accepted"]
        assert receipt["Status"] == "pending"
        accepted[receipt["Id"]] = _record("999999999999", 1, 20, 0)
        # Room again: everything spooled moves and is billed once.
        filler.unlink()
        _wait_settled([sidecar], 120)
    assert accepted
    _assert_billed_once(metering, dsn, accepted)
