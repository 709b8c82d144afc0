"""What the replicas of a fleet on one shared store share beside the usage: the account's
request quota, the clock, and the rules that shape grains.

- **The account's request quota** (``FleetQuota``). AWS's quotas are per account
  and region, so with a shared store ``METERING_QUOTA_*`` are the account's
  figures and every replica takes its slots from one budget kept in the store:
  one row per action holding the theoretical arrival time of its next request
  (the generic cell rate algorithm), moved on atomically by one statement
  (``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``) on the database's clock.
  A slot costs one round trip, in autocommit, with ``synchronous_commit`` off for
  it (a slot lost in a crash of the database is harmless, and waiting for the
  WAL to reach the disk, or a standby, would cost more than the slot). Slots
  fall on a grid of the interval, offset by half of it, with no burst: N
  replicas together send at most the quota in every second of the database's
  clock, and a request that reaches AWS a little late (up to half an interval)
  still lands in its own second.
- **The clock** (``FleetClock``). What is due, what expired, how long a claim
  is valid and when a leaving customer's grace ends are decided by every
  replica on the same clock, the database's: each replica measures its offset
  from it (one statement, every ``CLOCK_REFRESH`` seconds, checking in as a
  member of the fleet at the same time) and corrects its own clock by it. A
  replica ahead by more than the grace would otherwise send the current hour
  early, expire grains early and keep its own claims valid longer. The skew is
  reported (``/readyz``, ``metering_clock_skew_seconds``), never fatal.
- **One set of grain rules** (``FLEET_SETTINGS``). The settings that decide which
  grain a record lands in, when a grain is due, until when it is kept, and
  whether it is billed at all are written to the store by the first replica
  (under the migration lock); a replica whose settings differ refuses to start,
  naming each difference. That is a configuration error, not an outage, so
  refusing is right: a replica that went on would split grains, send hours
  early or late, or prune what another replica still protects. They are
  changed for the whole fleet with ``python -m app fleet-settings --write``
  (``main_fleet_settings``; docs/shared-store.md).

With SQLite none of this applies: one sidecar owns the queue, and its figures,
clock and settings are its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from app.metering.billing import utc_now
from app.metering.shapes import format_timestamp
from app.queue.store import StoreUnavailable
from app.runtime.metrics import Metrics

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger("app.queue.fleet")
T = TypeVar("T")

# The settings that must be the same on every replica of a fleet, and why. A
# replica of a newer version that knows a setting the store has not seen adds it;
# one of an older version ignores what it does not know.
FLEET_SETTINGS: dict[str, str] = {
    "mode": "a sandbox replica would settle the fleet's grains without sending them",
    "queue_mode": "which action sends a grain, and what a grain is",
    "product_code": "the product of a record that names none: its grain",
    "queue_grace": "when an hour's grains fall due",
    "batch_window_hours": "every BatchMeterUsage grain's deadline (recomputed at each start)",
    "meter_window_hours": "every MeterUsage grain's deadline (recomputed at each start)",
    "queue_expiry_margin": "which late usage is still taken",
    "future_tolerance": "which usage stamped ahead is taken, and how long grains are kept",
    "customer_end_grace": "when a leaving customer's last usage is sent",
    "queue_retention_hours": "how long settled grains are kept, for every replica",
    "queue_idempotency_hours": "how long an IdempotencyKey protects, for every replica",
}
# Seconds between measurements of the database's clock (and check-ins).
CLOCK_REFRESH = 30.0
# Seconds between tries while the clock was never measured.
FIRST_MEASURE_RETRY = 5.0
# A measurement whose round trip took longer says little about the offset: kept out.
CLOCK_MAX_ROUND_TRIP = 1.0
# A replica is counted as a member of the fleet this long after it last checked in.
MEMBER_WINDOW = 3 * CLOCK_REFRESH
# Skew past this is a problem of its own (AWS refuses requests signed 5 minutes off),
# though the fleet's decisions do not depend on it.
SKEW_WARNING = 300.0
# Before the fleet was ever counted, a replica that cannot reach the quota's budget
# keeps to the account's quota divided by this.
DEFAULT_FALLBACK_DIVISOR = 4.0


class FleetSettingsConflict(StoreUnavailable):
    """This replica's settings that shape grains differ from the fleet's in the shared
    store: a configuration error, which refuses the start (never retried as an outage)."""


class FleetStore(Protocol):
    """What the fleet needs from the shared store (``PostgresStore.run_fleet``)."""

    owner: str

    async def run_fleet(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work``'s statements on a pooled connection, in autocommit."""
        ...


# -- the grain rules ---------------------------------------------------------------


def fleet_values(settings: Settings) -> dict[str, str]:
    """``FLEET_SETTINGS`` of ``settings`` as stored: JSON text of each value."""
    return {name: json.dumps(getattr(settings, name)) for name in FLEET_SETTINGS}


def _env_name(name: str) -> str:
    return f"METERING_{name.upper()}"


def _same(ours: str, theirs: str) -> bool:
    # 300 and 300.0 are one value; JSON text compares them unequal.
    try:
        return bool(json.loads(ours) == json.loads(theirs))
    except ValueError:
        return ours == theirs


@dataclass(frozen=True, slots=True)
class StoredSetting:
    """One of the fleet's settings as the store holds it."""

    value: str
    written_at: datetime
    written_by: str


async def read_settings(conn: Any) -> dict[str, StoredSetting]:
    """The fleet's settings, by name."""
    cursor = await conn.execute("SELECT name, value, written_at, written_by FROM fleet_settings")
    return {
        str(name): StoredSetting(str(value), datetime.fromtimestamp(at, UTC), str(by))
        for name, value, at, by in await cursor.fetchall()
    }


def differences(ours: Mapping[str, str], fleet: Mapping[str, StoredSetting]) -> list[str]:
    """Each setting where ``ours`` differs from the fleet's: "METERING_X is a here, b in the
    fleet"."""
    return [
        f"{_env_name(name)} is {json.loads(value)!r} here, {json.loads(fleet[name].value)!r} in "
        "the fleet"
        for name, value in ours.items()
        if name in fleet and not _same(value, fleet[name].value)
    ]


async def settle_settings(conn: Any, ours: Mapping[str, str], owner: str) -> None:
    """Make ``ours`` the fleet's settings if the store has none yet (the first replica,
    or a setting new to the store); raise ``FleetSettingsConflict`` naming every setting
    where they differ from the fleet's. Run under the migration lock, so replicas
    starting together agree on who was first."""
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO fleet_settings (name, value, written_at, written_by) "
            "VALUES (%s, %s, EXTRACT(EPOCH FROM clock_timestamp()), %s) "
            "ON CONFLICT (name) DO NOTHING",
            [(name, value, owner) for name, value in ours.items()],
        )
    fleet = await read_settings(conn)
    found = differences(ours, fleet)
    if found:
        first = min(fleet.values(), key=lambda s: s.written_at)
        # A configuration error, not an outage: the replica refuses to start rather than
        # shape grains its own way beside the others.
        raise FleetSettingsConflict(
            "this replica's settings differ from the fleet's, kept in the shared store since "
            f"{format_timestamp(first.written_at)} (first written by {first.written_by}): "
            + "; ".join(found)
            + ". Every replica must shape grains and deadlines alike: run this one with the "
            "fleet's values, or change them for the whole fleet with "
            "'python -m app fleet-settings --write' (docs/shared-store.md)"
        )


async def write_settings(conn: Any, ours: Mapping[str, str], owner: str) -> None:
    """Make ``ours`` the fleet's settings, whatever they were."""
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO fleet_settings (name, value, written_at, written_by) "
            "VALUES (%s, %s, EXTRACT(EPOCH FROM clock_timestamp()), %s) "
            "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, "
            "written_at = EXCLUDED.written_at, written_by = EXCLUDED.written_by",
            [(name, value, owner) for name, value in ours.items()],
        )


# -- the account's request quota ---------------------------------------------------

# The next slot of an action: at its row's theoretical arrival time, or at the next
# point of the grid (multiples of the interval, offset by half of it) if that is later;
# taken (the row moved on by one interval) only if it comes within max_wait. One
# statement, on the database's clock; a row is made on first use. synchronous_commit
# is off for it alone: set_config's third argument scopes it to this statement's
# transaction, and the CTE is referenced so that it runs.
_SLOT = """
WITH quiet AS (SELECT set_config('synchronous_commit', 'off', true))
INSERT INTO fleet_quota AS q (action, tat)
SELECT %(action)s,
       CEIL((EXTRACT(EPOCH FROM statement_timestamp())::float8 - %(half)s) / %(interval)s)
         * %(interval)s + %(half)s + %(interval)s
FROM quiet
ON CONFLICT (action) DO UPDATE
   SET tat = GREATEST(q.tat, EXCLUDED.tat - %(interval)s) + %(interval)s
   WHERE GREATEST(q.tat, EXCLUDED.tat - %(interval)s)
         - EXTRACT(EPOCH FROM statement_timestamp())::float8 <= %(max_wait)s
RETURNING q.tat - %(interval)s - EXTRACT(EPOCH FROM statement_timestamp())::float8
"""
_NEXT_FREE = (
    "SELECT tat - EXTRACT(EPOCH FROM statement_timestamp())::float8 FROM fleet_quota "
    "WHERE action = %s"
)


async def reserve_slot(
    conn: Any, action: str, interval: float, max_wait: float
) -> tuple[bool, float]:
    """``(True, seconds to wait)`` for ``action``'s next slot, taken; or ``(False, seconds
    until one is free)``, nothing taken, if it comes later than ``max_wait``."""
    params = {
        "action": action,
        "interval": interval,
        "half": interval / 2,
        "max_wait": max_wait,
    }
    cursor = await conn.execute(_SLOT, params)
    row = await cursor.fetchone()
    if row is not None:
        return True, max(0.0, float(row[0]))
    cursor = await conn.execute(_NEXT_FREE, (action,))
    row = await cursor.fetchone()
    return False, max(0.0, float(row[0])) if row is not None else interval


class FleetQuota:
    """The account's request quota, kept in the shared store for every replica
    (``app.aws.quota.SharedBudget``)."""

    def __init__(self, store: FleetStore, *, divisor: float = 0.0) -> None:
        self._store = store
        # METERING_QUOTA_FALLBACK_DIVISOR; 0: from the members the store counted.
        self._divisor = divisor
        self.members: int | None = None

    async def reserve(self, action: str, rate: float, max_wait: float) -> tuple[bool, float]:
        """``action``'s next slot of the fleet's ``rate`` per second (see ``reserve_slot``)."""
        interval = 1.0 / rate
        return await self._store.run_fleet(
            lambda conn: reserve_slot(conn, action, interval, max_wait)
        )

    def fallback_divisor(self) -> float:
        """The setting, or the replicas the store last counted plus one (one starting
        meanwhile, a rolling update's surge), at least 2; 4 before any count."""
        if self._divisor > 0:
            return self._divisor
        if self.members is None:
            return DEFAULT_FALLBACK_DIVISOR
        return float(max(2, self.members + 1))


# -- the clock ---------------------------------------------------------------------

# This replica checks in (its last skew with it) and reads the database's clock and
# how many replicas checked in lately, in one statement; members not seen for a day
# are forgotten.
_CHECK_IN = """
WITH gone AS (
    DELETE FROM fleet_members
    WHERE seen_at < EXTRACT(EPOCH FROM clock_timestamp())::float8 - 86400),
me AS (
    INSERT INTO fleet_members AS m (owner, seen_at, skew)
    VALUES (%(owner)s, EXTRACT(EPOCH FROM clock_timestamp())::float8, %(skew)s)
    ON CONFLICT (owner) DO UPDATE SET seen_at = EXCLUDED.seen_at, skew = EXCLUDED.skew
    RETURNING m.seen_at)
SELECT me.seen_at,
       1 + (SELECT COUNT(*) FROM fleet_members
            WHERE owner <> %(owner)s AND seen_at > me.seen_at - %(window)s)
FROM me
"""


async def check_in(conn: Any, owner: str, skew: float | None) -> tuple[datetime, int]:
    """The database's clock now, and how many replicas (this one included) checked in
    within ``MEMBER_WINDOW``."""
    cursor = await conn.execute(_CHECK_IN, {"owner": owner, "skew": skew, "window": MEMBER_WINDOW})
    row = await cursor.fetchone()
    assert row is not None
    return datetime.fromtimestamp(float(row[0]), UTC), int(row[1])


class FleetClock:
    """The fleet's clock: this replica's, corrected by its offset from the database's.

    Called like the clock it wraps (``clock()``); ``measure`` updates the offset
    from one reading of the reference (the database's clock), taken halfway
    through its round trip. Until the first measurement, and while the reference
    cannot be read, the last offset stands (0 at first).
    """

    def __init__(self, local: Callable[[], datetime], metrics: Metrics | None = None) -> None:
        self._local = local
        self._metrics = metrics
        self.offset = timedelta(0)
        self.measured_at: datetime | None = None
        self.round_trip: float | None = None

    def __call__(self) -> datetime:
        return self._local() + self.offset

    @property
    def skew(self) -> float | None:
        """Seconds this replica's clock is ahead of the database's (behind: negative)."""
        return None if self.measured_at is None else -self.offset.total_seconds()

    async def measure(self, reference: Callable[[], Awaitable[datetime]]) -> None:
        """Read ``reference`` once and take the offset from it, unless its round trip was
        too long to say much."""
        before = self._local()
        database = await reference()
        after = self._local()
        round_trip = (after - before).total_seconds()
        if round_trip > CLOCK_MAX_ROUND_TRIP:
            log.info(
                "the database's clock was read too slowly to measure the skew; the last "
                "offset stands",
                extra={"round_trip": round(round_trip, 3)},
            )
            return
        changed = self.measured_at is None
        self.offset = database - (before + (after - before) / 2)
        self.measured_at = after
        self.round_trip = round_trip
        skew = -self.offset.total_seconds()
        if self._metrics is not None:
            self._metrics.clock_skew.set(skew)
        if changed and abs(skew) > 1.0:
            log.warning(
                "this replica's clock differs from the database's: the fleet's hours, "
                "deadlines and leases follow the database's clock",
                extra={"skew_seconds": round(skew, 3)},
            )

    def status(self) -> tuple[bool, str]:
        """(the skew is harmless, detail) for ``/readyz``: never blocking."""
        skew = self.skew
        if skew is None:
            return True, (
                "not measured yet: the fleet's time is this replica's until the shared store "
                "answers"
            )
        assert self.measured_at is not None
        side = "ahead of" if skew >= 0 else "behind"
        detail = (
            f"this replica's clock is {abs(skew):.3f} s {side} the shared store's (measured "
            f"{format_timestamp(self.measured_at)}); hours, deadlines and leases follow the "
            "store's clock"
        )
        if abs(skew) > SKEW_WARNING:
            return False, (
                detail + f"; more than {SKEW_WARNING:g} s: AWS refuses requests signed that "
                "far off (fix the node's time synchronisation)"
            )
        return True, detail


class Fleet:
    """The fleet's shared state for one replica: its clock, its quota, the loop that keeps
    the clock measured (and the replica counted)."""

    def __init__(
        self,
        store: FleetStore,
        local: Callable[[], datetime] = utc_now,
        *,
        metrics: Metrics | None = None,
        quota_divisor: float = 0.0,
    ) -> None:
        self.store = store
        self.clock = FleetClock(local, metrics)
        self.quota = FleetQuota(store, divisor=quota_divisor)
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def measure(self) -> None:
        """Measure the clock and check in once; raises ``StoreUnavailable``."""
        owner, skew = self.store.owner, self.clock.skew
        members: list[int] = []

        async def reference() -> datetime:
            database, count = await self.store.run_fleet(lambda conn: check_in(conn, owner, skew))
            members.append(count)
            return database

        await self.clock.measure(reference)
        self.quota.members = members[0]

    async def measure_quietly(self) -> None:
        """``measure``, a failure logged (once per outage) rather than raised."""
        try:
            await self.measure()
        except StoreUnavailable as exc:
            if not self._failing:
                log.warning(
                    "cannot read the database's clock; the last offset stands",
                    extra={"error": str(exc)},
                )
            self._failing = True
        else:
            self._failing = False

    async def run(self, interval: float = CLOCK_REFRESH) -> None:
        """Measure every ``interval`` seconds, for as long as the sidecar runs."""
        while True:
            # Until the first measurement (the store did not answer at start), sooner.
            first = self.clock.measured_at is None
            await asyncio.sleep(min(interval, FIRST_MEASURE_RETRY) if first else interval)
            await self.measure_quietly()
