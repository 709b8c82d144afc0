"""The usage queue as the API sees it: submit records, look them and their grains up."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from app.metering.billing import decimal_text, utc_now
from app.metering.errors import Conflict, FieldError, QueueUnavailable, RequestInvalid
from app.queue.dispatcher import Dispatcher
from app.queue.intake import IntakeRules, check_records
from app.queue.records import (
    Filters,
    GrainPage,
    GrainView,
    QueuedRecordReceipt,
    RefusedRecord,
    UsageRecordPage,
    UsageRecordsReceipt,
    UsageRecordView,
    record_status,
)
from app.queue.store import (
    GrainRow,
    IntakeFailure,
    IntakeRefused,
    Receipt,
    RecordRow,
    StoreUnavailable,
    UsageStore,
)
from app.runtime.metrics import Metrics

T = TypeVar("T")


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


class UsageQueue:
    """Takes records in, durably, and shows where each stands."""

    def __init__(
        self,
        store: UsageStore,
        dispatcher: Dispatcher,
        rules: IntakeRules,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self._rules = rules
        self._metrics = metrics
        self._clock = clock

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
            outcomes = await self.store.ingest(
                [intake for _, intake in good], all_or_nothing=not accept_partial
            )
        except IntakeRefused as exc:
            self._metrics.queue_records.labels("refused").inc(len(raw_records))
            errors = [
                FieldError(f"UsageRecords[{indices[f.index]}]", f.message) for f in exc.failures
            ]
            if any(f.conflict for f in exc.failures):
                raise Conflict("; ".join(f"{e.field}: {e.message}" for e in errors)) from exc
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
                    )
                )
                continue
            accepted.append(_receipt(index, outcome))
        counts = Counter(_kind(r) for r in accepted)
        counts["refused"] = len(refused)
        for kind, count in counts.items():
            if count:
                self._metrics.queue_records.labels(kind).inc(count)
        # Usage for an hour that is already due (late events, replays of old
        # usage) should not wait for the next poll; anything else will.
        now = self._clock()
        if any(self.dispatcher.is_due(r.Hour, now) for r in accepted):
            self.dispatcher.nudge()
        return UsageRecordsReceipt(
            Accepted=accepted, Rejected=sorted(refused, key=lambda r: r.Index)
        )

    async def check_writable(self) -> None:
        """Raise ``QueueUnavailable`` unless records could be taken now (for ``/readyz``)."""
        await self._read(self.store.check_writable())

    async def record(self, record_id: str) -> UsageRecordView | None:
        """One record, or None."""
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

    @staticmethod
    async def _read(awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except StoreUnavailable as exc:
            raise QueueUnavailable(str(exc)) from exc


def _receipt(index: int, receipt: Receipt) -> QueuedRecordReceipt:
    # Built without validation: every field comes from the store, already typed.
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
    return "rolled_forward" if receipt.RolledForward else "queued"
