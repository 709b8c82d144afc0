"""One call's intake, planned in memory: where each record goes and what to write.

Both stores add a ``POST /v1/usage-records`` call the same way, and this module
is that way, free of I/O:

1. The store hands over the rows of the grains the call names (``missing``,
   ``provide``; a frozen grain's usage rolls forward, so the next hour's row
   may be asked for in turn) and the call's IdempotencyKeys seen before.
2. ``place`` walks the records in order: a replayed key answers with its
   record, a record that would break AWS's limits fails alone, so does one
   whose customer the registry has closed, or that would open a second grain
   for the same customer, dimension and hour under another form of the
   customer (``app.queue.registry``: the twins of its grain are read with the
   grains); every other record is added to its grain's running sum
   (``GrainSum``), each grain read once however many records it gets.
3. The store writes the plan: new grains, each changed grain once, the records
   and the keys in one batch each; then ``outcomes`` says where each went.

Both stores also take the calls that wait together in one transaction (group
commit) as one plan (``place_calls``): each grain the group touches is read and
written once, and an all-or-nothing call with a failure is left out whole while
the others are placed again without it.

The cost of a call grows with its records and their tag sets, not with what
the grains already hold (beyond reading each grain once).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, NamedTuple

from app.metering.grains import (
    GrainKey,
    GrainLimitExceeded,
    GrainSum,
    content_from_json,
    content_to_json,
)
from app.queue import queries
from app.queue.registry import CustomerIndex, CustomerRefused, conflict
from app.queue.store import (
    GrainPolicy,
    IdempotencyConflict,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    replayed,
)

# A grain's row as the plan needs it: (id, status, content as stored).
GrainRowData = tuple[int, str, str]


@dataclass
class PlannedGrain:
    """A grain the call adds to; ``id`` is None until the store inserts it."""

    key: GrainKey
    id: int | None
    total: GrainSum
    created_at: datetime | None = None
    changed: bool = False

    @property
    def existed(self) -> bool:
        """Whether the grain had a row before this call (else the call inserts it)."""
        return self._existed

    def __post_init__(self) -> None:
        self._existed = self.id is not None


class _Added(NamedTuple):
    intake: Intake
    grain: PlannedGrain
    replay: bool = False

    def receipt(self) -> Receipt:
        grain = self.grain
        assert grain.id is not None
        rolled = grain.key != self.intake.usage.key
        return Receipt(self.intake.record_id, grain.id, grain.key.hour, rolled, self.replay, "open")


class IntakePlan:
    """See the module docstring."""

    def __init__(
        self,
        intakes: Sequence[Intake],
        policy: GrainPolicy,
        customers: CustomerIndex | None = None,
    ) -> None:
        self._intakes = intakes
        self._policy = policy
        # The registry's customers the records name, read in the same transaction;
        # none (the common case): no per-record check at all.
        self._customers = customers or CustomerIndex(())
        self._known = bool(self._customers)
        # Rows fetched so far; None: no such grain yet.
        self._rows: dict[GrainKey, GrainRowData | None] = {}
        self._grains: dict[GrainKey, PlannedGrain] = {}
        self._placed: list[_Added | Receipt | IntakeFailure] = []
        self._receipts: list[tuple[_Added, Receipt]] | None = None

    # -- 1. what the store must read -------------------------------------

    def keys(self) -> list[str]:
        """The call's IdempotencyKeys, to look up before ``place``."""
        return [i.idempotency_key for i in self._intakes if i.idempotency_key is not None]

    def missing(self) -> list[GrainKey]:
        """Grain keys whose rows are needed and not provided yet (none: ready to place):
        where each record's usage goes, and that grain's twins under its customer's
        other forms."""
        needed: dict[GrainKey, None] = {}
        for intake in self._intakes:
            key = intake.usage.key
            while key in self._rows:
                row = self._rows[key]
                if row is None or row[1] == "open":
                    if self._known:
                        needed.update(
                            (twin, None)
                            for twin, _ in self._customers.twins(key)
                            if twin not in self._rows
                        )
                    break
                key = key.next_hour()
            else:
                needed[key] = None
        return list(needed)

    def first_keys(self) -> list[GrainKey]:
        """The records' own grains and their twins: what a store locks first."""
        keys = {intake.usage.key: None for intake in self._intakes}
        if self._known:
            for key in list(keys):
                keys.update((twin, None) for twin, _ in self._customers.twins(key))
        return list(keys)

    def provide(self, rows: dict[GrainKey, GrainRowData | None]) -> None:
        """The rows of keys ``missing`` named (``None`` where there is no grain)."""
        self._rows.update(rows)

    # -- 2. placing ------------------------------------------------------

    def place(self, stored_keys: dict[str, tuple[Any, ...]]) -> list[IntakeFailure]:
        """Place every record in order; ``stored_keys`` maps the call's keys seen before
        to their ``SEEN_KEY`` rows. Returns the records that could not be placed."""
        in_call: dict[str, _Added] = {}
        for index, intake in enumerate(self._intakes):
            try:
                self._placed.append(self._place(intake, stored_keys, in_call))
            except IdempotencyConflict as exc:
                self._placed.append(IntakeFailure(index, str(exc), conflict=True))
            except GrainLimitExceeded as exc:
                self._placed.append(IntakeFailure(index, str(exc)))
            except CustomerRefused as exc:
                self._placed.append(IntakeFailure(index, exc.message, reason=exc.reason))
        return [p for p in self._placed if isinstance(p, IntakeFailure)]

    def _place(
        self,
        intake: Intake,
        stored_keys: dict[str, tuple[Any, ...]],
        in_call: dict[str, _Added],
    ) -> _Added | Receipt:
        key = intake.idempotency_key
        if key is not None and key in stored_keys:
            return replayed(stored_keys[key], intake)
        if key is not None and key in in_call:
            first = in_call[key]
            if first.intake.content_hash != intake.content_hash:
                raise IdempotencyConflict(key, first.intake.record_id)
            return _Added(first.intake, first.grain, replay=True)
        # A replay is answered as before; new usage of a closed customer is refused,
        # never rolled forward into an hour that will not be sent.
        if self._known:
            self._customers.check_open(intake.usage.key, intake.received_at)
        grain = self._grain(intake.usage.key)
        if self._known:
            for twin, customer in self._customers.twins(grain.key):
                planned = self._grains.get(twin)
                if self._rows.get(twin) is not None or (planned is not None and planned.changed):
                    raise conflict(grain.key, twin, customer)
        grain.total.add(intake.usage)
        grain.changed = True
        grain.created_at = grain.created_at or intake.received_at
        added = _Added(intake, grain)
        if key is not None:
            in_call[key] = added
        return added

    def _grain(self, initial: GrainKey) -> PlannedGrain:
        key = initial
        while True:
            row = self._rows[key]
            if row is None or row[1] == "open":
                break
            # This grain has gone (or may have gone) to AWS: its content is
            # frozen. The usage counts in the next hour instead.
            key = key.next_hour()
        grain = self._grains.get(key)
        if grain is None:
            content = content_from_json(row[2]) if row else None
            grain = PlannedGrain(key, row[0] if row else None, GrainSum(key, content))
            self._grains[key] = grain
        return grain

    # -- 3. what the store must write ------------------------------------

    def new_grains(self) -> list[tuple[PlannedGrain, tuple[object, ...]]]:
        """Grains to insert, with ``INSERT_GRAIN``'s values; set each one's ``id``."""
        rows: list[tuple[PlannedGrain, tuple[object, ...]]] = []
        for grain in self._grains.values():
            if not grain.existed and grain.changed:
                content = grain.total.content()
                assert grain.created_at is not None
                rows.append(
                    (
                        grain,
                        (
                            *queries.key_params(grain.key),
                            content_to_json(content),
                            self._policy.due_at(grain.key).timestamp(),
                            self._policy.deadline(grain.key, content).timestamp(),
                            grain.created_at.timestamp(),
                        ),
                    )
                )
        return rows

    def grain_updates(self) -> list[tuple[object, ...]]:
        """``UPDATE_GRAIN``'s values for every existing grain the call changed."""
        updates: list[tuple[object, ...]] = []
        for grain in self._grains.values():
            if grain.existed and grain.changed:
                content = grain.total.content()
                deadline = self._policy.deadline(grain.key, content).timestamp()
                updates.append((content_to_json(content), deadline, grain.id))
        return updates

    def record_rows(self) -> list[tuple[object, ...]]:
        """``INSERT_RECORD``'s values for every new record (after the grain inserts)."""
        return [
            queries.record_params(a.intake, receipt.grain_id, receipt.rolled_forward)
            for a, receipt in self._new_records()
        ]

    def key_rows(self) -> list[tuple[object, ...]]:
        """``INSERT_KEY``'s values for every new record that carries a key."""
        return [
            queries.idempotency_key_params(
                a.intake, receipt.grain_id, receipt.hour, receipt.rolled_forward
            )
            for a, receipt in self._new_records()
            if a.intake.idempotency_key is not None
        ]

    def _new_records(self) -> list[tuple[_Added, Receipt]]:
        # Built once, after the new grains have their ids.
        if self._receipts is None:
            self._receipts = [
                (p, p.receipt()) for p in self._placed if isinstance(p, _Added) and not p.replay
            ]
        return self._receipts

    def outcomes(self) -> list[Receipt | IntakeFailure]:
        """Where each record went, in the call's order (after the writes)."""
        receipts = {id(added): receipt for added, receipt in self._new_records()}
        return [
            (receipts.get(id(p)) or p.receipt()) if isinstance(p, _Added) else p
            for p in self._placed
        ]

    def touched(self) -> int:
        """Buckets the call's records updated: its per-record work, for the tests."""
        return sum(grain.total.touched for grain in self._grains.values())


# -- a group of calls -----------------------------------------------------------------

# What a call of a group comes to: where each of its records went, or, for an
# all-or-nothing call with a failure, its refusal (nothing of it written).
CallOutcome = list[Receipt | IntakeFailure] | IntakeRefused


@dataclass
class GroupPlacement:
    """The plan of a group's calls, once every all-or-nothing call with a failure was left
    out: ``offsets`` says where each placed call's records begin in it."""

    plan: IntakePlan
    offsets: dict[int, int]
    refused: dict[int, IntakeRefused] = field(default_factory=dict)

    def outcome(
        self, call: int, records: int, outcomes: Sequence[Receipt | IntakeFailure]
    ) -> CallOutcome | None:
        """Call ``call``'s outcome (``records`` records) from the plan's ``outcomes`` (after
        the writes), its failures indexed within the call; None for a call not placed."""
        if call in self.refused:
            return self.refused[call]
        if call not in self.offsets:
            return None
        start = self.offsets[call]
        return [
            replace(o, index=o.index - start) if isinstance(o, IntakeFailure) else o
            for o in outcomes[start : start + records]
        ]


def place_calls(
    calls: Sequence[tuple[Sequence[Intake], bool]],
    live: Sequence[int],
    policy: GrainPolicy,
    customers: CustomerIndex | None,
) -> Generator[IntakePlan, dict[str, tuple[Any, ...]], GroupPlacement]:
    """Place the ``live`` ones of ``calls`` ((intakes, all or nothing) each) in one plan,
    in order. Yields each plan to the store, which provides its rows (``missing``,
    ``provide``) and sends back the IdempotencyKeys seen before (``SEEN_KEY`` rows by
    key); returns the placement. A call's records are placed as if it ran alone after
    the calls before it: a key repeated by a later call is its replay (or its conflict),
    as it is once the first has committed. Every outcome is decided here, in memory,
    before anything is written, so a call's refusal never touches another call: an
    all-or-nothing call with a failure is left out whole (``IntakeRefused``) and the
    others placed again without its records (which may have been the first of a key,
    or added to a grain they share)."""
    remaining = list(live)
    refused: dict[int, IntakeRefused] = {}
    while True:
        offsets: dict[int, int] = {}
        intakes: list[Intake] = []
        for n in remaining:
            offsets[n] = len(intakes)
            intakes += calls[n][0]
        plan = IntakePlan(intakes, policy, customers)
        seen = yield plan
        failures = plan.place(seen)
        out: dict[int, list[IntakeFailure]] = {}
        for failure in failures:
            n = _call_of(failure.index, remaining, offsets, calls)
            if calls[n][1]:
                out.setdefault(n, []).append(replace(failure, index=failure.index - offsets[n]))
        if not out:
            return GroupPlacement(plan, offsets, refused)
        refused.update((n, IntakeRefused(own)) for n, own in out.items())
        remaining = [n for n in remaining if n not in out]


def _call_of(
    index: int,
    remaining: Sequence[int],
    offsets: dict[int, int],
    calls: Sequence[tuple[Sequence[Intake], bool]],
) -> int:
    """The call whose records hold the plan's record ``index``."""
    for n in remaining:
        if offsets[n] <= index < offsets[n] + len(calls[n][0]):
            return n
    raise AssertionError(f"record {index} belongs to no call of the group")
