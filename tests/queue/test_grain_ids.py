"""A grain id names one grain for good: never handed out again once its grain is pruned,
so that an IdempotencyKey replayed later reports its own grain and outcome."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

from app.metering.grains import GrainContent, content_to_json
from app.queue.migrations import MIGRATIONS
from app.queue.records import Filters
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy
from tests.queue.conftest import QueueFake, StoreFactory, batch_record, queue_harness


async def test_a_replay_after_a_prune_reports_its_own_grain(
    stores: StoreFactory, queue_fake: QueueFake
) -> None:
    async with queue_harness(stores, queue_fake, retention=timedelta(hours=168)) as h:
        h.clock.set(10, 30)
        record = batch_record("111122223333", IdempotencyKey="job-7", Quantity=5)
        (first,) = (await h.submit(record)).Accepted
        h.clock.set(11, 10)
        await h.cycle()
        assert len(h.sent()) == 1
        h.clock.advance(days=8)
        await h.cycle()  # prunes the settled grain: the table is empty now
        assert (await h.queue.grains(Filters(), None, 10)).Items == []
        # Another customer's usage opens a new grain.
        (other,) = (await h.submit(batch_record("444455556666", Quantity=9))).Accepted
        assert other.GrainId != first.GrainId
        # The replay names the first grain, and its outcome, not the newcomer's.
        (replay,) = (await h.submit(record)).Accepted
        assert replay.Replayed is True
        assert replay.GrainId == first.GrainId
        assert replay.Status == "accepted"


def _v3_database(path: Path) -> None:
    """A queue file as version 3 left it: grains 1 to 3, the newest pruned already (its id
    known only to the IdempotencyKey that outlived it)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for version, script in MIGRATIONS[:3]:
        for statement in script:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (version,))
    for gid in (1, 2, 3):
        conn.execute(
            "INSERT INTO grains (id, kind, product_code, license_arn, customer_identifier, "
            "customer_aws_account_id, dimension, hour, status, content, due_at, deadline, "
            "created_at, finished_at, metering_record_id) VALUES "
            "(?, 'batch', 'prod-1', '', '', ?, 'gb', 0, 'accepted', ?, 0, 0, 0, 0, ?)",
            (gid, f"10000000000{gid}", content_to_json(GrainContent()), f"mr-{gid}"),
        )
        conn.execute(
            "INSERT INTO usage_records VALUES (?, ?, 'h', ?, 0, 0, '{}', ?, 0)",
            (f"ur_{gid}", f"key-{gid}", gid, f"10000000000{gid}"),
        )
        conn.execute(
            "INSERT INTO idempotency_keys VALUES (?, 'h', ?, ?, 0, 0, NULL, 0)",
            (f"key-{gid}", f"ur_{gid}", gid),
        )
    # Pruned: the grain and its record go, its key stays.
    conn.execute("UPDATE idempotency_keys SET outcome = 'accepted' WHERE grain_id = 3")
    conn.execute("DELETE FROM usage_records WHERE grain_id = 3")
    conn.execute("DELETE FROM grains WHERE id = 3")
    conn.close()


async def test_the_migration_keeps_every_row_and_hands_out_no_id_seen_before(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.sqlite3"
    _v3_database(path)
    store = SqliteStore(path, GrainPolicy(grace=timedelta(minutes=5)))
    await store.open()
    try:
        # Every grain and record kept, each record still with its grain.
        for gid in (1, 2):
            record = await store.get_record(f"ur_{gid}")
            assert record is not None
            assert record.grain.id == gid
            assert record.grain.metering_record_id == f"mr-{gid}"
        with sqlite3.connect(path) as conn:
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'grains'").fetchone()
            indexes = {
                name
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'grains' "
                    "AND sql IS NOT NULL"
                )
            }
            # The rebuilt table cascades deletes to its records, as before.
            references = conn.execute("PRAGMA foreign_key_list(usage_records)").fetchall()
        assert "AUTOINCREMENT" in sql[0]
        assert indexes == {
            "grains_status_due",
            "grains_status_next",
            "grains_status_deadline",
            "grains_finished",
            "grains_open_customer",
            # Migration 5's (listing and pruning without reading the history).
            "grains_status_finished",
            "grains_identifier",
            "grains_account",
            "grains_status_id",
            "grains_hour",
        }
        assert [(r[2], r[6]) for r in references] == [("grains", "CASCADE")]
        # A new grain gets an id past every one handed out, the pruned 3 included.
        from tests.queue.test_store import _intake

        (receipt,) = await store.ingest([_intake(1)], all_or_nothing=True)
        assert receipt.grain_id == 4  # type: ignore[union-attr]
    finally:
        await store.close()
