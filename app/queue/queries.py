"""The queue's read-side SQL, for every store: statements built once, rows read back.

Statements use ``?`` placeholders (SQLite's); a store with another style
converts them (``to_format_style`` for PostgreSQL's ``%s``). The SQL keeps to
what both engines understand.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from app.metering.grains import GrainKey, content_from_json
from app.queue.records import Filters
from app.queue.store import GrainPolicy, GrainRow, Intake, Outcome, QueueStats, RecordRow

GRAIN_COLUMNS = (
    "g.id, g.kind, g.product_code, g.license_arn, g.customer_identifier, "
    "g.customer_aws_account_id, g.dimension, g.hour, g.status, g.content, g.payload, "
    "g.attempts, g.due_at, g.deadline, g.next_attempt_at, g.metering_record_id, g.reason, "
    "g.last_error, (SELECT COUNT(*) FROM usage_records r WHERE r.grain_id = g.id)"
)
_RECORD_COLUMNS = (
    "r.id, r.idempotency_key, r.record, r.received_at, r.rolled_forward, r.original_hour"
)
Query = tuple[str, tuple[Any, ...]]


def to_format_style(sql: str) -> str:
    """``?`` placeholders as ``%s`` (psycopg's). The statements here hold no literal ``?``."""
    return sql.replace("%", "%%").replace("?", "%s")


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def optional_time(value: float | None) -> datetime | None:
    """Epoch seconds from the database as an aware datetime, or None."""
    return None if value is None else _dt(value)


def grain_from_row(row: tuple[Any, ...] | list[Any]) -> GrainRow:
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


def record_from_row(row: tuple[Any, ...]) -> RecordRow:
    """A row selected by ``records_query`` as a ``RecordRow``."""
    return RecordRow(
        id=row[0],
        idempotency_key=row[1],
        record=json.loads(row[2]),
        received_at=_dt(row[3]),
        rolled_forward=bool(row[4]),
        original_hour=_dt(row[5]),
        grain=grain_from_row(row[6:]),
    )


def _status_clause(status: str | None, column: str) -> tuple[str, tuple[object, ...]]:
    if status is None:
        return "", ()
    if status == "pending":
        return f" AND {column} IN ('open', 'frozen')", ()
    return f" AND {column} = ?", (status,)


def records_query(
    where: str, params: tuple[object, ...], limit: int, *, records_first: bool = False
) -> Query:
    """Records (with their grains) matching ``where`` (fixed SQL; values in ``params``).

    ``records_first``: read the records in id order, each one's grain beside it, until the
    page is full (SQLite keeps a CROSS JOIN's order; PostgreSQL plans it as any join)."""
    join = "CROSS JOIN grains g WHERE" if records_first else "JOIN grains g ON"
    return (
        f"SELECT {_RECORD_COLUMNS}, {GRAIN_COLUMNS} FROM usage_records r "
        f"{join} g.id = r.grain_id{where} ORDER BY r.id LIMIT ?",
        (*params, limit),
    )


def record_query(record_id: str) -> Query:
    """One record and its grain."""
    return records_query(" AND r.id = ?", (record_id,), 1)


def list_records_query(filters: Filters, after: str | None, limit: int) -> Query:
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
    # Pending records are the few whose grains are open or frozen: found from those grains
    # (then sorted). Settled ones are the history: its grains of one status hold most of
    # it, so those records are read in id order, a page of them, not all of them sorted.
    settled = filters.status is not None and filters.status != "pending"
    return records_query(where, params, limit, records_first=settled)


def grain_query(grain_id: int) -> Query:
    """One grain."""
    return f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.id = ?", (grain_id,)


def list_grains_query(filters: Filters, after: int | None, limit: int) -> Query:
    """Grains by filters, after a cursor."""
    where, params = _status_clause(filters.status, "g.status")
    if filters.hour is not None:
        where += " AND g.hour = ?"
        params += (int(filters.hour.timestamp()),)
    if filters.kind is not None:
        where += " AND g.kind = ?"
        params += (filters.kind,)
    if after is not None:
        where += " AND g.id > ?"
        params += (after,)
    if filters.customer is None:
        return (
            f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE 1=1 {where} ORDER BY g.id LIMIT ?",
            (*params, limit),
        )
    # Either form of the customer. "identifier = ? OR account = ?" has no index that
    # yields its rows in id order: both engines read every grain (or every grain of the
    # customer, to sort them). Each form is instead a walk of its own index (the form,
    # then id) that stops at a page; the page is the first ids of the two.
    forms = " UNION ALL ".join(
        f"SELECT id FROM (SELECT g.id FROM grains g WHERE g.{column} = ?{where} "
        f"ORDER BY g.id LIMIT ?) {alias}"
        for column, alias in (("customer_identifier", "i"), ("customer_aws_account_id", "a"))
    )
    form_params = (filters.customer, *params, limit)
    return (
        f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.id IN ({forms}) ORDER BY g.id LIMIT ?",
        (*form_params, *form_params, limit),
    )


# Counts and ages for the metrics: three single-row statements.
PENDING_RECORDS = (
    "SELECT COUNT(*), MIN(r.received_at) FROM usage_records r JOIN grains g "
    "ON g.id = r.grain_id WHERE g.status IN ('open', 'frozen')"
)
OPEN_GRAINS = (
    "SELECT COUNT(*), COALESCE(SUM(CASE WHEN due_at <= ? THEN 1 ELSE 0 END), 0), "
    "MIN(deadline) FROM grains WHERE status = 'open'"
)
FROZEN_GRAINS = "SELECT COUNT(*), MIN(deadline) FROM grains WHERE status = 'frozen'"


def stats_from_rows(
    pending: tuple[Any, ...], open_grains: tuple[Any, ...], frozen: tuple[Any, ...]
) -> QueueStats:
    """The figures from the rows of ``PENDING_RECORDS``, ``OPEN_GRAINS`` (bound to now)
    and ``FROZEN_GRAINS``."""
    deadlines = [d for d in (open_grains[2], frozen[1]) if d is not None]
    return QueueStats(
        pending_records=int(pending[0]),
        open_grains=int(open_grains[0]),
        grains_due=int(open_grains[1]) + int(frozen[0]),
        oldest_pending=_dt(pending[1]) if pending[1] is not None else None,
        nearest_deadline=_dt(min(deadlines)) if deadlines else None,
    )


# The earliest due time of an open grain, next attempt of a frozen one, and end of
# a leaving customer's grace (its open grains are sent then).
NEXT_WAKEUP = (
    "SELECT (SELECT MIN(due_at) FROM grains WHERE status = 'open'), "
    "(SELECT MIN(next_attempt_at) FROM grains WHERE status = 'frozen'), "
    "(SELECT MIN(grace_ends_at) FROM customers WHERE closed_at IS NULL)"
)


def wakeup_from_row(row: tuple[Any, ...]) -> datetime | None:
    """The earliest of the moments ``NEXT_WAKEUP`` selects."""
    moments = [m for m in row if m is not None]
    return _dt(min(moments)) if moments else None


_SETTLED = (
    "SELECT id FROM grains WHERE status IN ('accepted', 'rejected', 'expired') AND finished_at < ?"
)
# Forgetting settled grains: their IdempotencyKeys first keep the outcome, then
# the grains go (their records with them), then keys older than their own term.
PRUNE_KEEP_OUTCOMES = (
    "UPDATE idempotency_keys SET outcome = (SELECT g.status FROM grains g "
    f"WHERE g.id = idempotency_keys.grain_id) WHERE grain_id IN ({_SETTLED})"
)
PRUNE_GRAINS = f"DELETE FROM grains WHERE id IN ({_SETTLED})"
PRUNE_KEYS = "DELETE FROM idempotency_keys WHERE received_at < ?"

# An IdempotencyKey seen before: its record, grain, hour and the grain's status
# (or, once the grain is pruned, its outcome).
SEEN_KEY = (
    "SELECT k.record_id, k.content_hash, k.grain_id, k.hour, k.rolled_forward, "
    "COALESCE(g.status, k.outcome) FROM idempotency_keys k "
    "LEFT JOIN grains g ON g.id = k.grain_id WHERE k.key = ?"
)
INSERT_KEY = (
    "INSERT INTO idempotency_keys (key, content_hash, record_id, grain_id, hour, "
    "rolled_forward, received_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
INSERT_RECORD = (
    "INSERT INTO usage_records (id, idempotency_key, content_hash, grain_id, "
    "original_hour, rolled_forward, record, customer, received_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
KEY_WHERE = (
    "kind = ? AND product_code = ? AND license_arn = ? AND customer_identifier = ? "
    "AND customer_aws_account_id = ? AND dimension = ? AND hour = ?"
)


# -- the write side -------------------------------------------------------

GRAIN_KEY_COLUMNS = (
    "kind, product_code, license_arn, customer_identifier, customer_aws_account_id, dimension, hour"
)
GRAIN_FOR_KEY = f"SELECT id, status, content FROM grains WHERE {KEY_WHERE}"
INSERT_GRAIN = (
    f"INSERT INTO grains ({GRAIN_KEY_COLUMNS}, status, content, due_at, deadline, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)"
)
UPDATE_GRAIN = "UPDATE grains SET content = ?, deadline = ? WHERE id = ?"
SET_DEADLINE = "UPDATE grains SET deadline = ? WHERE id = ?"
UNSETTLED = f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status IN ('open', 'frozen')"
FREEZE = (
    "UPDATE grains SET status = 'frozen', payload = ?, frozen_at = ?, next_attempt_at = ? "
    "WHERE id = ?"
)
EXPIRE = (
    "UPDATE grains SET status = 'expired', reason = 'SubmissionWindowPassed', finished_at = ? "
    "WHERE id = ?"
)
# Outcomes apply only to a grain still frozen: a settled one stays as it is.
SETTLE_RETRY = (
    "UPDATE grains SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
    "WHERE id = ? AND status = 'frozen'"
)
SETTLE_FINAL = (
    "UPDATE grains SET status = ?, attempts = attempts + 1, metering_record_id = ?, "
    "reason = ?, last_error = ?, finished_at = ? WHERE id = ? AND status = 'frozen'"
)


def key_params(key: GrainKey) -> tuple[object, ...]:
    """A grain key's values, in ``KEY_WHERE``'s and ``GRAIN_KEY_COLUMNS``' order."""
    return (
        key.kind,
        key.product_code,
        key.license_arn,
        key.customer_identifier,
        key.customer_aws_account_id,
        key.dimension,
        int(key.hour.timestamp()),
    )


def record_params(intake: Intake, grain_id: int, rolled_forward: bool) -> tuple[object, ...]:
    """``INSERT_RECORD``'s values for ``intake``, added to grain ``grain_id``."""
    usage = intake.usage
    return (
        intake.record_id,
        intake.idempotency_key,
        intake.content_hash,
        grain_id,
        int(usage.key.hour.timestamp()),
        int(rolled_forward),
        intake.record,
        usage.key.customer(),
        intake.received_at.timestamp(),
    )


def idempotency_key_params(
    intake: Intake, grain_id: int, hour: datetime, rolled_forward: bool
) -> tuple[object, ...]:
    """``INSERT_KEY``'s values for ``intake``'s key."""
    return (
        intake.idempotency_key,
        intake.content_hash,
        intake.record_id,
        grain_id,
        int(hour.timestamp()),
        int(rolled_forward),
        intake.received_at.timestamp(),
    )


def settle_statements(outcomes: list[Outcome], now: datetime) -> list[Query]:
    """The statements that record ``outcomes``."""
    statements: list[Query] = []
    for o in outcomes:
        if o.result == "retry":
            moment = (o.next_attempt_at or now).timestamp()
            statements.append((SETTLE_RETRY, (moment, o.error, o.grain_id)))
        else:
            statements.append(
                (
                    SETTLE_FINAL,
                    (
                        o.result,
                        o.metering_record_id,
                        o.reason,
                        o.error,
                        now.timestamp(),
                        o.grain_id,
                    ),
                )
            )
    return statements


def changed_deadlines(grains: list[GrainRow], policy: GrainPolicy) -> list[tuple[int, float]]:
    """(grain id, deadline) of unsettled grains whose deadline the windows in force move."""
    changed: list[tuple[int, float]] = []
    for grain in grains:
        deadline = policy.deadline(grain.key, grain.content).timestamp()
        if deadline != grain.deadline.timestamp():
            changed.append((grain.id, deadline))
    return changed


# -- one call's intake, in batches (app.queue.plan) ------------------------

# Statements carry at most this many rows, well under either engine's limit
# of bound values per statement.
_BATCH_ROWS = 500


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[i : i + _BATCH_ROWS] for i in range(0, len(items), _BATCH_ROWS)]


def grains_for_keys(keys: list[GrainKey]) -> list[Query]:
    """Statements selecting the grains of ``keys``: rows of ``(key columns..., id, status,
    content)``, read back with ``grain_key_of``."""
    # Joined from the keys, so that each key is one search of the grains' unique
    # index (SQLite scans the whole table for ``(columns) IN (VALUES ...)``).
    statements: list[Query] = []
    for chunk in _chunks(keys):
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
        statements.append(
            (
                f"WITH k ({GRAIN_KEY_COLUMNS}) AS (VALUES {values}) "
                f"SELECT {_GRAIN_KEY_COLUMNS_OF_G}, g.id, g.status, g.content "
                f"FROM k JOIN grains g ON {_JOIN_ON_KEY}",
                tuple(v for key in chunk for v in key_params(key)),
            )
        )
    return statements


_GRAIN_KEY_COLUMNS_OF_G = ", ".join(f"g.{c}" for c in GRAIN_KEY_COLUMNS.split(", "))
_JOIN_ON_KEY = " AND ".join(f"g.{c} = k.{c}" for c in GRAIN_KEY_COLUMNS.split(", "))


def grain_key_of(row: tuple[Any, ...] | list[Any]) -> GrainKey:
    """The grain key in the first seven columns of ``row`` (``GRAIN_KEY_COLUMNS``)."""
    return GrainKey(row[0], row[1], row[2], row[3], row[4], row[5], _dt(row[6]))


def insert_grains(rows: list[tuple[object, ...]]) -> list[Query]:
    """Statements inserting new grains (``INSERT_GRAIN``'s values per row), each returning
    ``(key columns..., id)`` for every row it inserted."""
    statements: list[Query] = []
    head = INSERT_GRAIN.split(" VALUES ", 1)[0]
    for chunk in _chunks(rows):
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?, 'open', ?, ?, ?, ?)"] * len(chunk))
        statements.append(
            (
                f"{head} VALUES {values} RETURNING {GRAIN_KEY_COLUMNS}, id",
                tuple(v for row in chunk for v in row),
            )
        )
    return statements


def seen_keys(keys: list[str]) -> list[Query]:
    """Statements finding IdempotencyKeys seen before: rows of ``(key, SEEN_KEY row...)``."""
    head, _ = SEEN_KEY.split("WHERE k.key = ?")
    head = head.replace("SELECT ", "SELECT k.key, ", 1)
    return [
        (f"{head}WHERE k.key IN ({', '.join(['?'] * len(chunk))})", tuple(chunk))
        for chunk in _chunks(keys)
    ]
