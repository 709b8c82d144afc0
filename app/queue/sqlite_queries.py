"""Read-side queries of the SQLite store, as plain functions of a connection."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

from app.queue.aggregation import GrainKey, content_from_json
from app.queue.store import Filters, GrainRow, QueueStats, RecordRow

GRAIN_COLUMNS = (
    "g.id, g.kind, g.product_code, g.license_arn, g.customer_identifier, "
    "g.customer_aws_account_id, g.dimension, g.hour, g.status, g.content, g.payload, "
    "g.attempts, g.due_at, g.deadline, g.next_attempt_at, g.metering_record_id, g.reason, "
    "g.last_error, (SELECT COUNT(*) FROM usage_records r WHERE r.grain_id = g.id)"
)
_RECORD_COLUMNS = (
    "r.id, r.idempotency_key, r.record, r.received_at, r.rolled_forward, r.original_hour"
)


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def optional_time(value: float | None) -> datetime | None:
    """Epoch seconds from the database as an aware datetime, or None."""
    return None if value is None else _dt(value)


def grain_from_row(row: tuple[Any, ...]) -> GrainRow:
    """A row selected with ``GRAIN_COLUMNS`` as a ``GrainRow``."""
    key = GrainKey(row[1], row[2], row[3], row[4], row[5], row[6], _dt(row[7]))
    return GrainRow(
        id=row[0],
        key=key,
        status=row[8],
        content=content_from_json(row[9]),
        payload=row[10],
        attempts=row[11],
        due_at=_dt(row[12]),
        deadline=_dt(row[13]),
        next_attempt_at=optional_time(row[14]),
        metering_record_id=row[15],
        reason=row[16],
        last_error=row[17],
        records=row[18],
    )


def _status_clause(status: str | None, column: str) -> tuple[str, tuple[object, ...]]:
    if status is None:
        return "", ()
    if status == "pending":
        return f" AND {column} IN ('open', 'frozen')", ()
    return f" AND {column} = ?", (status,)


def record_rows(
    conn: sqlite3.Connection, where: str, params: tuple[object, ...], limit: int
) -> list[RecordRow]:
    """Records (with their grains) matching ``where`` (fixed SQL; values in ``params``)."""
    rows = conn.execute(
        f"SELECT {_RECORD_COLUMNS}, {GRAIN_COLUMNS} FROM usage_records r "
        f"JOIN grains g ON g.id = r.grain_id WHERE 1=1 {where} ORDER BY r.id LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [
        RecordRow(
            id=row[0],
            idempotency_key=row[1],
            record=json.loads(row[2]),
            received_at=_dt(row[3]),
            rolled_forward=bool(row[4]),
            original_hour=_dt(row[5]),
            grain=grain_from_row(row[6:]),
        )
        for row in rows
    ]


def list_records(
    conn: sqlite3.Connection, filters: Filters, after: str | None, limit: int
) -> list[RecordRow]:
    """Records by filters, after a cursor."""
    where, params = _status_clause(filters.status, "g.status")
    if filters.customer is not None:
        where += " AND r.customer = ?"
        params += (filters.customer,)
    if filters.hour is not None:
        where += " AND r.original_hour = ?"
        params += (int(filters.hour.timestamp()),)
    if after is not None:
        where += " AND r.id > ?"
        params += (after,)
    return record_rows(conn, where, params, limit)


def list_grains(
    conn: sqlite3.Connection, filters: Filters, after: int | None, limit: int
) -> list[GrainRow]:
    """Grains by filters, after a cursor."""
    where, params = _status_clause(filters.status, "g.status")
    if filters.customer is not None:
        where += " AND (g.customer_identifier = ? OR g.customer_aws_account_id = ?)"
        params += (filters.customer, filters.customer)
    if filters.hour is not None:
        where += " AND g.hour = ?"
        params += (int(filters.hour.timestamp()),)
    if filters.kind is not None:
        where += " AND g.kind = ?"
        params += (filters.kind,)
    if after is not None:
        where += " AND g.id > ?"
        params += (after,)
    rows = conn.execute(
        f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE 1=1 {where} ORDER BY g.id LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [grain_from_row(row) for row in rows]


def stats(conn: sqlite3.Connection, now: datetime) -> QueueStats:
    """Counts and ages for the metrics."""
    pending, oldest = conn.execute(
        "SELECT COUNT(*), MIN(r.received_at) FROM usage_records r JOIN grains g "
        "ON g.id = r.grain_id WHERE g.status IN ('open', 'frozen')"
    ).fetchone()
    open_grains, due_open, nearest = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(due_at <= ?), 0), MIN(deadline) FROM grains "
        "WHERE status = 'open'",
        (now.timestamp(),),
    ).fetchone()
    frozen, nearest_frozen = conn.execute(
        "SELECT COUNT(*), MIN(deadline) FROM grains WHERE status = 'frozen'"
    ).fetchone()
    deadlines = [d for d in (nearest, nearest_frozen) if d is not None]
    return QueueStats(
        pending_records=pending,
        open_grains=open_grains,
        grains_due=due_open + frozen,
        oldest_pending=_dt(oldest) if oldest is not None else None,
        nearest_deadline=_dt(min(deadlines)) if deadlines else None,
    )


def next_wakeup(conn: sqlite3.Connection) -> datetime | None:
    """The earliest due time of an open grain or next attempt of a frozen one."""
    (due,) = conn.execute("SELECT MIN(due_at) FROM grains WHERE status = 'open'").fetchone()
    (attempt,) = conn.execute(
        "SELECT MIN(next_attempt_at) FROM grains WHERE status = 'frozen'"
    ).fetchone()
    moments = [m for m in (due, attempt) if m is not None]
    return _dt(min(moments)) if moments else None


def prune(conn: sqlite3.Connection, before: datetime, keys_before: datetime) -> int:
    """Forget grains (and their records) that finished before ``before``; their
    IdempotencyKeys keep the outcome until they are received before ``keys_before``."""
    settled = (
        "SELECT id FROM grains WHERE status IN ('accepted', 'rejected', 'expired') "
        "AND finished_at < ?"
    )
    conn.execute(
        "UPDATE idempotency_keys SET outcome = (SELECT g.status FROM grains g "
        f"WHERE g.id = idempotency_keys.grain_id) WHERE grain_id IN ({settled})",
        (before.timestamp(),),
    )
    cursor = conn.execute(f"DELETE FROM grains WHERE id IN ({settled})", (before.timestamp(),))
    conn.execute("DELETE FROM idempotency_keys WHERE received_at < ?", (keys_before.timestamp(),))
    return cursor.rowcount
