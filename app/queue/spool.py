"""The local spool: usage the shared store cannot take now, kept on the sidecar's own
volume and moved into the store once it answers.

With a shared PostgreSQL store (``app.queue.postgres``) a call's records go to the
store. When the store cannot take them (down, failing over, unreachable since the
sidecar started, a call past the store deadline), they go here instead, to a table
in the SQLite file at ``METERING_QUEUE_PATH`` (WAL, ``synchronous=FULL``, group
commit: ``app.queue.sqlite``), and the caller gets its 202 with the same record ids,
marked ``spooled``. Nothing is summed here: a spooled record is the record as taken,
so no grain is ever split between this file and the store.

**Moving.** A background loop moves waiting records into the store, oldest first,
up to ``MOVE_BATCH`` in one transaction (``PostgresStore.ingest_spooled``), and
settles each by its id:

- already in the store: a call whose commit's answer was lost did commit; it is
  not added again (``already_stored``);
- added like any other usage (``moved``): summed into its grain, rolled forward if
  that grain was sent meanwhile, as late usage is;
- its IdempotencyKey was seen in the store with the same content: a replay,
  counted nothing (``replayed``, pointing at the record it repeats);
- refused (``rejected``, with the reason): the customer registry's checks
  (``CustomerSubscriptionEnded``, ``CustomerFormConflict``), which the store
  decides in the move's transaction, a key seen with other content
  (``IdempotencyKeyConflict``), or AWS's limits on a grain (``GrainLimitExceeded``).
  The caller had its 202 already: the record stays visible here with its reason
  (``GET /v1/usage-records/{id}`` on this sidecar), is counted
  (``metering_spool_settled_records_total{outcome="rejected"}``,
  ``metering_usage_refusals_total``) and logged at error level; it is never
  dropped silently.

Moved records leave the spool (the store has them under the same id); replayed and
rejected ones stay, settled, for ``METERING_QUEUE_RETENTION_HOURS``.

**Order.** Within the spool, records move in the order they came. A call whose
IdempotencyKey waits in the spool is spooled too, behind it, so the first record
with a key stays the first; other calls go straight to the store once it answers.
IdempotencyKeys keep their meaning inside the spool (the same key and content: the
same record; other content: 409) and against the store when moved.

**Health.** The store says whether its last call failed and since when
(``PostgresStore.problem``); while it does, intake does not wait on it and spools
at once, and the loop probes the store every ``PROBE_INTERVAL`` until it answers.
The store's migrations run when it first answers, if the sidecar started without
it.

**Stopping.** At SIGTERM the loop moves what it can within the shutdown deadline;
what stays is logged at error level with counts. It moves when a sidecar starts
again on the same volume and the store answers: on an ``emptyDir`` that is lost
if the pod is deleted meanwhile, on a persistent volume it is not
(docs/shared-store.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, NamedTuple, Protocol

from app.metering.billing import utc_now
from app.metering.grains import GrainKey, TagSet, Usage
from app.queue.sqlite import SqliteStore, apply_migrations
from app.queue.store import (
    IdempotencyConflict,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    StoreUnavailable,
)
from app.runtime.metrics import Metrics
from app.runtime.supervisor import Spawn

log = logging.getLogger("app.queue.spool")

# Records moved in one transaction of the shared store, at most.
MOVE_BATCH = 500
# Seconds between attempts while the store does not answer (each bounded by the
# store deadline): quick to notice it is back, without hammering it.
PROBE_INTERVAL = 1.0
# Seconds between looks at an empty spool (a take also wakes the loop).
IDLE_INTERVAL = 5.0
# Why a call was spooled (metering_spooled_records_total{cause}).
SpoolCause = Literal["store_unavailable", "store_failed", "keys_waiting"]
SpoolState = Literal["spooled", "replayed", "rejected"]
# The reasons a spooled record is rejected when moved, beyond the registry's.
KEY_CONFLICT = "IdempotencyKeyConflict"
LIMIT_EXCEEDED = "GrainLimitExceeded"

# The spool's own schema, versioned apart from the queue's tables in the same file.
SPOOL_MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE spooled_records (
                seq INTEGER PRIMARY KEY,
                id TEXT NOT NULL UNIQUE,
                idempotency_key TEXT,
                content_hash TEXT NOT NULL,
                usage TEXT NOT NULL,
                record TEXT NOT NULL,
                received_at REAL NOT NULL,
                cause TEXT NOT NULL,
                state TEXT NOT NULL DEFAULT 'spooled'
                    CHECK (state IN ('spooled', 'replayed', 'rejected')),
                reason TEXT,
                detail TEXT,
                replay_of TEXT,
                settled_at REAL
            )""",
            "CREATE INDEX spooled_records_state ON spooled_records (state, seq)",
            "CREATE INDEX spooled_records_key ON spooled_records (idempotency_key) "
            "WHERE idempotency_key IS NOT NULL",
            "CREATE INDEX spooled_records_settled ON spooled_records (settled_at) "
            "WHERE settled_at IS NOT NULL",
        ],
    ),
]
# A spooled record's columns, as ``_row`` reads them.
_SELECT = (
    "SELECT seq, id, idempotency_key, content_hash, usage, record, received_at, cause, "
    "state, reason, detail, replay_of, settled_at FROM spooled_records "
)
_BY_ID = _SELECT + "WHERE id = ?"
_OLDEST_WAITING = _SELECT + "WHERE state = 'spooled' ORDER BY seq LIMIT ?"


class SharedStore(Protocol):
    """What the spool needs from the shared store (``PostgresStore``)."""

    @property
    def is_open(self) -> bool:
        """Whether the store has been opened (its schema migrated)."""

    @property
    def problem(self) -> tuple[str, datetime | None] | None:
        """Why the store's last call failed, and since when; ``None`` while it answers."""

    async def open(self) -> None:
        """Connect and migrate; raise ``StoreUnavailable``."""

    async def ingest_spooled(self, intakes: list[Intake]) -> list[Receipt | IntakeFailure | None]:
        """Add spooled records, settled by id (``None``: the store has it already)."""

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless the store takes a write now."""


class SpoolReceipt(NamedTuple):
    """Where a spooled record went: the spool, under ``record_id`` (a replay of a record
    waiting there names that record)."""

    record_id: str
    hour: datetime
    replayed: bool


@dataclass(frozen=True, slots=True)
class SpooledRow:
    """A record in the spool, and what became of it."""

    seq: int
    intake: Intake
    cause: str
    state: SpoolState
    reason: str | None
    detail: str | None
    replay_of: str | None
    settled_at: datetime | None


@dataclass(frozen=True, slots=True)
class SpoolCheck:
    """One readiness condition (``/readyz``)."""

    ok: bool
    detail: str
    # False: a failure only makes the sidecar degraded.
    blocking: bool


# -- the stored form -----------------------------------------------------


def usage_to_json(usage: Usage) -> str:
    """A record's contribution as the spool keeps it: exact (decimals as text)."""
    key = usage.key
    allocations = (
        None
        if usage.allocations is None
        else [[[list(tag) for tag in tags], str(q)] for tags, q in usage.allocations.items()]
    )
    return json.dumps(
        {
            "key": [*key[:6], int(key.hour.timestamp())],
            "timestamp": usage.timestamp.isoformat(),
            "quantity": str(usage.quantity),
            "decimal": usage.decimal_form,
            "allocations": allocations,
        },
        separators=(",", ":"),
    )


def usage_from_json(text: str) -> Usage:
    """The contribution ``usage_to_json`` wrote."""
    data = json.loads(text)
    kind, product, license_arn, identifier, account, dimension, hour = data["key"]
    allocations: dict[TagSet, Decimal] | None = None
    if data["allocations"] is not None:
        allocations = {
            tuple((str(k), str(v)) for k, v in tags): Decimal(q) for tags, q in data["allocations"]
        }
    return Usage(
        key=GrainKey(
            kind,
            product,
            license_arn,
            identifier,
            account,
            dimension,
            datetime.fromtimestamp(hour, UTC),
        ),
        timestamp=datetime.fromisoformat(data["timestamp"]),
        quantity=Decimal(data["quantity"]),
        decimal_form=bool(data["decimal"]),
        allocations=allocations,
    )


def _row(row: Sequence[Any]) -> SpooledRow:
    return SpooledRow(
        seq=int(row[0]),
        intake=Intake(
            record_id=row[1],
            idempotency_key=row[2],
            content_hash=row[3],
            usage=usage_from_json(row[4]),
            record=row[5],
            received_at=datetime.fromtimestamp(row[6], UTC),
        ),
        cause=row[7],
        state=row[8],
        reason=row[9],
        detail=row[10],
        replay_of=row[11],
        settled_at=None if row[12] is None else datetime.fromtimestamp(row[12], UTC),
    )


def _migrate(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """Create or migrate the spool's tables; (records waiting, the oldest's arrival)."""
    apply_migrations(conn, "spool_migrations", SPOOL_MIGRATIONS, log, "spool schema migrated")
    (waiting,) = conn.execute(
        "SELECT COUNT(*) FROM spooled_records WHERE state = 'spooled'"
    ).fetchone()
    return int(waiting), _oldest(conn)


def _oldest(conn: sqlite3.Connection) -> float | None:
    # Records arrive in seq order: the first waiting one is the oldest (an index search).
    row = conn.execute(
        "SELECT received_at FROM spooled_records WHERE state = 'spooled' ORDER BY seq LIMIT 1"
    ).fetchone()
    return None if row is None else float(row[0])


_WAITING_KEYS = (
    "SELECT idempotency_key, id, content_hash, usage FROM spooled_records "
    "WHERE state = 'spooled' AND idempotency_key IN ({})"
)


def _waiting_keys(conn: sqlite3.Connection, keys: list[str]) -> dict[str, tuple[str, str, str]]:
    """Waiting records by IdempotencyKey: key -> (id, content hash, usage)."""
    found: dict[str, tuple[str, str, str]] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        statement = _WAITING_KEYS.format(", ".join("?" * len(chunk)))
        for key, record_id, content_hash, usage in conn.execute(statement, chunk):
            found[key] = (record_id, content_hash, usage)
    return found


# -- the file ------------------------------------------------------------


class SpoolFile:
    """The spool's table in the SQLite file at ``METERING_QUEUE_PATH``.

    Writes share the file's group commit; a record is taken only once its commit
    is on disk. Counts of what waits are kept in memory (one count at open), so
    neither the metrics nor ``/readyz`` read the table.
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.path = store.path
        self.waiting = 0
        self._oldest: float | None = None
        self._opened = False
        self.open_error: str | None = "not opened yet"

    @property
    def oldest(self) -> datetime | None:
        """When the oldest waiting record arrived."""
        return None if self._oldest is None else datetime.fromtimestamp(self._oldest, UTC)

    async def open(self) -> None:
        """Open the file and the spool's tables; raise ``StoreUnavailable`` if not."""
        if self._opened:
            return
        try:
            await self._store.open()
            self.waiting, self._oldest = await self._store.run_write(_migrate)
        except StoreUnavailable as exc:
            self.open_error = str(exc)
            with contextlib.suppress(StoreUnavailable):
                await self._store.close(budget=1.0)
            raise
        self._opened = True
        self.open_error = None

    async def close(self, budget: float) -> None:
        """Flush and close the file, within ``budget`` seconds."""
        if self._opened:
            self._opened = False
            await self._store.close(budget=budget)

    def _require_open(self) -> None:
        if not self._opened:
            raise StoreUnavailable(f"the local spool is not open: {self.open_error}")

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless a record could be spooled now (the file, the
        disk's room, the last commit: as the SQLite queue checks itself)."""
        self._require_open()
        await self._store.check_writable()

    async def take(
        self, intakes: list[Intake], *, all_or_nothing: bool, cause: SpoolCause
    ) -> list[SpoolReceipt | IntakeFailure]:
        """Spool a call's records in one commit, in order. A key waiting in the spool
        (or earlier in the call) with the same content answers with that record; with
        other content it fails the record (``IntakeRefused`` if ``all_or_nothing``,
        and nothing is written)."""
        self._require_open()
        keys = [i.idempotency_key for i in intakes if i.idempotency_key is not None]

        def run(conn: sqlite3.Connection) -> tuple[list[SpoolReceipt | IntakeFailure], int]:
            seen = {
                key: (record_id, content_hash, usage_from_json(usage).key.hour)
                for key, (record_id, content_hash, usage) in _waiting_keys(conn, keys).items()
            }
            outcomes: list[SpoolReceipt | IntakeFailure] = []
            rows: list[tuple[object, ...]] = []
            for index, intake in enumerate(intakes):
                key = intake.idempotency_key
                if key is not None and key in seen:
                    record_id, content_hash, hour = seen[key]
                    if content_hash != intake.content_hash:
                        message = str(IdempotencyConflict(key, record_id))
                        outcomes.append(IntakeFailure(index, message, conflict=True))
                    else:
                        outcomes.append(SpoolReceipt(record_id, hour, True))
                    continue
                if key is not None:
                    seen[key] = (intake.record_id, intake.content_hash, intake.usage.key.hour)
                rows.append(
                    (
                        intake.record_id,
                        key,
                        intake.content_hash,
                        usage_to_json(intake.usage),
                        intake.record,
                        intake.received_at.timestamp(),
                        cause,
                    )
                )
                outcomes.append(SpoolReceipt(intake.record_id, intake.usage.key.hour, False))
            failures = [o for o in outcomes if isinstance(o, IntakeFailure)]
            if all_or_nothing and failures:
                raise IntakeRefused(failures)
            conn.executemany(
                "INSERT INTO spooled_records (id, idempotency_key, content_hash, usage, "
                "record, received_at, cause) VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            return outcomes, len(rows)

        outcomes, added = await self._store.run_write(run)
        if added:
            self.waiting += added
            if self._oldest is None:
                self._oldest = min(i.received_at for i in intakes).timestamp()
        return outcomes

    async def has_waiting_keys(self, keys: list[str]) -> bool:
        """Whether any of ``keys`` belongs to a record waiting in the spool."""
        if not keys or not self.waiting:
            return False
        self._require_open()
        return bool(await self._store.run_read(lambda conn: _waiting_keys(conn, keys)))

    async def get(self, record_id: str) -> SpooledRow | None:
        """One spooled record, waiting or settled."""
        self._require_open()
        rows = await self._store.run_read(
            lambda conn: conn.execute(_BY_ID, (record_id,)).fetchall()
        )
        return _row(rows[0]) if rows else None

    async def batch(self, limit: int) -> list[SpooledRow]:
        """The oldest waiting records, in the order they came."""
        self._require_open()
        rows = await self._store.run_read(
            lambda conn: conn.execute(_OLDEST_WAITING, (limit,)).fetchall()
        )
        if not rows:
            # Nothing waits, whatever the counts kept in memory said.
            self.waiting, self._oldest = 0, None
        return [_row(row) for row in rows]

    async def settle(
        self,
        moved: list[str],
        replayed: list[tuple[str, str]],
        rejected: list[tuple[str, str, str]],
        now: datetime,
    ) -> None:
        """Record what moving did: ``moved`` ids leave the spool (the store has them);
        ``replayed`` (id, the record it repeats) and ``rejected`` (id, reason, detail)
        stay, settled at ``now``."""
        self._require_open()
        at = now.timestamp()

        def run(conn: sqlite3.Connection) -> tuple[int, float | None]:
            settled = conn.executemany(
                "DELETE FROM spooled_records WHERE id = ? AND state = 'spooled'",
                [(record_id,) for record_id in moved],
            ).rowcount
            settled += conn.executemany(
                "UPDATE spooled_records SET state = 'replayed', replay_of = ?, settled_at = ? "
                "WHERE id = ? AND state = 'spooled'",
                [(original, at, record_id) for record_id, original in replayed],
            ).rowcount
            settled += conn.executemany(
                "UPDATE spooled_records SET state = 'rejected', reason = ?, detail = ?, "
                "settled_at = ? WHERE id = ? AND state = 'spooled'",
                [(reason, detail, at, record_id) for record_id, reason, detail in rejected],
            ).rowcount
            return settled, _oldest(conn)

        settled, self._oldest = await self._store.run_write(run)
        self.waiting = 0 if self._oldest is None else max(0, self.waiting - settled)

    async def recount(self) -> None:
        """Read again what waits (one index search while nothing does): the counts kept in
        memory must never hide a waiting record from the loop."""
        self._require_open()

        def run(conn: sqlite3.Connection) -> tuple[int | None, float | None]:
            oldest = _oldest(conn)
            if oldest is None:
                return 0, None
            (waiting,) = conn.execute(
                "SELECT COUNT(*) FROM spooled_records WHERE state = 'spooled'"
            ).fetchone()
            return int(waiting), oldest

        if not self.waiting:
            waiting, self._oldest = await self._store.run_read(run)
            self.waiting = waiting or 0

    async def prune(self, before: datetime) -> int:
        """Forget replayed and rejected records settled before ``before``."""
        self._require_open()
        return await self._store.run_write(
            lambda conn: (
                conn.execute(
                    "DELETE FROM spooled_records WHERE settled_at < ?", (before.timestamp(),)
                ).rowcount
            )
        )


# -- the spool: intake's fallback and the loop that empties it -------------


class Spool:
    """The shared store's fallback; see the module docstring."""

    def __init__(
        self,
        file: SpoolFile,
        store: SharedStore,
        metrics: Metrics,
        *,
        retention: timedelta,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.file = file
        self._store = store
        self._metrics = metrics
        self._retention = retention
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_prune: datetime | None = None
        # Whether records have been spooled since the spool was last empty (logged once).
        self._filling = False
        metrics.spool_waiting.set_function(lambda: self.file.waiting)
        metrics.spool_oldest_age.set_function(self._oldest_age)
        metrics.queue_store_problem.set_function(lambda: 0 if store.problem is None else 1)

    def _oldest_age(self) -> float:
        oldest = self.file.oldest
        return 0.0 if oldest is None or not self.file.waiting else self._age(oldest)

    def _age(self, moment: datetime) -> float:
        return max(0.0, (self._clock() - moment).total_seconds())

    # -- intake ---------------------------------------------------------

    def store_problem(self) -> tuple[str, datetime | None] | None:
        """Why the shared store failed its last call, and since when; ``None`` if it answers."""
        return self._store.problem

    async def cause_to_spool(self, intakes: list[Intake]) -> SpoolCause | None:
        """Why a call must go to the spool rather than to the store, if it must: the store
        is known to be down, or one of its keys waits in the spool (the first record with
        a key stays the first)."""
        if self._store.problem is not None:
            return "store_unavailable"
        keys = [i.idempotency_key for i in intakes if i.idempotency_key is not None]
        try:
            if await self.file.has_waiting_keys(keys):
                return "keys_waiting"
        except StoreUnavailable:
            # The spool cannot be read: the store takes the call (its own keys decide).
            return None
        return None

    async def take(
        self, intakes: list[Intake], *, all_or_nothing: bool, cause: SpoolCause
    ) -> list[SpoolReceipt | IntakeFailure]:
        """Spool a call's records (``SpoolFile.take``), counted and told once per filling."""
        outcomes = await self.file.take(intakes, all_or_nothing=all_or_nothing, cause=cause)
        added = sum(1 for o in outcomes if isinstance(o, SpoolReceipt) and not o.replayed)
        if added:
            self._metrics.spooled.labels(cause).inc(added)
            if not self._filling:
                self._filling = True
                # The loop may be pausing for an idle while: move (or probe) now.
                self._wake.set()
                problem = self._store.problem
                log.warning(
                    "usage goes to the local spool: the shared store cannot take it now; "
                    "it moves there, by record id, once the store answers",
                    extra={
                        "cause": cause,
                        "error": problem[0] if problem else None,
                        "path": str(self.file.path),
                    },
                )
        return outcomes

    async def get(self, record_id: str) -> SpooledRow | None:
        """A spooled record (waiting or settled), or ``None`` (unknown to the spool, or the
        spool cannot be read: the store is asked then)."""
        try:
            return await self.file.get(record_id)
        except StoreUnavailable:
            return None

    # -- readiness ------------------------------------------------------

    async def readiness(self) -> dict[str, SpoolCheck]:
        """``queue``: the shared store (blocking only if the spool cannot take usage
        either); ``spool``: whether it can be written and what waits there."""
        try:
            await self.file.check_writable()
        except StoreUnavailable as exc:
            spool_error: str | None = str(exc)
        else:
            spool_error = None
        problem = self._store.problem
        if problem is None:
            queue = SpoolCheck(True, "writable (the shared store)", False)
        else:
            reason, since = problem
            detail = "the shared store cannot be used" + (
                f" since {since.isoformat()}" if since else ""
            )
            detail += f" ({reason})"
            detail += (
                f"; the local spool cannot be written either ({spool_error}): usage cannot be taken"
                if spool_error
                else "; new usage goes to the local spool"
            )
            queue = SpoolCheck(False, detail, spool_error is not None)
        waiting = self.file.waiting
        if spool_error is not None:
            spool = SpoolCheck(False, f"cannot be written: {spool_error}", False)
        elif waiting:
            oldest = self.file.oldest
            age = f", the oldest received {self._age(oldest):.0f} s ago" if oldest else ""
            spool = SpoolCheck(
                False,
                f"{waiting} records wait to move into the shared store{age}",
                False,
            )
        else:
            spool = SpoolCheck(True, "empty", False)
        return {"queue": queue, "spool": spool}

    # -- the loop -------------------------------------------------------

    def start(self, spawn: Spawn) -> None:
        """Start the loop that opens what could not be opened and moves what waits."""
        self._task = spawn("usage-spool-mover", self._loop())

    def nudge(self) -> None:
        """Look again now (records were spooled behind a waiting key)."""
        self._wake.set()

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                delay = await self._round()
            except StoreUnavailable:
                # Told by the store (once per outage) and by /readyz; tried again soon.
                delay = PROBE_INTERVAL
            except Exception:
                log.exception("spool round failed")
                delay = IDLE_INTERVAL
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _round(self) -> float:
        """One round: open what is not open, move a batch or probe the store; the pause
        until the next round."""
        if self.file.open_error is not None:
            told = self.file.open_error
            try:
                await self.file.open()
            except StoreUnavailable as exc:
                # Once per cause: /readyz and the spool check say it meanwhile.
                level = logging.DEBUG if str(exc) == told else logging.ERROR
                log.log(level, "the local spool cannot be opened", extra={"error": str(exc)})
            else:
                log.warning("the local spool is open", extra={"path": str(self.file.path)})
        if not self._store.is_open:
            await self._store.open()
        if self.file.waiting and self.file.open_error is None:
            await self.move_batch()
            return 0.0 if self.file.waiting else IDLE_INTERVAL
        if self._store.problem is not None:
            await self._store.check_writable()
        await self._housekeeping()
        return IDLE_INTERVAL if self._store.problem is None else PROBE_INTERVAL

    async def _housekeeping(self) -> None:
        if self.file.open_error is not None:
            return
        await self.file.recount()
        now = self._clock()
        if self._last_prune is None or now - self._last_prune > timedelta(hours=1):
            self._last_prune = now
            await self.file.prune(now - self._retention)

    async def move_batch(self) -> int:
        """Move the oldest waiting records into the store and settle them by id; how many
        were settled. Raises ``StoreUnavailable`` (nothing settled: tried again later)."""
        rows = await self.file.batch(MOVE_BATCH)
        if not rows:
            return 0
        outcomes = await self._store.ingest_spooled([row.intake for row in rows])
        moved: list[str] = []
        replayed: list[tuple[str, str]] = []
        rejected: list[tuple[str, str, str]] = []
        counts: Counter[str] = Counter()
        for row, outcome in zip(rows, outcomes, strict=True):
            record_id = row.intake.record_id
            if outcome is None:
                moved.append(record_id)
                counts["already_stored"] += 1
            elif isinstance(outcome, Receipt):
                if outcome.replayed:
                    replayed.append((record_id, outcome.record_id))
                    counts["replayed"] += 1
                else:
                    moved.append(record_id)
                    counts["moved"] += 1
            else:
                reason = outcome.reason or (KEY_CONFLICT if outcome.conflict else LIMIT_EXCEEDED)
                rejected.append((record_id, reason, outcome.message))
                counts["rejected"] += 1
        await self.file.settle(moved, replayed, rejected, self._clock())
        for outcome_name, count in counts.items():
            self._metrics.spool_settled.labels(outcome_name).inc(count)
        refusals = Counter(reason for _, reason, _ in rejected)
        for reason, count in refusals.items():
            if reason not in (KEY_CONFLICT, LIMIT_EXCEEDED):
                self._metrics.usage_refusals.labels(reason).inc(count)
        if rejected:
            # The caller had its 202: this is usage that will not be billed.
            log.error(
                "spooled usage refused when moved into the shared store; it stays visible "
                "as rejected at GET /v1/usage-records/{id} on this sidecar",
                extra={
                    "records": len(rejected),
                    "reasons": dict(refusals),
                    "record_ids": [record_id for record_id, _, _ in rejected[:20]],
                },
            )
        log.info("spooled usage moved into the shared store", extra=dict(counts))
        if not self.file.waiting and self._filling:
            self._filling = False
            log.warning("the local spool is empty again: everything spooled has moved")
        return len(rows)

    async def stop(self, budget: float) -> None:
        """Stop the loop, then move what can be moved within ``budget`` seconds; log at
        error level, with counts, what stays."""
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            task, self._task = self._task, None
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=max(0.0, end - loop.time()))
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        error: str | None = None
        while self.file.waiting and self.file.open_error is None:
            left = end - loop.time()
            if left <= 0:
                break
            try:
                async with asyncio.timeout(left):
                    if not self._store.is_open:
                        await self._store.open()
                    await self.move_batch()
            except (StoreUnavailable, TimeoutError) as exc:
                error = str(exc) or "the shutdown deadline passed"
                # Worth another try while the budget lasts: a failover ends in seconds.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, min(PROBE_INTERVAL, end - loop.time()))):
                        await asyncio.Event().wait()
        if self.file.waiting:
            oldest = self.file.oldest
            log.error(
                "usage stays in the local spool at exit: the shared store did not take it "
                "within the shutdown deadline. It moves when a sidecar starts again on this "
                "volume and the store answers; on an emptyDir it is lost if the pod is "
                "deleted first",
                extra={
                    "records": self.file.waiting,
                    "oldest_received_at": oldest.isoformat() if oldest else None,
                    "path": str(self.file.path),
                    "error": error or self._problem_text(),
                },
            )

    def _problem_text(self) -> str | None:
        problem = self._store.problem
        return problem[0] if problem else None
