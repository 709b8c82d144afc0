"""Sending due grains, once each, and recording what AWS made of them.

Each cycle: freeze every open grain of customers whose grace after an ending
event has passed (their final usage, the current partial hour included, goes
out at once: ``app.queue.registry``), freeze the grains that fell due (their
payload is built once and never changes), expire those AWS would no longer
take, send the rest, and record the outcomes. The next cycle comes when a grain
falls due, an attempt is due or a leaving customer's grace ends, whichever is
first, and at least every poll interval. A crash anywhere loses nothing: frozen grains are sent
again after a restart, byte for byte, and AWS answers an identical record
with the same MeteringRecordId instead of billing it twice.

SaaS mode (BatchMeterUsage) groups grains by product (ProductCode, or
LicenseArn for Concurrent Agreements), 25 and under 1 MB per call, oldest
first. A call AWS refuses as a whole is bisected until the record at fault
stands alone, so the good ones still go out. On SIGTERM it sends nothing
new: the hour is not over, and whoever meters the rest of it (the next pod,
another replica) would send the same grain, which AWS would refuse as a
DuplicateRecord after taking the partial one.

Container mode (MeterUsage) sends one call per grain with the grain's own
ClientToken, and on SIGTERM also sends the current, partial hour: the pod is
ending and nothing more will be metered from it. There is no later for it, so it
is sent in rounds, paced by the retry policy, until it is taken or the shutdown
deadline comes; what is still unsent then is named, with its quantity, at error
level.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from app.actions.backend import MeteringBackend
from app.config import QueueMode
from app.metering.billing import (
    HOUR,
    SubmissionWindows,
    decimal_text,
    late_usage_horizon,
    utc_now,
)
from app.metering.errors import Fault, MeteringError
from app.metering.grains import batch_grain_id_of
from app.metering.limits import BATCH_MAX_BYTES, BATCH_MAX_RECORDS
from app.queue.records import Filters
from app.queue.store import GrainRow, Outcome, StoreUnavailable, UsageStore
from app.runtime.metrics import Metrics
from app.runtime.retry import Attempts, RetryPolicy
from app.runtime.supervisor import Spawn, plain_spawn

log = logging.getLogger("app.queue")

_SENDABLE_PAGE = 500
# Seconds of a container-mode stop's budget kept for the store to close once the last
# usage was sent (at most a tenth of the budget).
_CLOSE_RESERVE = 1.0
# Seconds the loop pauses when its next wake-up is already past after a cycle.
PAST_WAKEUP_PAUSE = 1.0


@runtime_checkable
class ClaimingStore(Protocol):
    """A store whose sender claims grains for a lease (the shared store)."""

    async def extend_claims(self, grain_ids: list[int], now: datetime) -> None:
        """Keep this replica's claims on ``grain_ids`` for another lease from ``now``."""
        ...


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    """How the dispatcher paces itself."""

    mode: QueueMode
    poll_interval: float
    retention: timedelta
    key_retention: timedelta
    grace: timedelta
    # Each send's attempts, and when a grain kept for later is tried again.
    retry: RetryPolicy
    # How long after the event AWS takes usage, and how far ahead of the clock usage
    # may be stamped: a settled grain is kept while late usage of its hour may arrive.
    windows: SubmissionWindows = field(default_factory=SubmissionWindows)
    future_tolerance: timedelta = timedelta(minutes=5)

    # How long a replica's claims on the grains it sends last (a shared store).
    claim_lease: timedelta = timedelta(seconds=30)

    def keep_settled(self) -> timedelta:
        """How long a settled grain is kept at least: the retention, but never less than
        the time late usage of its hour may still arrive. A late record then finds the
        grain and rolls forward; pruned, it would open a second grain for an hour already
        sent, which AWS refuses as a DuplicateRecord."""
        window = self.windows.of("meter" if self.mode == "container" else "batch")
        return max(self.retention, late_usage_horizon(window, self.future_tolerance))


class Dispatcher:
    """Runs the send loop in the background; see the module docstring."""

    def __init__(
        self,
        store: UsageStore,
        backend: MeteringBackend,
        metrics: Metrics,
        policy: DispatchPolicy,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._store = store
        self._backend = backend
        self._metrics = metrics
        self._policy = policy
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_prune: datetime | None = None
        self._last_stats: datetime | None = None
        self._customers_changed = False
        # While the last usage is sent before exit: when every send must have ended.
        self._send_until: float | None = None
        # Why grains were kept for another attempt in this cycle (code -> grains).
        self._kept: Counter[tuple[Fault, str]] = Counter()

    def start(self, spawn: Spawn = plain_spawn) -> None:
        """Start the loop, through ``spawn`` (the sidecar's supervisor)."""
        self._task = spawn("usage-dispatcher", self._loop())

    def nudge(self) -> None:
        """New usage arrived: look again now rather than at the next poll."""
        self._wake.set()

    def customers_changed(self) -> None:
        """The registry changed (an event, an answer): close a customer whose grace has
        passed now, and count the customers again, rather than at the next poll."""
        self._customers_changed = True
        self._wake.set()

    def is_due(self, hour: datetime, now: datetime) -> bool:
        """Whether usage of ``hour`` would be sent by a cycle run ``now``."""
        return hour + HOUR + self._policy.grace <= now

    async def stop(self, *, budget: float) -> None:
        """Finish the cycle under way; in container mode, send the partial hour too.

        ``budget`` bounds the whole stop, in seconds (what the shutdown deadline has
        left). The cycle under way gets half of it at most. In container mode the pod's
        last usage then gets the rest, less a moment for the store to close: it is sent
        in rounds until none is left or the time is (``_send_before_exit``).
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + budget
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=budget / 2)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        if self._policy.mode == "container":
            await self._send_before_exit(end - min(_CLOSE_RESERVE, budget / 10))

    async def _send_before_exit(self, until: float) -> None:
        """Send every grain left, the current partial hour included: the pod is ending and
        nothing more will be metered from it, so there is no later to keep usage for.

        Rounds of sends, each send's attempts ending at ``until`` (loop time) at the
        latest, with the retry policy's pause between rounds, until every grain is
        settled or the time is spent; then an error line names each grain not sent, with
        its quantity: usage the seller will not be paid for unless someone sends it.
        """
        loop = asyncio.get_running_loop()
        self._send_until = until
        left: list[GrainRow] | None = None
        why = "the shutdown deadline came first"
        rounds = 0
        try:
            while True:
                try:
                    async with asyncio.timeout(max(until - loop.time(), 0.0)):
                        await self.run_once(everything=True, ignore_backoff=True)
                        left = await self._unsent()
                except TimeoutError:
                    break
                except StoreUnavailable as exc:
                    why = f"the usage queue failed: {exc}"
                    break
                if not left:
                    return
                rounds += 1
                pause = self._policy.retry.parting_pause(rounds)
                if loop.time() + pause >= until:
                    break
                await asyncio.sleep(pause)
        finally:
            self._send_until = None
        with contextlib.suppress(StoreUnavailable, TimeoutError):
            async with asyncio.timeout(_CLOSE_RESERVE):
                left = await self._unsent()
        kept = left or []
        log.error(
            "partial hour not fully sent before exit: "
            + (
                f"{len(kept)} grains not sent ({why}); AWS bills none of them unless they are "
                "sent from this queue file before their deadlines"
                if left is not None
                else f"what is left unsent is unknown ({why})"
            ),
            extra={
                "rounds": rounds,
                "grains": [
                    {
                        "grain_id": g.id,
                        "dimension": g.key.dimension,
                        "hour": g.key.hour.isoformat(),
                        "quantity": decimal_text(g.content.quantity),
                        "deadline": g.deadline.isoformat(),
                        "last_error": g.last_error,
                    }
                    for g in kept
                ],
            },
        )

    async def _unsent(self) -> list[GrainRow]:
        """Grains not settled yet (open or frozen), oldest first."""
        grains = await self._store.list_grains(Filters(status="pending"), None, _SENDABLE_PAGE)
        return sorted(grains, key=lambda g: (g.key.hour, g.id))

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self.run_once()
                delay = await self._until_next()
            except StoreUnavailable as exc:
                # Sending pauses until the store is back; nothing is lost meanwhile.
                log.error(
                    "dispatch paused: the usage queue is unavailable", extra={"error": str(exc)}
                )
                delay = self._policy.poll_interval
            except Exception:
                log.exception("dispatch cycle failed")
                delay = self._policy.poll_interval
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _until_next(self) -> float:
        wakeup = await self._store.next_wakeup()
        if wakeup is None:
            return self._policy.poll_interval
        seconds = (wakeup - self._clock()).total_seconds()
        if seconds <= 0:
            # Due already, yet the cycle just run left it: another replica holds it (a
            # claim, a row lock) until its lease or transaction ends. Looking again every
            # few milliseconds would only load the database; new usage still nudges.
            return min(PAST_WAKEUP_PAUSE, self._policy.poll_interval)
        return min(max(seconds, 0.05), self._policy.poll_interval)

    async def run_once(self, *, everything: bool = False, ignore_backoff: bool = False) -> None:
        """One cycle: freeze, expire, send, settle, measure."""
        now = self._clock()
        self._kept.clear()
        for closed in await self._store.close_customers(now):
            log.info(
                "a leaving customer's grace has passed: its open usage, the current hour "
                "included, is sent now, and later usage for it is refused",
                extra={"customer_id": closed.customer_id, "grains": closed.grains},
            )
        await self._store.freeze_due(now, everything=everything)
        for grain in await self._store.expire_overdue(now):
            self._count("expired", "SubmissionWindowPassed")
            log.error(
                "usage expired before it could be sent",
                extra={"grain_id": grain.id, "hour": grain.key.hour.isoformat()},
            )
        while True:
            grains = await self._store.sendable(now, _SENDABLE_PAGE, ignore_backoff=ignore_backoff)
            if not grains:
                break
            # Each call's outcomes are recorded as soon as AWS answered it: a page can take
            # long when the account's quota paces it, and what was sent shows as sent.
            async with self._holding(grains) as pending:
                for call in self._calls(grains):
                    if self._policy.mode == "container":
                        outcomes = [await self._send_meter(call[0])]
                    else:
                        outcomes = await self._send_batch(call)
                    await self._store.settle(outcomes, self._clock())
                    pending.difference_update(g.id for g in call)
            if ignore_backoff or len(grains) < _SENDABLE_PAGE:
                break
        self._report_kept()
        await self._housekeeping(now)

    def _report_kept(self) -> None:
        # One line per cycle and cause, not one per grain: loud, not a flood.
        for (fault, code), grains in sorted(self._kept.items()):
            level = (
                logging.WARNING if fault in (Fault.THROTTLING, Fault.TRANSIENT) else logging.ERROR
            )
            log.log(
                level,
                "usage kept for another attempt: AWS did not take it, for a reason that is "
                "not about the usage",
                extra={"cause": fault.value, "code": code, "grains": grains},
            )

    async def _housekeeping(self, now: datetime) -> None:
        if self._last_prune is None or now - self._last_prune > timedelta(hours=1):
            self._last_prune = now
            await self._store.prune(
                now - self._policy.keep_settled(), now - self._policy.key_retention
            )
        # The figures cost a scan of pending records: not more often than a poll.
        if (
            not self._customers_changed
            and self._last_stats is not None
            and (now - self._last_stats).total_seconds() < min(self._policy.poll_interval, 5.0)
        ):
            return
        self._last_stats = now
        self._customers_changed = False
        for status, count in (await self._store.customer_counts()).items():
            self._metrics.customers.labels(status).set(count)
        stats = await self._store.stats(now)
        m, scope = self._metrics, self._store.scope
        m.queue_pending_records.labels(scope).set(stats.pending_records)
        m.queue_grains_due.labels(scope).set(stats.grains_due)
        m.queue_oldest_pending_age.labels(scope).set(
            (now - stats.oldest_pending).total_seconds() if stats.oldest_pending else 0
        )
        m.queue_nearest_deadline.labels(scope).set(
            (stats.nearest_deadline - now).total_seconds() if stats.nearest_deadline else -1
        )

    # -- outcomes ---------------------------------------------------------

    def _count(self, outcome: str, reason: str) -> None:
        self._metrics.queue_outcomes.labels(outcome, reason).inc()

    def _retry(self, grain: GrainRow, error: MeteringError | str) -> Outcome:
        """Keep the grain for another attempt: backed off, but never past its deadline."""
        if isinstance(error, MeteringError):
            fault, code, text = error.fault or Fault.UNKNOWN, error.code, error.detail
        else:
            fault, code, text = Fault.TRANSIENT, error, error
        now = self._clock()
        retry_at = self._policy.retry.grain_retry_at(grain.attempts + 1, now, grain.deadline)
        self._count("retry", code)
        self._kept[(fault, code)] += 1
        return Outcome(grain.id, "retry", error=f"{code}: {text}", next_attempt_at=retry_at)

    def _final(
        self,
        grain: GrainRow,
        result: str,
        reason: str,
        record_id: str | None = None,
    ) -> Outcome:
        label = (
            "duplicate_record"
            if reason in ("DuplicateRecord", "DuplicateRequestException")
            else result
        )
        self._count(label, reason)
        if label == "duplicate_record":
            # Someone else already sent this grain with other content: AWS kept
            # theirs and will not bill ours. That is money at risk.
            log.error(
                "AWS refused a grain as a duplicate: another sender metered it first",
                extra={
                    "grain_id": grain.id,
                    "hour": grain.key.hour.isoformat(),
                    "dimension": grain.key.dimension,
                    "reason": reason,
                },
            )
        elif result == "rejected":
            log.warning("AWS rejected a grain", extra={"grain_id": grain.id, "reason": reason})
        return Outcome(
            grain.id,
            result,  # type: ignore[arg-type]
            metering_record_id=record_id,
            reason=reason,
        )

    def _attempts(self) -> Attempts:
        retry = self._policy.retry
        return retry.attempts(
            retry.queue, asyncio.get_running_loop().time(), until=self._send_until
        )

    # -- container mode ---------------------------------------------------

    async def _send_meter(self, grain: GrainRow) -> Outcome:
        assert grain.payload is not None
        try:
            response = await self._backend.call(
                "MeterUsage", json.loads(grain.payload), attempts=self._attempts()
            )
        except MeteringError as exc:
            if not _about_the_records(exc):
                return self._retry(grain, exc)
            if exc.code == "TimestampOutOfBoundsException":
                return self._final(grain, "expired", exc.code)
            return self._final(grain, "rejected", exc.code)
        record_id = response.data.get("MeteringRecordId")
        return self._final(grain, "accepted", "Success", record_id)

    # -- SaaS mode --------------------------------------------------------

    def _calls(self, grains: list[GrainRow]) -> list[list[GrainRow]]:
        """The grains of each call: one per grain in container mode; in SaaS mode, by
        product, 25 and under 1 MB a call."""
        if self._policy.mode == "container":
            return [[grain] for grain in grains]
        by_product: dict[str, list[GrainRow]] = {}
        for grain in grains:
            by_product.setdefault(grain.key.product(), []).append(grain)
        return [chunk for product in by_product.values() for chunk in _chunks(product)]

    @contextlib.asynccontextmanager
    async def _holding(self, grains: list[GrainRow]) -> AsyncIterator[set[int]]:
        """While a page is sent: the ids not settled yet, whose claims (a shared store) are
        renewed every third of the lease, so that no other replica takes over grains
        this one is still sending (the account's quota may pace a page past one lease)."""
        pending = {grain.id for grain in grains}
        store = self._store
        if not isinstance(store, ClaimingStore):
            yield pending
            return
        every = self._policy.claim_lease.total_seconds() / 3

        async def renew() -> None:
            while True:
                await asyncio.sleep(every)
                if pending:
                    try:
                        await store.extend_claims(sorted(pending), self._clock())
                    except StoreUnavailable as exc:
                        log.warning(
                            "claims of grains being sent could not be renewed",
                            extra={"error": str(exc)},
                        )

        task = asyncio.create_task(renew(), name="usage-claims")
        try:
            yield pending
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _send_batch(self, chunk: list[GrainRow]) -> list[Outcome]:
        first = chunk[0].key
        payload: dict[str, Any] = {"UsageRecords": [json.loads(g.payload or "{}") for g in chunk]}
        if not first.license_arn:
            payload["ProductCode"] = first.product_code
        try:
            response = await self._backend.call(
                "BatchMeterUsage", payload, attempts=self._attempts()
            )
        except MeteringError as exc:
            if not _about_the_records(exc):
                return [self._retry(g, exc) for g in chunk]
            if len(chunk) > 1:
                # AWS refuses a whole call for one bad record: halve until it stands alone.
                middle = len(chunk) // 2
                return await self._send_batch(chunk[:middle]) + await self._send_batch(
                    chunk[middle:]
                )
            result = "expired" if exc.code == "TimestampOutOfBoundsException" else "rejected"
            return [self._final(chunk[0], result, exc.code)]
        return self._batch_outcomes(chunk, response.data)

    def _batch_outcomes(self, chunk: list[GrainRow], data: dict[str, Any]) -> list[Outcome]:
        product = chunk[0].key.product_code
        by_key = {g.key.batch_id(): g for g in chunk}
        outcomes: dict[int, Outcome] = {}
        for result in data.get("Results") or []:
            grain = by_key.get(batch_grain_id_of(result.get("UsageRecord") or {}, product))
            if grain is None or grain.id in outcomes:
                continue
            status = str(result.get("Status") or "")
            if status == "Success":
                outcomes[grain.id] = self._final(
                    grain, "accepted", status, result.get("MeteringRecordId")
                )
            else:
                outcomes[grain.id] = self._final(grain, "rejected", status or "Unknown")
        if data.get("UnprocessedRecords"):
            self._metrics.unprocessed_records.inc(len(data["UnprocessedRecords"]))
        # Unprocessed, or missing from the answer: send again later, unchanged.
        return [outcomes.get(g.id) or self._retry(g, "UnprocessedRecord") for g in chunk]


def _about_the_records(error: MeteringError) -> bool:
    """Only an answer about the usage itself settles it; credentials, access, setup,
    throttling, faults and codes nobody knows keep it for another attempt."""
    return error.fault is not None and error.fault.final_for_queue


def _chunks(grains: list[GrainRow]) -> list[list[GrainRow]]:
    chunks: list[list[GrainRow]] = []
    current: list[GrainRow] = []
    size = 200  # envelope
    for grain in grains:
        grain_size = len(grain.payload or "") + 1
        if current and (len(current) == BATCH_MAX_RECORDS or size + grain_size >= BATCH_MAX_BYTES):
            chunks.append(current)
            current, size = [], 200
        current.append(grain)
        size += grain_size
    if current:
        chunks.append(current)
    return chunks
