"""Upgrades and rollbacks with real sidecar processes (docs/upgrading.md): replicas of
the previous version (a commit from git history, checked out into a git worktree and run
as ``python -m app`` from it with this venv) and of this version side by side.

- A rolling update on one shared PostgreSQL store, on the fake AWS: both versions take
  usage for the same grains while the new one migrates the schema, then a rollback;
  every grain billed once with the exact sum. The previous version is ``PREVIOUS``:
  the newest commit before the latest PostgreSQL migration (migration 5, customers
  counted by a trigger; 17bfd19 is at PostgreSQL schema 4).
- A rollback on a SQLite file this version migrated (one pod, Recreate), from
  ``PREVIOUS_SQLITE``: the newest commit before the latest SQLite migration (migration
  6, the same counts; 17bfd19 is at SQLite schema 5).

Both run on this venv: their dependencies are this version's (pyproject.toml and the
locked requirements are unchanged since). When a release adds a migration, move the
matching commit to the one before it.
"""

from __future__ import annotations

import contextlib
import random
import runpy
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from app.queue.migrations import MIGRATIONS, POSTGRES_MIGRATIONS
from tests.conftest import PRODUCT
from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, serve
from tests.queue.test_queue_api import LICENSE, wait_until
from tests.sidecar import REPO, Sidecar, free_port, isolated_env

PREVIOUS = "17bfd196e15666f0ad9af838a549b01f8e0feb28"  # 17bfd19
PREVIOUS_SQLITE = "17bfd196e15666f0ad9af838a549b01f8e0feb28"  # 17bfd19
MIGRATIONS_FILE = Path("app/queue/migrations.py")

# The hour's grace at its maximum: the test's usage (this hour's) falls due an hour
# after the hour closes at the earliest, so nothing is sent until the test says so.
SHARED = {
    "METERING_QUEUE_GRACE": "3600",
    "METERING_QUEUE_POLL_INTERVAL": "0.3",
    "METERING_QUEUE_RETRY_BASE_DELAY": "0.3",
    "METERING_QUEUE_RETRY_MAX_DELAY": "1",
    "METERING_QUEUE_CLAIM_LEASE": "3",
    "METERING_READ_TIMEOUT": "20",
    "METERING_ACCESS_LOG": "false",
}
CUSTOMERS = [f"{400000000000 + n}" for n in range(12)]


@pytest.fixture(scope="module")
def checkout() -> Iterator[Callable[[str], Path]]:
    """Check out a commit into a git worktree of its own (once per commit); all are
    removed after."""
    trees: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="previous-") as tmp:

        def tree(commit: str) -> Path:
            if commit not in trees:
                path = Path(tmp) / commit
                added = subprocess.run(
                    ["git", "worktree", "add", "--detach", "--quiet", str(path), commit],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                if added.returncode != 0:
                    pytest.fail(
                        f"cannot check out the previous version {commit} (a shallow "
                        f"clone?): {added.stderr.strip()}",
                        pytrace=False,
                    )
                trees[commit] = path
            return trees[commit]

        try:
            yield tree
        finally:
            for path in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(path)],
                    cwd=REPO,
                    capture_output=True,
                    timeout=60,
                    check=False,
                )


@contextlib.contextmanager
def replica(tree: Path, env: Mapping[str, str]) -> Iterator[Sidecar]:
    """``python -m app`` from ``tree`` (this venv's Python), ready with every check passing
    (the shared store open and migrated, not a spool); stopped after."""
    with tempfile.TemporaryDirectory(prefix="replica-") as tmp:
        home = Path(tmp)
        port = free_port()
        full_env = isolated_env(
            {
                "METERING_PORT": str(port),
                "METERING_OPS_PORT": str(free_port()),
                "METERING_OPS_HOST": "127.0.0.1",
                "METERING_QUEUE_PATH": str(home / "queue.sqlite3"),
                **env,
            },
            home,
        )
        log_path = home / "sidecar.log"
        with log_path.open("wb") as log_file:
            # cwd first on sys.path: the tree's own ``app`` package, not this checkout's.
            process = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=tree,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        sidecar = Sidecar(process, f"http://127.0.0.1:{port}", log_path, None)
        try:
            deadline = time.monotonic() + 30
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"replica from {tree} exited {process.returncode}:\n{sidecar.log()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    ready = sidecar.client.get("/readyz", timeout=1)
                    if ready.status_code == 200 and ready.json()["status"] == "ready":
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"replica from {tree} not ready within 30 s:\n{sidecar.log()}")
                time.sleep(0.05)
            yield sidecar
        finally:
            sidecar.stop()


def _env(url: str, dsn: str, key: IssuedKey) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_DSN": dsn,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
        **SHARED,
    }


def _schema_version(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    assert row is not None
    return int(row[0])


def _newest(migrations: list[tuple[int, list[str]]]) -> int:
    return max(version for version, _ in migrations)


class Ledger:
    """What each replica answered 202 for: the records, with the id and grain they got."""

    def __init__(self, when: datetime) -> None:
        self.when = when.isoformat().replace("+00:00", "Z")
        self.accepted: list[dict[str, Any]] = []
        self.grain_versions: dict[int, set[str]] = defaultdict(set)
        self._lock = threading.Lock()
        self._rng = random.Random(20)

    def record(self, customers: list[str] = CUSTOMERS, **fields: Any) -> dict[str, Any]:
        """A record of this test's hour for one of ``customers``."""
        with self._lock:
            customer = self._rng.choice(customers)
            quantity = self._rng.randint(1, 9)
        return {
            "CustomerAWSAccountId": customer,
            "LicenseArn": LICENSE,
            "Dimension": "gb",
            "Quantity": quantity,
            "Timestamp": self.when,
            **fields,
        }

    def post(self, sidecar: Sidecar, version: str, records: list[dict[str, Any]]) -> Any:
        """POST ``records``; the call must be answered 202 with every record accepted."""
        with httpx.Client(base_url=sidecar.url, timeout=30) as client:
            response = client.post("/v1/usage-records", json={"UsageRecords": records})
        assert response.status_code == 202, f"{version}: {response.status_code} {response.text}"
        body = response.json()
        assert body["Rejected"] == [], body
        with self._lock:
            for receipt in body["Accepted"]:
                assert not receipt["RolledForward"], receipt
                self.grain_versions[receipt["GrainId"]].add(version)
                if not receipt["Replayed"]:
                    self.accepted.append({**records[receipt["Index"]], "Id": receipt["Id"]})
        return body

    def post_calls(
        self, sidecar: Sidecar, version: str, calls: int, customers: list[str] = CUSTOMERS
    ) -> None:
        """``calls`` calls of 10 records each."""
        for _ in range(calls):
            self.post(sidecar, version, [self.record(customers) for _ in range(10)])

    def in_parallel(self, *work: tuple[Sidecar, str, int, list[str]]) -> None:
        """``post_calls`` on several replicas at once."""
        threads = [threading.Thread(target=self.post_calls, args=args) for args in work]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)


def _make_due(dsn: str, customers: list[str]) -> None:
    """The hour's grace passes for ``customers``' grains: they fall due now."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE grains SET due_at = EXTRACT(EPOCH FROM now()) - 1 "
            "WHERE status = 'open' AND customer_aws_account_id = ANY(%s)",
            (customers,),
        )


def _settled(sidecar: Sidecar, records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Wait until ``records`` are settled, as ``sidecar`` reads them; their views."""
    views: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        for record in records:
            if record["Id"] not in views:
                response = sidecar.client.get(f"/v1/usage-records/{record['Id']}")
                assert response.status_code == 200, response.text
                if response.json()["Status"] == "pending":
                    return False
                views[record["Id"]] = response.json()
        return True

    wait_until(done, 30, "the due records settled")
    return views


def _senders(metering: FakeMetering, seen: int) -> set[str | None]:
    """The access keys of the BatchMeterUsage calls after the first ``seen``."""
    return {r.access_key_id for r in metering.requests_for("BatchMeterUsage")[seen:]}


def test_a_rolling_update_on_a_shared_store_bills_each_grain_once_across_versions(
    checkout: Callable[[str], Path], postgres_dsn: str
) -> None:
    registry = KeyRegistry()
    keys = {
        name: registry.issue(f"arn:aws:iam::123456789012:user/{name}", None)
        for name in ("old", "new", "rolled-back")
    }
    metering = FakeMetering(registry, region="us-east-1")
    ledger = Ledger(datetime.now(UTC).replace(microsecond=0))
    newest = _newest(POSTGRES_MIGRATIONS)
    first_half, second_half = CUSTOMERS[:6], CUSTOMERS[6:]

    tree = checkout(PREVIOUS)
    with serve(metering) as fake, contextlib.ExitStack() as stack:
        previous_newest = _newest(
            runpy.run_path(str(tree / MIGRATIONS_FILE))["POSTGRES_MIGRATIONS"]
        )
        assert previous_newest < newest, f"{PREVIOUS} has this version's schema: move PREVIOUS"

        # The Deployment as it ran before: a replica of the previous version.
        old = stack.enter_context(replica(tree, _env(fake.url, postgres_dsn, keys["old"])))
        assert _schema_version(postgres_dsn) == previous_newest
        ledger.post_calls(old, "old", 5)
        key_on_old = ledger.record(IdempotencyKey=f"old-{uuid.uuid4()}")
        (on_old,) = ledger.post(old, "old", [key_on_old])["Accepted"]

        # The rollout starts a replica of this version: it migrates the shared schema
        # while the old replica runs, and both take usage for the same grains at once;
        # the old one goes on answering 202 on the migrated schema.
        new = stack.enter_context(replica(REPO, _env(fake.url, postgres_dsn, keys["new"])))
        assert _schema_version(postgres_dsn) == newest
        ledger.in_parallel((old, "old", 8, CUSTOMERS), (new, "new", 8, CUSTOMERS))
        # An IdempotencyKey is the fleet's across versions.
        (replayed,) = ledger.post(new, "new", [key_on_old])["Accepted"]
        assert (replayed["Id"], replayed["Replayed"]) == (on_old["Id"], True)
        # Every customer's grain took usage from replicas of both versions.
        assert len(ledger.grain_versions) == len(CUSTOMERS)
        assert all(v == {"old", "new"} for v in ledger.grain_versions.values())

        # The rollout ends the old replica (SaaS mode sends nothing on SIGTERM; uvicorn
        # exits by the signal once it has shut down). Half the grains fall due: this
        # version sends what both versions summed.
        assert old.stop() in (0, -signal.SIGTERM), old.log()
        sent = len(metering.requests_for("BatchMeterUsage"))
        _make_due(postgres_dsn, first_half)
        views = _settled(
            new, [r for r in ledger.accepted if r["CustomerAWSAccountId"] in first_half]
        )
        assert _senders(metering, sent) == {keys["new"].access_key_id}

        # A rollback: a replica of the previous version starts on the migrated schema,
        # takes usage beside this version's, and, once this version's replica is gone,
        # sends the other half.
        back = stack.enter_context(replica(tree, _env(fake.url, postgres_dsn, keys["rolled-back"])))
        assert _schema_version(postgres_dsn) == newest
        ledger.in_parallel((back, "old", 4, second_half), (new, "new", 4, second_half))
        key_on_new = ledger.record(second_half, IdempotencyKey=f"new-{uuid.uuid4()}")
        (on_new,) = ledger.post(new, "new", [key_on_new])["Accepted"]
        (replayed,) = ledger.post(back, "old", [key_on_new])["Accepted"]
        assert (replayed["Id"], replayed["Replayed"]) == (on_new["Id"], True)
        assert new.stop() in (0, -signal.SIGTERM), new.log()
        sent = len(metering.requests_for("BatchMeterUsage"))
        _make_due(postgres_dsn, second_half)
        views |= _settled(back, [r for r in ledger.accepted if r["Id"] not in views])
        assert _senders(metering, sent) == {keys["rolled-back"].access_key_id}

    assert len(ledger.accepted) == (5 * 10 + 1) + 2 * 8 * 10 + 2 * 4 * 10 + 1
    # accepted, not rejected as a DuplicateRecord; AWS saw one record per grain, each
    # the exact sum of what replicas of both versions answered 202 for.
    assert {view["Status"] for view in views.values()} == {"accepted"}
    expected: dict[tuple[str, datetime], Decimal] = defaultdict(Decimal)
    for record in ledger.accepted:
        hour = datetime.fromisoformat(views[record["Id"]]["Grain"]["Hour"])
        expected[(record["CustomerAWSAccountId"], hour)] += record["Quantity"]
    billed = {(r.customer, r.hour): r.quantity for r in metering.batch_records.values()}
    assert billed == dict(expected)
    assert len(billed) == len(CUSTOMERS)


def test_a_sqlite_file_this_version_migrated_is_used_by_the_previous_one_after_a_rollback(
    checkout: Callable[[str], Path], tmp_path: Path
) -> None:
    previous_tree = checkout(PREVIOUS_SQLITE)
    # One pod on a persistent volume (Recreate): never two versions on the file at once.
    queue = tmp_path / "volume" / "queue.sqlite3"
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_PATH": str(queue),
        "METERING_ACCESS_LOG": "false",
        **{k: v for k, v in SHARED.items() if k.startswith("METERING_QUEUE_")},
    }
    ledger = Ledger(datetime.now(UTC).replace(microsecond=0))
    previous_newest = _newest(runpy.run_path(str(previous_tree / MIGRATIONS_FILE))["MIGRATIONS"])
    assert previous_newest < _newest(MIGRATIONS), f"{PREVIOUS_SQLITE} has this SQLite schema"

    with replica(REPO, env) as new:
        ledger.post(new, "new", [ledger.record([customer]) for customer in CUSTOMERS])
        ledger.post_calls(new, "new", 2)
    with contextlib.closing(sqlite3.connect(queue)) as conn:
        (version,) = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    assert version == _newest(MIGRATIONS)

    # Rolled back: the previous version opens the migrated file, runs no migration,
    # reads what this version took and adds to the same grains.
    with replica(previous_tree, env) as old:
        for record in ledger.accepted:
            view = old.client.get(f"/v1/usage-records/{record['Id']}")
            assert view.status_code == 200, view.text
            assert view.json()["Status"] == "pending"
        ledger.post(old, "old", [ledger.record([customer]) for customer in CUSTOMERS])
        ledger.post_calls(old, "old", 2)
        assert "queue schema migrated" not in old.log()
    with contextlib.closing(sqlite3.connect(queue)) as conn:
        (version,) = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    assert version == _newest(MIGRATIONS)

    # And forward again: every grain holds the usage of both.
    with replica(REPO, env) as new:
        grains = new.client.get("/v1/usage-grains", params={"limit": 100}).json()["Items"]
    expected: dict[str, int] = defaultdict(int)
    for record in ledger.accepted:
        expected[record["CustomerAWSAccountId"]] += record["Quantity"]
    assert {g["CustomerAWSAccountId"]: Decimal(g["Quantity"]) for g in grains} == expected
    assert all(v == {"old", "new"} for v in ledger.grain_versions.values())
