"""The usage queue as the API sees it: submit records, look them and their grains up;
the customer registry: apply subscription events, register ResolveCustomer answers,
refuse usage of customers whose subscription has ended.

With a shared store, a call the store cannot take now goes to the local spool
(``app.queue.spool``) and is answered 202 all the same, its records marked
``spooled``; a call the store failed (its outcome unknown: the commit's answer may
have been lost) is spooled with the same record ids, and moving settles it by id.
The store is not waited on while it is known to be down: intake spools at once and
reads answer 503 at once.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from app.metering.billing import decimal_text, hour_of, utc_now
from app.metering.errors import (
    Conflict,
    CustomerFormConflict,
    CustomerSubscriptionEnded,
    FieldError,
    QueueUnavailable,
    RequestInvalid,
)
from app.metering.grains import GrainKey
from app.metering.shapes import ResolveCustomerResult, parse_timestamp
from app.metering.subscriptions import EventKind, SubscriptionEvent
from app.queue.dispatcher import Dispatcher
from app.queue.intake import IntakeRules, check_records
from app.queue.records import (
    CustomerEventView,
    CustomerPage,
    CustomerView,
    EventReceipt,
    Filters,
    GrainPage,
    GrainView,
    QueuedRecordReceipt,
    RefusedRecord,
    SpoolView,
    UsageRecordPage,
    UsageRecordsReceipt,
    UsageRecordView,
    record_status,
)
from app.queue.registry import ENDED, FORM_CONFLICT, CustomerRow, EventOutcome, Identity
from app.queue.spool import Spool, SpoolCause, SpoolCheck, SpooledRow, SpoolReceipt
from app.queue.store import (
    GrainRow,
    Intake,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    RecordRow,
    StoreUnavailable,
    UsageStore,
)
from app.runtime.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("app.queue")
# What a customer refusal answers with, by reason.
_REFUSALS: dict[str, type[CustomerSubscriptionEnded | CustomerFormConflict]] = {
    ENDED: CustomerSubscriptionEnded,
    FORM_CONFLICT: CustomerFormConflict,
}


def grain_view(grain: GrainRow) -> GrainView:
    """A stored grain as the API shows it."""
    key = grain.key
    return GrainView(
        Id=grain.id,
        Kind=key.kind,
        ProductCode=key.product_code or None,
        LicenseArn=key.license_arn or None,
        CustomerIdentifier=key.customer_identifier or None,
        CustomerAWSAccountId=key.customer_aws_account_id or None,
        Dimension=key.dimension,
        Hour=key.hour,
        Status=grain.status,
        Quantity=decimal_text(grain.content.quantity),
        Records=grain.records,
        Attempts=grain.attempts,
        DueAt=grain.due_at,
        SubmissionDeadline=grain.deadline,
        NextAttemptAt=grain.next_attempt_at if grain.status == "frozen" else None,
        MeteringRecordId=grain.metering_record_id,
        Reason=grain.reason,
        LastError=grain.last_error,
        Sent=json.loads(grain.payload) if grain.payload else None,
    )


def record_view(row: RecordRow) -> UsageRecordView:
    """A stored record as the API shows it."""
    return UsageRecordView(
        Id=row.id,
        Status=record_status(row.grain.status),
        IdempotencyKey=row.idempotency_key,
        ReceivedAt=row.received_at,
        Record=row.record,
        RolledForward=row.rolled_forward,
        OriginalHour=row.original_hour,
        MeteringRecordId=row.grain.metering_record_id,
        Reason=row.grain.reason,
        Attempts=row.grain.attempts,
        Grain=grain_view(row.grain),
    )


def spooled_view(row: SpooledRow, original: RecordRow | None = None) -> UsageRecordView:
    """A record in the local spool as the API shows it: waiting (``spooled``), refused
    when moved (``rejected``), or a replay of ``original`` (the record it repeats, with
    that record's grain and fate, under the spooled id)."""
    intake = row.intake
    spool = SpoolView(
        State=row.state,
        Cause=row.cause,
        ReplayOf=row.replay_of,
        Detail=row.detail,
        SettledAt=row.settled_at,
    )
    if original is not None:
        return record_view(original).model_copy(
            update={"Id": intake.record_id, "Spool": spool, "Status": "replayed"}
        )
    return UsageRecordView(
        Id=intake.record_id,
        Status="rejected" if row.state == "rejected" else row.state,
        IdempotencyKey=intake.idempotency_key,
        ReceivedAt=intake.received_at,
        Record=json.loads(intake.record),
        RolledForward=False,
        OriginalHour=intake.usage.key.hour,
        Reason=row.reason,
        Attempts=0,
        Grain=None,
        Spool=spool,
    )


def customer_view(row: CustomerRow, now: datetime, *, events: bool = False) -> CustomerView:
    """A customer as the API shows it (with its events in its own view)."""
    i = row.identity
    return CustomerView(
        Id=row.id,
        Status=row.status,
        UsageAccepted=not row.closed_for_usage(now),
        CustomerIdentifier=i.customer_identifier or None,
        CustomerAWSAccountId=i.customer_aws_account_id or None,
        LicenseArn=i.license_arn or None,
        ProductCode=i.product_code or None,
        AgreementId=i.agreement_id or None,
        EndingSince=row.ending_at,
        GraceEndsAt=row.grace_ends_at,
        FinalUsageSentAt=row.closed_at,
        EndedAt=row.ended_at,
        CreatedAt=row.created_at,
        UpdatedAt=row.updated_at,
        Events=[
            CustomerEventView(
                EventId=e.event_id,
                Type=e.type,
                Kind=e.kind,
                Time=e.time,
                AppliedAt=e.applied_at,
                Outcome=e.outcome,
            )
            for e in row.events
        ]
        if events
        else None,
    )


def event_type_label(event: SubscriptionEvent) -> str:
    """``metering_events``' type label: AWS's name of a known type (a fixed set), "unknown"
    for a type nobody knows (it comes from the body: never a label), as the events
    poller labels them."""
    return "unknown" if event.kind is EventKind.UNKNOWN else event.type


def _batch_key(record: Mapping[str, Any], product_code: str) -> GrainKey:
    """The grain a BatchMeterUsage record (as prepared to send) falls in."""
    timestamp = record["Timestamp"]
    if not isinstance(timestamp, datetime):
        timestamp = parse_timestamp(timestamp)
    license_arn = str(record.get("LicenseArn") or "")
    return GrainKey(
        "batch",
        "" if license_arn else product_code,
        license_arn,
        str(record.get("CustomerIdentifier") or ""),
        str(record.get("CustomerAWSAccountId") or ""),
        str(record["Dimension"]),
        hour_of(timestamp),
    )


class UsageQueue:
    """Takes records in, durably, and shows where each stands; keeps the customer registry."""

    def __init__(
        self,
        store: UsageStore,
        dispatcher: Dispatcher,
        rules: IntakeRules,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utc_now,
        customer_grace: timedelta = timedelta(seconds=900),
        spool: Spool | None = None,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self._rules = rules
        self._metrics = metrics
        self._clock = clock
        # How long a leaving customer's usage is still taken after its first ending event.
        self.customer_grace = customer_grace
        # A shared store's local spool (None: the store is this sidecar's own SQLite file).
        self.spool = spool

    async def submit(
        self, raw_records: list[dict[str, Any]], *, accept_partial: bool
    ) -> UsageRecordsReceipt:
        """Check every record, commit the good ones durably, say where each went.

        Raises ``RequestInvalid`` (nothing written) when a record is bad and
        partial acceptance was not asked for, or when no record at all is good.
        """
        good, bad = check_records(raw_records, self._rules, self._clock())
        if bad and (not accept_partial or not good):
            self._metrics.queue_records.labels("refused").inc(len(raw_records))
            raise RequestInvalid([e for errors in bad.values() for e in errors])
        indices = [index for index, _ in good]
        try:
            outcomes = await self._take(
                [intake for _, intake in good], all_or_nothing=not accept_partial
            )
        except IntakeRefused as exc:
            self._metrics.queue_records.labels("refused").inc(len(raw_records))
            errors = [
                FieldError(f"UsageRecords[{indices[f.index]}]", f.message) for f in exc.failures
            ]
            detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
            reasons = [f.reason for f in exc.failures if f.reason is not None]
            self._count_refusals(reasons)
            for reason, error in _REFUSALS.items():
                if reason in reasons:
                    raise error(detail) from exc
            if any(f.conflict for f in exc.failures):
                raise Conflict(detail) from exc
            raise RequestInvalid(errors) from exc
        except StoreUnavailable as exc:
            raise QueueUnavailable(str(exc)) from exc
        accepted: list[QueuedRecordReceipt] = []
        refused = [
            RefusedRecord(
                Index=index,
                Errors=errors,
            )
            for index, errors in sorted(bad.items())
        ]
        for index, outcome in zip(indices, outcomes, strict=True):
            if isinstance(outcome, IntakeFailure):
                refused.append(
                    RefusedRecord(
                        Index=index,
                        Errors=[FieldError(f"UsageRecords[{index}]", outcome.message)],
                        Reason=outcome.reason,
                    )
                )
                continue
            accepted.append(_receipt(index, outcome))
        self._count_refusals(
            [o.reason for o in outcomes if isinstance(o, IntakeFailure) and o.reason is not None]
        )
        counts = Counter(_kind(r) for r in accepted)
        counts["refused"] = len(refused)
        for kind, count in counts.items():
            if count:
                self._metrics.queue_records.labels(kind).inc(count)
        # Usage for an hour that is already due (late events, replays of old
        # usage) should not wait for the next poll; anything else will.
        now = self._clock()
        if any(r.Status != "spooled" and self.dispatcher.is_due(r.Hour, now) for r in accepted):
            self.dispatcher.nudge()
        return UsageRecordsReceipt(
            Accepted=accepted, Rejected=sorted(refused, key=lambda r: r.Index)
        )

    async def _take(
        self, intakes: list[Intake], *, all_or_nothing: bool
    ) -> list[Receipt | SpoolReceipt | IntakeFailure]:
        """The records into the store, or, with a shared store that cannot take them now,
        into the spool; raises ``StoreUnavailable`` when neither can."""
        spool = self.spool
        if spool is None:
            return list(await self.store.ingest(intakes, all_or_nothing=all_or_nothing))
        cause: SpoolCause | None = await spool.cause_to_spool(intakes)
        failure: StoreUnavailable | None = None
        if cause is None:
            try:
                return list(await self.store.ingest(intakes, all_or_nothing=all_or_nothing))
            except StoreUnavailable as exc:
                # It may have committed with its answer lost: the same ids go to the
                # spool, and moving them settles each by id.
                cause, failure = "store_failed", exc
        else:
            problem = spool.store_problem()
            failure = StoreUnavailable(problem[0]) if problem else None
        try:
            return list(await spool.take(intakes, all_or_nothing=all_or_nothing, cause=cause))
        except StoreUnavailable as exc:
            store = f"the shared usage queue cannot take usage ({failure})" if failure else ""
            raise StoreUnavailable(
                "; ".join(x for x in (store, f"the local spool cannot be written: {exc}") if x)
            ) from exc

    async def check_writable(self) -> None:
        """Raise ``QueueUnavailable`` unless records could be taken now."""
        for check in (await self.readiness()).values():
            if check.blocking and not check.ok:
                raise QueueUnavailable(check.detail)

    async def readiness(self) -> dict[str, SpoolCheck]:
        """``/readyz``'s queue checks: ``queue`` (and, with a shared store, ``spool``).
        Blocking only while usage cannot be taken durably at all; a shared store that
        cannot be used while the spool can is ``degraded``. Never waits on the shared
        store: its state is what its last call found."""
        if self.spool is not None:
            return await self.spool.readiness()
        try:
            await self.store.check_writable()
        except StoreUnavailable as exc:
            return {"queue": SpoolCheck(False, str(exc), True)}
        return {"queue": SpoolCheck(True, "writable", True)}

    async def record(self, record_id: str) -> UsageRecordView | None:
        """One record, or None; a spooled one from the spool."""
        if self.spool is not None:
            spooled = await self.spool.get(record_id)
            if spooled is not None:
                original = None
                if spooled.state == "replayed" and spooled.replay_of is not None:
                    original = await self._read(self.store.get_record(spooled.replay_of))
                return spooled_view(spooled, original)
        row = await self._read(self.store.get_record(record_id))
        return record_view(row) if row else None

    async def records(self, filters: Filters, cursor: str | None, limit: int) -> UsageRecordPage:
        """A page of records."""
        rows = await self._read(self.store.list_records(filters, cursor, limit))
        return UsageRecordPage(
            Items=[record_view(r) for r in rows],
            NextCursor=rows[-1].id if len(rows) == limit else None,
        )

    async def grain(self, grain_id: int) -> GrainView | None:
        """One grain, or None."""
        row = await self._read(self.store.get_grain(grain_id))
        return grain_view(row) if row else None

    async def grains(self, filters: Filters, cursor: int | None, limit: int) -> GrainPage:
        """A page of grains."""
        rows = await self._read(self.store.list_grains(filters, cursor, limit))
        return GrainPage(
            Items=[grain_view(g) for g in rows],
            NextCursor=str(rows[-1].id) if len(rows) == limit else None,
        )

    def _count_refusals(self, reasons: list[str]) -> None:
        for reason, count in Counter(reasons).items():
            self._metrics.usage_refusals.labels(reason).inc(count)

    # -- the customer registry ---------------------------------------------

    async def take_event(self, event: SubscriptionEvent) -> EventOutcome:
        """Apply a subscription event, durably and once (see ``apply_event``), and say what
        it did and to which customer. Raises ``StoreUnavailable``."""
        outcome = await self.store.apply_event(event, self._clock(), self.customer_grace)
        if outcome.outcome == "applied":
            # A grace that has passed already (a late event, an ended one) closes now.
            self.dispatcher.customers_changed()
        log.info(
            "subscription event taken",
            extra={
                "event_id": event.event_id,
                "type": event_type_label(event),
                "kind": event.kind.value,
                "outcome": outcome.outcome,
                "customer_id": outcome.customer.id if outcome.customer else None,
                "status": outcome.customer.status if outcome.customer else None,
            },
        )
        return outcome

    async def apply_event(self, event: SubscriptionEvent) -> str:
        """Apply a subscription event: ``"applied"``, ``"duplicate"`` (its id was applied
        before: nothing changes) or ``"recorded"`` (a kind that changes nothing, kept with
        its customer or in the events log).

        Raises ``StoreUnavailable`` when the store cannot take it: leave the event to be
        delivered again. The caller counts ``metering_events`` (it alone knows about
        unreadable and failed deliveries); ``event_type_label`` gives the type label.
        """
        self._raise_if_down()
        return (await self.take_event(event)).outcome

    async def receive_event(self, event: SubscriptionEvent) -> EventReceipt:
        """Apply an event (``POST /v1/events``); raises ``QueueUnavailable``."""
        outcome = await self._read(self.take_event(event))
        now = self._clock()
        return EventReceipt(
            EventId=event.event_id,
            Outcome=outcome.outcome,
            Customer=customer_view(outcome.customer, now) if outcome.customer else None,
        )

    async def record_resolved(self, answer: ResolveCustomerResult) -> None:
        """Register a ResolveCustomer answer (raises ``StoreUnavailable``, at once while a
        shared store is known to be down)."""
        identity = Identity(
            customer_identifier=answer.CustomerIdentifier or "",
            customer_aws_account_id=answer.CustomerAWSAccountId or "",
            license_arn=answer.LicenseArn or "",
            product_code=answer.ProductCode or "",
            agreement_id=(answer.Metadata.AgreementId if answer.Metadata else None) or "",
        )
        if not identity.named:
            return
        self._raise_if_down()
        await self.store.record_customer(identity, self._clock())
        self.dispatcher.customers_changed()

    async def check_batch(self, payload: Mapping[str, Any]) -> None:
        """Refuse a BatchMeterUsage call (sent to AWS at once) that has a record for a
        customer whose subscription has ended, or under a second form of a customer with
        usage of that dimension and hour queued or earlier in the call.

        If the store cannot be read the call goes out unchecked, as before the
        registry existed: metering straight to AWS does not depend on the queue.
        """
        product = str(payload.get("ProductCode") or "")
        keys = [_batch_key(record, product) for record in payload["UsageRecords"]]
        try:
            self._raise_if_down()
            refusals = await self.store.batch_refusals(keys, self._clock())
        except StoreUnavailable as exc:
            log.error(
                "BatchMeterUsage sent without the customer registry's checks: the usage "
                "queue cannot be read",
                extra={"error": str(exc)},
            )
            return
        if not refusals:
            return
        reasons = [refused.reason for _, refused in refusals]
        self._count_refusals(reasons)
        detail = "; ".join(f"UsageRecords[{i}]: {refused.message}" for i, refused in refusals)
        error = _REFUSALS[ENDED if ENDED in reasons else FORM_CONFLICT]
        raise error(detail)

    async def customer(self, customer_id: int) -> CustomerView | None:
        """One customer and its latest events, or None."""
        row = await self._read(self.store.get_customer(customer_id))
        return customer_view(row, self._clock(), events=True) if row else None

    async def customers(
        self, status: str | None, customer: str | None, cursor: int | None, limit: int
    ) -> CustomerPage:
        """A page of customers."""
        rows = await self._read(self.store.list_customers(status, customer, cursor, limit))
        now = self._clock()
        return CustomerPage(
            Items=[customer_view(r, now) for r in rows],
            NextCursor=str(rows[-1].id) if len(rows) == limit else None,
        )

    def _raise_if_down(self) -> None:
        """``StoreUnavailable`` at once while a shared store is known to be down: a call
        would only wait for the store deadline (the spool's loop finds out when it is
        back)."""
        problem = self.spool.store_problem() if self.spool is not None else None
        if problem is not None:
            raise StoreUnavailable(f"the shared usage queue cannot be used now: {problem[0]}")

    async def _read(self, awaitable: Awaitable[T]) -> T:
        try:
            self._raise_if_down()
            return await awaitable
        except StoreUnavailable as exc:
            raise QueueUnavailable(str(exc)) from exc
        finally:
            # Not awaited when the store is known to be down.
            if inspect.iscoroutine(awaitable):
                awaitable.close()


def _receipt(index: int, receipt: Receipt | SpoolReceipt) -> QueuedRecordReceipt:
    # Built without validation: every field comes from the store, already typed.
    if isinstance(receipt, SpoolReceipt):
        return QueuedRecordReceipt.model_construct(
            Index=index,
            Id=receipt.record_id,
            Status="spooled",
            GrainId=None,
            Hour=receipt.hour,
            RolledForward=False,
            Replayed=receipt.replayed,
        )
    return QueuedRecordReceipt.model_construct(
        Index=index,
        Id=receipt.record_id,
        Status=record_status(receipt.grain_status),
        GrainId=receipt.grain_id,
        Hour=receipt.hour,
        RolledForward=receipt.rolled_forward,
        Replayed=receipt.replayed,
    )


def _kind(receipt: QueuedRecordReceipt) -> str:
    """How ``metering_queue_records`` counts an accepted record."""
    if receipt.Replayed:
        return "replayed"
    if receipt.Status == "spooled":
        return "spooled"
    return "rolled_forward" if receipt.RolledForward else "queued"
