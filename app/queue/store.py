"""The usage store: the interface the queue needs, whatever keeps the data.

SQLite (``app.queue.sqlite``) is the embedded default: one sidecar owns the
file. A shared store lets several replicas sum into the same grains and
makes sure exactly one of them sends each.

Grain lifecycle::

    open ──(hour closed + grace)──> frozen ──> accepted | rejected | expired
      │  ──(its customer's grace     │
      │     passed: at once)───────>─┘
      └── usage for a frozen (or later) grain rolls forward to the next hour,
          unless its customer's subscription has ended: then it is refused

Once frozen, a grain's payload never changes: every attempt, after any
crash, resends the same bytes, which AWS treats as the same record.

The store also keeps the customer registry (``app.queue.registry``): the
customers usage is metered for, their subscription events, and whether their
usage is still taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from app.metering.billing import HOUR, SubmissionWindows, submission_deadline
from app.metering.grains import (
    GrainContent,
    GrainKey,
    Usage,
)
from app.queue.records import Filters

if TYPE_CHECKING:
    from app.metering.subscriptions import SubscriptionEvent
    from app.queue.registry import (
        ClosedCustomer,
        CustomerRefused,
        CustomerRow,
        EventOutcome,
        Identity,
    )


class StoreUnavailable(Exception):
    """The store cannot be written (disk full, volume gone, database down)."""


class IdempotencyConflict(Exception):
    """An IdempotencyKey came back with other content."""

    def __init__(self, key: str, record_id: str) -> None:
        super().__init__(
            f"IdempotencyKey {key!r} was used for record {record_id} with other content"
        )
        self.key = key
        self.record_id = record_id


@dataclass(frozen=True, slots=True)
class GrainPolicy:
    """When grains fall due, until when AWS takes them, and how much time the queue
    keeps for itself to send one (``margin``).

    Deadlines follow the windows of the settings in force: a store recomputes
    those of unsettled grains when it opens, so a changed setting applies to
    grains already queued.
    """

    grace: timedelta
    windows: SubmissionWindows = field(default_factory=SubmissionWindows)
    margin: timedelta = timedelta(minutes=5)

    def due_at(self, key: GrainKey) -> datetime:
        """The hour has closed and late events had their grace."""
        return key.hour + HOUR + self.grace

    def deadline(self, key: GrainKey, content: GrainContent) -> datetime:
        """After this AWS refuses the grain's record (its Timestamp is the latest event's)."""
        timestamp = content.timestamp or key.hour
        return submission_deadline(timestamp, self.windows.of(key.kind))

    def in_time(self, key: GrainKey, timestamp: datetime, now: datetime) -> datetime | None:
        """``None`` if usage stamped ``timestamp`` for ``key`` leaves the queue its margin
        to send it; otherwise AWS's deadline for it, which the queue could not meet."""
        deadline = submission_deadline(timestamp, self.windows.of(key.kind))
        if max(now, self.due_at(key)) + self.margin <= deadline:
            return None
        return deadline


class Intake(NamedTuple):
    """One record to add: its id, idempotency data, contribution and stored form."""

    record_id: str
    idempotency_key: str | None
    content_hash: str
    usage: Usage
    # The record as stored: JSON text, what was sent with the defaults filled in.
    record: str
    received_at: datetime


class Receipt(NamedTuple):
    """Where a record went."""

    record_id: str
    grain_id: int
    hour: datetime
    rolled_forward: bool
    replayed: bool
    grain_status: str


def replayed(seen: tuple[Any, ...], intake: Intake) -> Receipt:
    """The receipt of a record whose IdempotencyKey was seen before (a ``SEEN_KEY`` row);
    raises ``IdempotencyConflict`` if it came with other content."""
    record_id, content_hash, grain_id, hour, rolled_forward, status = seen
    if content_hash != intake.content_hash:
        assert intake.idempotency_key is not None
        raise IdempotencyConflict(intake.idempotency_key, record_id)
    return Receipt(
        record_id,
        grain_id,
        datetime.fromtimestamp(hour, UTC),
        bool(rolled_forward),
        True,
        status or "accepted",
    )


@dataclass(frozen=True, slots=True)
class IntakeFailure:
    """Why one record could not be added (its index in the call)."""

    index: int
    message: str
    conflict: bool = False
    # Refused for its customer (app.queue.registry's ENDED or FORM_CONFLICT).
    reason: str | None = None


class IntakeRefused(Exception):
    """An all-or-nothing call had records the store could not take; nothing was written."""

    def __init__(self, failures: list[IntakeFailure]) -> None:
        super().__init__("; ".join(f.message for f in failures))
        self.failures = failures


@dataclass(slots=True)
class GrainRow:
    """A grain as stored."""

    id: int
    key: GrainKey
    status: str
    content: GrainContent
    payload: str | None
    attempts: int
    due_at: datetime
    deadline: datetime
    next_attempt_at: datetime | None
    metering_record_id: str | None
    reason: str | None
    last_error: str | None
    records: int = 0


@dataclass(slots=True)
class RecordRow:
    """A queued record as stored, with its grain."""

    id: str
    idempotency_key: str | None
    record: dict[str, Any]
    received_at: datetime
    rolled_forward: bool
    original_hour: datetime
    grain: GrainRow


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one grain's attempt."""

    grain_id: int
    result: Literal["accepted", "rejected", "expired", "retry"]
    metering_record_id: str | None = None
    reason: str | None = None
    error: str | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Figures for the metrics."""

    pending_records: int
    open_grains: int
    grains_due: int
    oldest_pending: datetime | None
    nearest_deadline: datetime | None


class UsageStore(Protocol):
    """What the queue needs from a store. Every method may raise ``StoreUnavailable``."""

    commits: int
    # "replica": this sidecar's own queue; "fleet": shared by every replica.
    scope: str

    async def open(self) -> None:
        """Create or migrate the schema; fail loudly if the store cannot be used."""

    async def close(self, budget: float = ...) -> None:
        """Flush and release everything, within ``budget`` seconds."""

    async def ingest(
        self, intakes: list[Intake], *, all_or_nothing: bool
    ) -> list[Receipt | IntakeFailure]:
        """Add records to their grains in one durable commit; raise ``IntakeRefused``
        (writing nothing) if ``all_or_nothing`` and any cannot be added."""

    async def freeze_due(self, now: datetime, *, everything: bool = False) -> int:
        """Freeze open grains that are due (all open grains with ``everything``)."""

    async def expire_overdue(self, now: datetime) -> list[GrainRow]:
        """Mark unsent grains whose submission deadline has passed as expired."""

    async def sendable(
        self, now: datetime, limit: int, *, ignore_backoff: bool = False
    ) -> list[GrainRow]:
        """Frozen grains whose next attempt is due, oldest hour first."""

    async def settle(self, outcomes: list[Outcome], now: datetime) -> None:
        """Record what happened to attempts, in one commit."""

    async def get_record(self, record_id: str) -> RecordRow | None:
        """One record and its grain."""

    async def list_records(
        self, filters: Filters, after: str | None, limit: int
    ) -> list[RecordRow]:
        """Records matching ``filters``, ordered by id, after cursor ``after``."""

    async def get_grain(self, grain_id: int) -> GrainRow | None:
        """One grain."""

    async def list_grains(self, filters: Filters, after: int | None, limit: int) -> list[GrainRow]:
        """Grains matching ``filters``, ordered by id, after cursor ``after``."""

    async def stats(self, now: datetime) -> QueueStats:
        """Counts and ages for the metrics."""

    async def next_wakeup(self) -> datetime | None:
        """The earliest moment a grain falls due or an attempt is due."""

    async def prune(self, before: datetime, keys_before: datetime) -> int:
        """Forget grains settled before ``before``, with their records, and the
        IdempotencyKeys of records received before ``keys_before`` (a key outlives
        its record, keeping the record's id and outcome)."""

    async def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless a write would succeed now."""

    # -- the customer registry (app.queue.registry) --------------------------

    async def apply_event(
        self, event: SubscriptionEvent, now: datetime, grace: timedelta
    ) -> EventOutcome:
        """Apply a subscription event once, durably: its id and its effect in one commit."""

    async def record_customer(self, identity: Identity, now: datetime) -> CustomerRow:
        """Register a ResolveCustomer answer, in one commit."""

    async def close_customers(self, now: datetime) -> list[ClosedCustomer]:
        """Freeze every open grain of customers whose grace has passed, marking them closed
        in the same commit; end customers whose final hour is over."""

    async def batch_refusals(
        self, keys: list[GrainKey], now: datetime
    ) -> list[tuple[int, CustomerRefused]]:
        """Which of the records a BatchMeterUsage call sends straight to AWS (as grain
        keys) must not go, and why. Reads only."""

    async def get_customer(self, customer_id: int) -> CustomerRow | None:
        """One customer, with its latest events."""

    async def list_customers(
        self, status: str | None, customer: str | None, after: int | None, limit: int
    ) -> list[CustomerRow]:
        """Customers by status and either id form, ordered by id, after cursor ``after``."""

    async def customer_counts(self) -> dict[str, int]:
        """Customers by status, for the metrics."""
