"""The customer registry: whom the queue meters for, and whether their usage is still taken.

A *customer* is one subscription of one product. AWS names it in two forms: a
``CustomerIdentifier`` (with the ``ProductCode``), and, for Concurrent
Agreements, a ``CustomerAWSAccountId`` with a ``LicenseArn``. Records under
both forms for the same customer, dimension and hour bill twice. The registry
learns customers from every ResolveCustomer answer and every subscription
event, and ties the two forms together when one of them carries both.

**Matching** (``same_subscription``): the same ``CustomerIdentifier``, or the
same ``CustomerAWSAccountId``; and then, where both sides know a license, the
same license id (``l-...``), else where both know a product, the same product.
An account may hold several licenses of one product (Concurrent Agreements):
account + product matches only while a license is unknown on one side.

**Lifecycle**::

    active ──(first ending event)──> ending ──(start + 1 h, or ended event)──> ended
      ^                                │
      └──(subscribed within the grace; └──(grace passed: every open grain of
          ResolveCustomer once closed)      the customer frozen and sent; usage
                                            refused from then on: "closed")

A customer's usage is refused once it is *closed for usage*: ``ended``, or its
grace (``METERING_CUSTOMER_END_GRACE`` after the ending started) has passed, or
its final usage has been frozen (``closed_at``). Intake checks this in the same
transaction that adds the usage, and closing a customer freezes its grains and
sets ``closed_at`` in one transaction, so a record is either in the final send
or refused, never left behind.

**One implementation for both stores.** Each operation is a *script*: a
generator that yields statements (``?`` placeholders) and receives their rows.
The SQLite store runs it on its writer connection; the PostgreSQL store on its
transaction's connection, with ``postgres=True`` adding the registry lock and
row locks: every change to the registry takes the registry lock exclusively
and every intake takes it shared, so a change and an intake never interleave,
across every replica. An event's id is unique in ``customer_events`` and
inserted in the transaction of its effect: of replicas applying the same event
at once, exactly one applies it.

Every lookup is an index search (identifier, account, an event's id, a
customer's open grains), so an event or a record costs what it names, never
what the registry holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from app.metering.billing import HOUR
from app.metering.grains import GrainKey, frozen_payload
from app.metering.shapes import format_timestamp
from app.metering.subscriptions import EventKind, SubscriptionEvent, license_id
from app.queue import queries
from app.queue.queries import GRAIN_COLUMNS, grain_from_row, optional_time
from app.queue.store import GrainRow

T = TypeVar("T")
Row = tuple[Any, ...]
Query = tuple[str, tuple[Any, ...]]
# A registry operation: yields statements, receives each one's rows, returns its result.
Script = Generator[Query, list[Row], T]

CustomerStatus = Literal["active", "ending", "ended"]
STATUSES: tuple[CustomerStatus, ...] = ("active", "ending", "ended")
# The reasons a record is refused for its customer (metering_usage_refusals{reason}).
ENDED = "CustomerSubscriptionEnded"
FORM_CONFLICT = "CustomerFormConflict"

# PostgreSQL: the advisory lock every registry change takes exclusively and every
# intake shared (see the module docstring).
REGISTRY_LOCK = 7_201_465_312_118_302
LOCK_EXCLUSIVE: Query = ("SELECT pg_advisory_xact_lock(?)", (REGISTRY_LOCK,))
LOCK_SHARED: Query = ("SELECT pg_advisory_xact_lock_shared(?)", (REGISTRY_LOCK,))
# Closing works through this many customers a cycle at most (the rest next cycle).
_CLOSE_BATCH = 100
# A customer's view shows its latest events, this many at most.
EVENTS_SHOWN = 100
_BATCH_ROWS = 500


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a record, an event or an answer names; ``""`` where it names nothing."""

    customer_identifier: str = ""
    customer_aws_account_id: str = ""
    license_arn: str = ""
    product_code: str = ""
    agreement_id: str = ""

    @property
    def license_id(self) -> str:
        """The license's ``l-...`` id: licenses are compared on it."""
        return license_id(self.license_arn) or ""

    @property
    def named(self) -> bool:
        """Whether it names a customer at all."""
        return bool(self.customer_identifier or self.customer_aws_account_id)

    @classmethod
    def of_key(cls, key: GrainKey) -> Identity:
        """The customer form of a grain (or of a record, by its grain)."""
        return cls(
            customer_identifier=key.customer_identifier,
            customer_aws_account_id=key.customer_aws_account_id,
            license_arn=key.license_arn,
            product_code=key.product_code,
        )

    @classmethod
    def of_event(cls, event: SubscriptionEvent) -> Identity:
        """What an event says about its customer."""
        return cls(
            customer_identifier=event.customer_identifier or "",
            customer_aws_account_id=event.customer_aws_account_id or "",
            license_arn=event.license_arn or "",
            product_code=event.product_code or "",
            agreement_id=event.agreement_id or "",
        )

    def form(self) -> tuple[str, str, str, str]:
        """The billing form, comparable: (product or license id, customer id forms)."""
        product = "" if self.license_arn else self.product_code
        return (product, self.license_id, self.customer_identifier, self.customer_aws_account_id)

    def describe(self) -> str:
        """The form in words, as a problem's detail names it."""
        who = (
            f"CustomerIdentifier {self.customer_identifier}"
            if self.customer_identifier
            else f"CustomerAWSAccountId {self.customer_aws_account_id}"
        )
        if self.license_arn:
            return f"{who} + LicenseArn {self.license_arn}"
        return f"{who} + ProductCode {self.product_code}" if self.product_code else who

    def merged(self, other: Identity) -> Identity:
        """This identity with what ``other`` knows and this one does not."""
        return Identity(
            customer_identifier=self.customer_identifier or other.customer_identifier,
            customer_aws_account_id=self.customer_aws_account_id or other.customer_aws_account_id,
            license_arn=self.license_arn or other.license_arn,
            product_code=self.product_code or other.product_code,
            agreement_id=self.agreement_id or other.agreement_id,
        )


def same_subscription(a: Identity, b: Identity) -> bool:
    """Whether ``a`` and ``b`` name the same customer (see the module docstring)."""
    by_identifier = a.customer_identifier != "" and a.customer_identifier == b.customer_identifier
    by_account = (
        a.customer_aws_account_id != "" and a.customer_aws_account_id == b.customer_aws_account_id
    )
    if not (by_identifier or by_account):
        return False
    if a.license_id and b.license_id:
        return a.license_id == b.license_id
    if a.product_code and b.product_code:
        return a.product_code == b.product_code
    return True


@dataclass(slots=True)
class CustomerRow:
    """A customer as stored."""

    id: int
    identity: Identity
    status: CustomerStatus
    ending_at: datetime | None
    grace_ends_at: datetime | None
    ended_at: datetime | None
    closed_at: datetime | None
    created_at: datetime
    updated_at: datetime
    # Filled in for one customer's view only: its latest events, oldest first.
    events: list[CustomerEventRow] = field(default_factory=list)

    def closed_for_usage(self, now: datetime) -> bool:
        """Whether usage for this customer is refused at ``now``."""
        return (
            self.status == "ended"
            or self.closed_at is not None
            or (self.grace_ends_at is not None and self.grace_ends_at <= now)
        )

    def refused_since(self) -> datetime | None:
        """Since when usage is (or will be) refused."""
        moments = [m for m in (self.grace_ends_at, self.ended_at, self.closed_at) if m]
        return min(moments) if moments else None

    def forms(self) -> list[Identity]:
        """Every form a record for this customer can take (one grain each per hour)."""
        i = self.identity
        products = ([("", i.license_arn)] if i.license_arn else []) + (
            [(i.product_code, "")] if i.product_code else []
        )
        people = ([(i.customer_identifier, "")] if i.customer_identifier else []) + (
            [("", i.customer_aws_account_id)] if i.customer_aws_account_id else []
        )
        return [
            Identity(
                customer_identifier=x,
                customer_aws_account_id=n,
                license_arn=arn,
                product_code=product,
            )
            for product, arn in products
            for x, n in people
        ]


@dataclass(frozen=True, slots=True)
class CustomerEventRow:
    """One event (or ResolveCustomer answer) in a customer's history."""

    event_id: str
    type: str
    kind: str
    time: datetime | None
    applied_at: datetime
    outcome: str


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """What applying an event did: ``applied``, ``duplicate`` or ``recorded``; and the
    customer it concerns, if the registry knows one."""

    outcome: Literal["applied", "duplicate", "recorded"]
    customer: CustomerRow | None


@dataclass(frozen=True, slots=True)
class ClosedCustomer:
    """A customer whose grace passed: its open grains were frozen to be sent now."""

    customer_id: int
    grains: int


class CustomerRefused(Exception):
    """A record refused for its customer: ended, or under a second form."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- statements ----------------------------------------------------------------

_COLUMNS = (
    "c.id, c.customer_identifier, c.customer_aws_account_id, c.license_arn, c.product_code, "
    "c.agreement_id, c.status, c.ending_at, c.grace_ends_at, c.ended_at, c.closed_at, "
    "c.created_at, c.updated_at"
)
_INSERT_CUSTOMER = (
    "INSERT INTO customers (customer_identifier, customer_aws_account_id, license_arn, "
    "license_id, product_code, agreement_id, status, ending_at, grace_ends_at, ended_at, "
    "closed_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "RETURNING id"
)
_UPDATE_CUSTOMER = (
    "UPDATE customers SET customer_identifier = ?, customer_aws_account_id = ?, "
    "license_arn = ?, license_id = ?, product_code = ?, agreement_id = ?, status = ?, "
    "ending_at = ?, grace_ends_at = ?, ended_at = ?, closed_at = ?, updated_at = ? WHERE id = ?"
)
# The event's id first, alone: a second delivery (from any replica) inserts nothing.
_INSERT_EVENT = (
    "INSERT INTO customer_events (event_id, customer_id, source, type, kind, time, "
    "applied_at, outcome, customer_identifier, customer_aws_account_id, license_arn, "
    "product_code, agreement_id) VALUES (?, NULL, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_SET_EVENT = "UPDATE customer_events SET customer_id = ?, outcome = ? WHERE event_id = ?"
_EVENT_CUSTOMER = "SELECT customer_id FROM customer_events WHERE event_id = ?"
_EVENTS_OF = (
    "SELECT event_id, type, kind, time, applied_at, outcome FROM customer_events "
    "WHERE customer_id = ? ORDER BY id DESC LIMIT ?"
)
# Customers whose grace has passed and whose open grains are still to be frozen.
_DUE_TO_CLOSE = (
    f"SELECT {_COLUMNS} FROM customers c WHERE c.closed_at IS NULL AND c.grace_ends_at <= ? "
    f"ORDER BY c.grace_ends_at, c.id LIMIT {_CLOSE_BATCH}"
)
_ANY_FINAL_HOUR_OVER = (
    "SELECT c.id FROM customers c WHERE c.status = 'ending' AND c.ending_at <= ? LIMIT 1"
)
_FINAL_HOUR_OVER = (
    "UPDATE customers SET status = 'ended', ended_at = ending_at + 3600, updated_at = ? "
    "WHERE status = 'ending' AND ending_at <= ?"
)
_CLOSE = "UPDATE customers SET closed_at = ?, updated_at = ? WHERE id = ?"
# A customer's open grains under one customer id form: the partial index
# grains_open_customer holds open grains only.
_OPEN_GRAINS_OF = (
    f"SELECT {GRAIN_COLUMNS} FROM grains g WHERE g.status = 'open' "
    "AND g.customer_aws_account_id = ? AND g.customer_identifier = ? ORDER BY g.id"
)
# Kept by triggers as customers change (migrations: SQLite 6, PostgreSQL 5): three rows,
# however many customers the registry has known.
COUNTS = "SELECT status, count FROM customer_counts"
NEXT_CLOSE = "SELECT MIN(grace_ends_at) FROM customers WHERE closed_at IS NULL"


def customer_from_row(row: Row) -> CustomerRow:
    """A row selected with ``_COLUMNS`` as a ``CustomerRow``."""
    return CustomerRow(
        id=int(row[0]),
        identity=Identity(
            customer_identifier=row[1],
            customer_aws_account_id=row[2],
            license_arn=row[3],
            product_code=row[4],
            agreement_id=row[5],
        ),
        status=row[6],
        ending_at=optional_time(row[7]),
        grace_ends_at=optional_time(row[8]),
        ended_at=optional_time(row[9]),
        closed_at=optional_time(row[10]),
        created_at=_dt(row[11]),
        updated_at=_dt(row[12]),
    )


def _customer_values(row: CustomerRow) -> tuple[object, ...]:
    i = row.identity
    return (
        i.customer_identifier,
        i.customer_aws_account_id,
        i.license_arn,
        i.license_id,
        i.product_code,
        i.agreement_id,
        row.status,
        _ts(row.ending_at),
        _ts(row.grace_ends_at),
        _ts(row.ended_at),
        _ts(row.closed_at),
    )


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + _BATCH_ROWS] for i in range(0, len(items), _BATCH_ROWS)]


def lookup_queries(identifiers: Iterable[str], accounts: Iterable[str]) -> list[Query]:
    """Statements selecting every customer with one of ``identifiers`` or ``accounts``:
    each one an index search (``same_subscription`` then decides which match)."""
    statements: list[Query] = []
    for column, values in (
        ("customer_identifier", identifiers),
        ("customer_aws_account_id", accounts),
    ):
        for chunk in _chunks(sorted(set(values) - {""})):
            marks = ", ".join(["?"] * len(chunk))
            statements.append(
                (f"SELECT {_COLUMNS} FROM customers c WHERE c.{column} IN ({marks})", tuple(chunk))
            )
    return statements


def list_customers_query(
    status: str | None, customer: str | None, after: int | None, limit: int
) -> Query:
    """Customers by status and either customer id form, ordered by id, after a cursor."""
    where = ""
    params: tuple[object, ...] = ()
    if status is not None:
        where += " AND c.status = ?"
        params += (status,)
    if customer is not None:
        where += " AND (c.customer_identifier = ? OR c.customer_aws_account_id = ?)"
        params += (customer, customer)
    if after is not None:
        where += " AND c.id > ?"
        params += (after,)
    return (
        f"SELECT {_COLUMNS} FROM customers c WHERE 1=1{where} ORDER BY c.id LIMIT ?",
        (*params, limit),
    )


def customer_query(customer_id: int) -> Query:
    """One customer."""
    return f"SELECT {_COLUMNS} FROM customers c WHERE c.id = ?", (customer_id,)


def events_query(customer_id: int) -> Query:
    """A customer's latest events, newest first."""
    return _EVENTS_OF, (customer_id, EVENTS_SHOWN)


def event_from_row(row: Row) -> CustomerEventRow:
    """A row of ``events_query``."""
    return CustomerEventRow(
        event_id=row[0],
        type=row[1],
        kind=row[2],
        time=optional_time(row[3]),
        applied_at=_dt(row[4]),
        outcome=row[5],
    )


def counts_from_rows(rows: list[Row]) -> dict[str, int]:
    """Customers by status, every status named (``COUNTS``' rows)."""
    counts: dict[str, int] = dict.fromkeys(STATUSES, 0)
    counts.update({str(status): int(count) for status, count in rows})
    return counts


# -- matching -------------------------------------------------------------------


class CustomerIndex:
    """The customers a call's records may concern, and the rules for their usage."""

    def __init__(self, rows: Iterable[CustomerRow]) -> None:
        self._by_identifier: dict[str, list[CustomerRow]] = {}
        self._by_account: dict[str, list[CustomerRow]] = {}
        for row in rows:
            if row.identity.customer_identifier:
                self._by_identifier.setdefault(row.identity.customer_identifier, []).append(row)
            if row.identity.customer_aws_account_id:
                self._by_account.setdefault(row.identity.customer_aws_account_id, []).append(row)
        self._matches: dict[Identity, list[CustomerRow]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_identifier or self._by_account)

    def of(self, identity: Identity) -> list[CustomerRow]:
        """The customers ``identity`` names."""
        found = self._matches.get(identity)
        if found is None:
            candidates = self._by_identifier.get(identity.customer_identifier, []) + (
                self._by_account.get(identity.customer_aws_account_id, [])
            )
            unique = {row.id: row for row in candidates}
            found = [
                row
                for _, row in sorted(unique.items())
                if same_subscription(identity, row.identity)
            ]
            self._matches[identity] = found
        return found

    def check_open(self, key: GrainKey, now: datetime) -> None:
        """Raise ``CustomerRefused`` if usage for ``key``'s customer is refused at ``now``.

        A form matching several customers (account + product, license unknown) is
        refused only when all of them are closed: usage that may belong to a
        running subscription is kept.
        """
        if key.kind != "batch" or not self:
            return
        identity = Identity.of_key(key)
        matches = self.of(identity)
        if not matches or not all(m.closed_for_usage(now) for m in matches):
            return
        customer = matches[0]
        since = customer.refused_since()
        when = f" since {format_timestamp(since)}" if since else ""
        detail = (
            f"the customer's subscription ended ({customer.status}, registry customer "
            f"{customer.id}): AWS takes no usage for it any more, so the queue refuses it"
        )
        if customer.status == "ending" and customer.ending_at is not None:
            detail += (
                f"; its final hour began at {format_timestamp(customer.ending_at)} and its "
                "remaining usage has been (or is being) sent"
            )
        raise CustomerRefused(ENDED, f"{identity.describe()}: usage refused{when}: {detail}")

    def twins(self, key: GrainKey) -> list[tuple[GrainKey, CustomerRow]]:
        """The same customer's grains of ``key``'s dimension and hour under its other
        forms (empty unless the registry ties several forms to the customer)."""
        if key.kind != "batch" or not self:
            return []
        identity = Identity.of_key(key)
        own = identity.form()
        found: dict[GrainKey, CustomerRow] = {}
        for customer in self.of(identity):
            for form in customer.forms():
                if form.form() == own:
                    continue
                twin = key._replace(
                    product_code="" if form.license_arn else form.product_code,
                    license_arn=form.license_arn,
                    customer_identifier=form.customer_identifier,
                    customer_aws_account_id=form.customer_aws_account_id,
                )
                found.setdefault(twin, customer)
        return list(found.items())


def conflict(key: GrainKey, twin: GrainKey, customer: CustomerRow) -> CustomerRefused:
    """The refusal of usage under ``key`` while the customer's ``twin`` grain exists."""
    return CustomerRefused(
        FORM_CONFLICT,
        f"{Identity.of_key(key).describe()} and {Identity.of_key(twin).describe()} are one "
        f"customer (registry customer {customer.id}), which already has usage of dimension "
        f"{key.dimension} in the hour {format_timestamp(key.hour)} under the second form: "
        "AWS would bill both records. Send this customer's usage under one form",
    )


# -- scripts ----------------------------------------------------------------------


def find(identifiers: Iterable[str], accounts: Iterable[str]) -> Script[list[CustomerRow]]:
    """Every stored customer with one of ``identifiers`` or ``accounts`` (not filtered)."""
    found: dict[int, CustomerRow] = {}
    for statement in lookup_queries(identifiers, accounts):
        for row in (yield statement):
            customer = customer_from_row(row)
            found[customer.id] = customer
    return sorted(found.values(), key=lambda c: c.id)


def intake_index(keys: Iterable[GrainKey], *, postgres: bool) -> Script[CustomerIndex]:
    """The customers a call's records name, read in the intake's transaction (PostgreSQL:
    under the registry lock, shared: no change to them commits until the intake does)."""
    # Records of one grain share one key object (app.queue.intake): the set is small.
    batch = {key for key in keys if key.kind == "batch"}
    identifiers = {key.customer_identifier for key in batch} - {""}
    accounts = {key.customer_aws_account_id for key in batch} - {""}
    if not identifiers and not accounts:
        return CustomerIndex(())
    if postgres:
        yield LOCK_SHARED
    return CustomerIndex((yield from find(identifiers, accounts)))


def _matching(identity: Identity) -> Script[list[CustomerRow]]:
    # Under the registry lock (PostgreSQL): nothing else changes customers meanwhile.
    rows = yield from find([identity.customer_identifier], [identity.customer_aws_account_id])
    return [row for row in rows if same_subscription(identity, row.identity)]


def _merge(rows: list[CustomerRow]) -> tuple[CustomerRow | None, list[int]]:
    """Several customers one identity ties together become the oldest of them: every
    identifier known, and the lifecycle of the one changed last."""
    if not rows:
        return None, []
    keeper, *others = sorted(rows, key=lambda r: r.id)
    if not others:
        return replace(keeper), []
    latest = max(rows, key=lambda r: (r.updated_at, r.id))
    identity = keeper.identity
    for other in others:
        identity = identity.merged(other.identity)
    merged = replace(
        latest,
        id=keeper.id,
        identity=identity,
        created_at=keeper.created_at,
        events=[],
    )
    return merged, [o.id for o in others]


def _write(
    before: CustomerRow | None, after: CustomerRow, dropped: list[int], now: datetime
) -> Script[CustomerRow]:
    """Store ``after`` (inserted when there was no ``before``), folding ``dropped``
    customers and their events into it."""
    if before is None:
        (row,) = yield (
            _INSERT_CUSTOMER,
            (*_customer_values(after), now.timestamp(), now.timestamp()),
        )
        return replace(after, id=int(row[0]), created_at=now, updated_at=now)
    if after == before and not dropped:
        return after
    after = replace(after, updated_at=now)
    yield (_UPDATE_CUSTOMER, (*_customer_values(after), now.timestamp(), after.id))
    if dropped:
        marks = ", ".join(["?"] * len(dropped))
        yield (
            f"UPDATE customer_events SET customer_id = ? WHERE customer_id IN ({marks})",
            (after.id, *dropped),
        )
        yield (f"DELETE FROM customers WHERE id IN ({marks})", tuple(dropped))
    return after


def _new(identity: Identity, status: CustomerStatus, now: datetime) -> CustomerRow:
    return CustomerRow(0, identity, status, None, None, None, None, now, now)


def _transition(
    current: CustomerRow | None,
    identity: Identity,
    event: SubscriptionEvent,
    now: datetime,
    grace: timedelta,
) -> CustomerRow:
    """The customer after ``event`` (see the module docstring)."""
    # An event's own time, unless it has none or claims the future.
    moment = event.time if event.time is not None and event.time <= now else now
    row = current or _new(identity, "active", now)
    row = replace(row, identity=row.identity.merged(identity))
    if event.kind is EventKind.ENDING:
        if row.status == "ended":
            return row
        ending_at = (
            min(row.ending_at, moment) if row.status == "ending" and row.ending_at else moment
        )
        grace_ends = ending_at + grace
        if row.status == "ending" and row.grace_ends_at is not None:
            # Whichever ending event came first opened the final hour.
            grace_ends = min(row.grace_ends_at, grace_ends)
        return replace(row, status="ending", ending_at=ending_at, grace_ends_at=grace_ends)
    if event.kind is EventKind.ENDED:
        ended_at = min(row.ended_at, moment) if row.ended_at else moment
        return replace(
            row,
            status="ended",
            ended_at=ended_at,
            ending_at=min(row.ending_at, moment) if row.ending_at else moment,
            # No record is taken any more: what is open goes out at once.
            grace_ends_at=min(row.grace_ends_at, moment) if row.grace_ends_at else moment,
        )
    assert event.kind is EventKind.SUBSCRIBED
    if row.status == "active":
        return row
    if event.time is not None and row.ending_at is not None and event.time < row.ending_at:
        # Older news than the ending (a late delivery): it changes nothing.
        return row
    return _reactivated(row)


def _reactivated(row: CustomerRow) -> CustomerRow:
    return replace(
        row, status="active", ending_at=None, grace_ends_at=None, ended_at=None, closed_at=None
    )


def apply_event(
    event: SubscriptionEvent, now: datetime, grace: timedelta, *, postgres: bool
) -> Script[EventOutcome]:
    """Apply ``event`` once: its id inserted in the same transaction as its effect."""
    if postgres:
        yield LOCK_EXCLUSIVE
    identity = Identity.of_event(event)
    inserted = yield (
        _INSERT_EVENT,
        (
            event.event_id,
            event.source,
            event.type,
            event.kind.value,
            _ts(event.time),
            now.timestamp(),
            identity.customer_identifier,
            identity.customer_aws_account_id,
            identity.license_arn,
            identity.product_code,
            identity.agreement_id,
        ),
    )
    if not inserted:
        (row,) = yield (_EVENT_CUSTOMER, (event.event_id,))
        customer = None
        if row[0] is not None:
            found = yield customer_query(int(row[0]))
            customer = customer_from_row(found[0]) if found else None
        return EventOutcome("duplicate", customer)
    matches = (yield from _matching(identity)) if identity.named else []
    acts = event.kind in (EventKind.ENDING, EventKind.ENDED, EventKind.SUBSCRIBED)
    if not acts or not identity.named:
        # Changes nothing: kept with the customer it names, else in the events log.
        customer = matches[0] if matches else None
        yield (_SET_EVENT, (customer.id if customer else None, "recorded", event.event_id))
        return EventOutcome("recorded", customer)
    current, dropped = _merge(matches)
    after = _transition(current, identity, event, now, grace)
    stored = yield from _write(current, after, dropped, now)
    yield (_SET_EVENT, (stored.id, "applied", event.event_id))
    return EventOutcome("applied", stored)


def record_answer(identity: Identity, now: datetime, *, postgres: bool) -> Script[CustomerRow]:
    """Register a ResolveCustomer answer: the customer is known (its forms tied
    together), and active again if its usage was closed (it came back)."""
    if postgres:
        yield LOCK_EXCLUSIVE
    matches = yield from _matching(identity)
    current, dropped = _merge(matches)
    after = current or _new(identity, "active", now)
    after = replace(after, identity=after.identity.merged(identity))
    if after.closed_for_usage(now):
        after = _reactivated(after)
    stored = yield from _write(current, after, dropped, now)
    yield (
        "INSERT INTO customer_events (event_id, customer_id, source, type, kind, time, "
        "applied_at, outcome, customer_identifier, customer_aws_account_id, license_arn, "
        "product_code, agreement_id) VALUES (?, ?, 'api', 'ResolveCustomer', 'registered', "
        "?, ?, 'applied', ?, ?, ?, ?, ?)",
        (
            f"ResolveCustomer:{uuid.uuid4()}",
            stored.id,
            now.timestamp(),
            now.timestamp(),
            identity.customer_identifier,
            identity.customer_aws_account_id,
            identity.license_arn,
            identity.product_code,
            identity.agreement_id,
        ),
    )
    return stored


def close_due(now: datetime, *, postgres: bool) -> Script[list[ClosedCustomer]]:
    """Freeze every open grain of customers whose grace has passed, and mark them closed
    (one transaction); end customers whose final hour is over."""
    due = [customer_from_row(r) for r in (yield (_DUE_TO_CLOSE, (now.timestamp(),)))]
    final_over = now - HOUR
    over = yield (_ANY_FINAL_HOUR_OVER, (final_over.timestamp(),))
    if not due and not over:
        return []
    if postgres:
        yield LOCK_EXCLUSIVE
        # Again under the lock: a customer may have come back meanwhile, or another
        # replica closed it.
        due = [customer_from_row(r) for r in (yield (_DUE_TO_CLOSE, (now.timestamp(),)))]
    closed: list[ClosedCustomer] = []
    lock = " FOR UPDATE OF g" if postgres else ""
    for customer in due:
        grains: list[GrainRow] = []
        i = customer.identity
        for account, identifier in (
            (i.customer_aws_account_id, ""),
            ("", i.customer_identifier),
        ):
            if not (account or identifier):
                continue
            for row in (yield (_OPEN_GRAINS_OF + lock, (account, identifier))):
                grain = grain_from_row(row)
                if same_subscription(Identity.of_key(grain.key), i):
                    grains.append(grain)
        for grain in grains:
            payload = frozen_payload(grain.key, grain.content, str(uuid.uuid4()))
            yield (queries.FREEZE, (payload, now.timestamp(), now.timestamp(), grain.id))
        yield (_CLOSE, (now.timestamp(), now.timestamp(), customer.id))
        closed.append(ClosedCustomer(customer.id, len(grains)))
    if over:
        yield (_FINAL_HOUR_OVER, (now.timestamp(), final_over.timestamp()))
    return closed


def batch_refusals(
    keys: list[GrainKey], now: datetime
) -> Script[list[tuple[int, CustomerRefused]]]:
    """Why records sent straight to AWS (BatchMeterUsage, as grain keys) must not go:
    (index, refusal) for a closed customer, or a form other than one already queued or
    earlier in the call for the same customer, dimension and hour. Reads only."""
    index = yield from intake_index(keys, postgres=False)
    if not index:
        return []
    twins = {i: index.twins(key) for i, key in enumerate(keys)}
    wanted = sorted({twin for pairs in twins.values() for twin, _ in pairs})
    queued: set[GrainKey] = set()
    for statement in queries.grains_for_keys(wanted):
        queued.update(queries.grain_key_of(row) for row in (yield statement))
    refusals: list[tuple[int, CustomerRefused]] = []
    in_call: set[GrainKey] = set()
    for i, key in enumerate(keys):
        try:
            index.check_open(key, now)
            for twin, customer in twins[i]:
                if twin in queued or twin in in_call:
                    raise conflict(key, twin, customer)
        except CustomerRefused as refused:
            refusals.append((i, refused))
            continue
        in_call.add(key)
    return refusals


def drive_sync(script: Script[T], execute: Callable[[str, tuple[Any, ...]], list[Row]]) -> T:
    """Run ``script`` with ``execute(sql, params) -> rows`` (a blocking connection)."""
    try:
        statement = next(script)
        while True:
            statement = script.send(execute(*statement))
    except StopIteration as stop:
        result: T = stop.value
        return result
