"""Checking a call's queued records, and turning each into its grain's contribution.

A call's records are validated in one pydantic pass; only a call with a bad
record is gone through again one by one, so that each bad record is reported
with its index. Record ids come from one read of the random source per call,
and records of the same grain share one key object.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.config import QueueMode
from app.metering.billing import hour_of, quantity_value
from app.metering.errors import FieldError, field_errors
from app.metering.grains import GrainKey, TagSet, Usage, tag_set
from app.metering.rules import (
    check_pod_record,
    check_product,
    check_quantity,
    check_usage_record,
    check_window,
    field_path,
)
from app.metering.shapes import format_timestamp
from app.queue.records import QueuedUsageRecord
from app.queue.store import GrainPolicy, Intake

_RECORDS: TypeAdapter[list[QueuedUsageRecord]] = TypeAdapter(list[QueuedUsageRecord])


def new_record_ids(now: datetime, count: int) -> list[str]:
    """``count`` time-ordered ids (listing by id lists by arrival), for one call: one
    clock reading and one read of the random source."""
    stamp = f"ur_{int(now.timestamp() * 1000):012x}"
    random = os.urandom(8 * count).hex()
    return [stamp + random[16 * n : 16 * n + 16] for n in range(count)]


@dataclass(frozen=True, slots=True)
class IntakeRules:
    """What a queued record must satisfy in this sidecar's mode."""

    mode: QueueMode
    product_code: str | None
    policy: GrainPolicy
    future_tolerance: timedelta


def _rule_errors(
    where: str, record: QueuedUsageRecord, rules: IntakeRules, now: datetime
) -> list[FieldError]:
    # The same rules, with the same messages, as a BatchMeterUsage or MeterUsage
    # call made now (app.metering.rules).
    if rules.mode == "container":
        errors = check_pod_record(where, record)
        errors += check_product(
            field_path(where, "ProductCode"),
            license_arn=False,
            product_code=record.ProductCode or rules.product_code,
        )
        errors += check_quantity(
            f"{where}.",
            "Quantity",
            "QuantityAsDecimal",
            record.Quantity,
            record.QuantityAsDecimal,
            record.UsageAllocations,
        )
        if record.Timestamp is not None:
            errors += check_window(
                field_path(where, "Timestamp"),
                record.Timestamp,
                now=now,
                window=rules.policy.windows.of("meter"),
                future_tolerance=rules.future_tolerance,
            )
        return errors
    licensed = record.LicenseArn is not None
    errors = check_product(
        field_path(where, "ProductCode"),
        license_arn=licensed,
        # The configured product stands in only where one is needed.
        product_code=record.ProductCode if licensed else record.ProductCode or rules.product_code,
    )
    errors += check_usage_record(
        where,
        record,
        record.Timestamp,
        now=now,
        window=rules.policy.windows.of("batch"),
        future_tolerance=rules.future_tolerance,
    )
    return errors


def _time_errors(where: str, intake: Intake, rules: IntakeRules, now: datetime) -> list[FieldError]:
    # The queue must still have time to send it: the same margin the dispatcher
    # relies on, so nothing accepted here expires without being tried.
    usage = intake.usage
    deadline = rules.policy.in_time(usage.key, usage.timestamp, now)
    if deadline is None:
        return []
    margin = int(rules.policy.margin.total_seconds())
    return [
        FieldError(
            field_path(where, "Timestamp"),
            f"too late for the queue: AWS takes this usage until {format_timestamp(deadline)}, "
            f"and the queue needs {margin} s after the hour closes to send it "
            "(METERING_QUEUE_EXPIRY_MARGIN)",
        )
    ]


def _canonical(content: dict[str, Any]) -> str:
    return json.dumps(content, sort_keys=True, separators=(",", ":"))


def _content_hash(canonical: str) -> str:
    # The record as the caller sent it (before defaults: a replay without a
    # Timestamp must match), without the key itself, in ``_canonical`` form.
    # Stored hashes depend on this exact form: changing it would turn replays
    # into conflicts.
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_intake(
    record: QueuedUsageRecord,
    rules: IntakeRules,
    now: datetime,
    record_id: str,
    keys: dict[GrainKey, GrainKey],
) -> Intake:
    """A checked record as the store takes it, with its id.

    ``keys`` interns grain keys across a call's records, so that equal keys are
    one object (dictionary lookups then compare by identity).
    """
    timestamp = record.Timestamp or now
    product = "" if record.LicenseArn else (record.ProductCode or rules.product_code or "")
    key = GrainKey(
        "meter" if rules.mode == "container" else "batch",
        product,
        record.LicenseArn or "",
        record.CustomerIdentifier or "",
        record.CustomerAWSAccountId or "",
        record.Dimension,
        hour_of(timestamp),
    )
    key = keys.setdefault(key, key)
    allocations: dict[TagSet, Any] | None = None
    if record.UsageAllocations:
        allocations = {
            tag_set([t.model_dump() for t in a.Tags or []]): quantity_value(
                a.AllocatedUsageQuantity, a.AllocatedUsageQuantityAsDecimal
            )
            for a in record.UsageAllocations
        }
    sent = record.model_dump(mode="json", exclude_none=True, exclude={"IdempotencyKey"})
    canonical = _canonical(sent)
    # What is kept: what was sent, with the defaults filled in (the same text when
    # the caller gave them all).
    stored = canonical
    if "Timestamp" not in sent or (product and sent.get("ProductCode") != product):
        sent["Timestamp"] = format_timestamp(timestamp)
        if product:
            sent["ProductCode"] = product
        stored = _canonical(sent)
    return Intake(
        record_id=record_id,
        idempotency_key=record.IdempotencyKey,
        content_hash=_content_hash(canonical),
        usage=Usage(
            key=key,
            timestamp=timestamp,
            quantity=quantity_value(record.Quantity, record.QuantityAsDecimal),
            decimal_form=record.QuantityAsDecimal is not None,
            allocations=allocations,
        ),
        record=stored,
        received_at=now,
    )


def _validated(raw_records: list[dict[str, Any]]) -> list[QueuedUsageRecord | list[FieldError]]:
    # One pydantic pass over the call; only a call with a bad record is gone
    # through again one by one, to name each bad record with its index.
    try:
        return list(_RECORDS.validate_python(raw_records))
    except ValidationError:
        pass
    checked: list[QueuedUsageRecord | list[FieldError]] = []
    for index, raw in enumerate(raw_records):
        try:
            checked.append(QueuedUsageRecord.model_validate(raw))
        except ValidationError as exc:
            checked.append(
                field_errors(exc.errors(include_input=False), prefix=f"UsageRecords[{index}]")
            )
    return checked


def check_records(
    raw_records: list[dict[str, Any]], rules: IntakeRules, now: datetime
) -> tuple[list[tuple[int, Intake]], dict[int, list[FieldError]]]:
    """Each raw record checked on its own: (index, intake) for the good, errors for the bad.

    Error fields are prefixed ``UsageRecords[i].`` so that they name the field in the call.
    """
    good: list[tuple[int, Intake]] = []
    bad: dict[int, list[FieldError]] = {}
    ids = new_record_ids(now, len(raw_records))
    keys: dict[GrainKey, GrainKey] = {}
    for index, record in enumerate(_validated(raw_records)):
        if isinstance(record, list):
            bad[index] = record
            continue
        where = f"UsageRecords[{index}]"
        errors = _rule_errors(where, record, rules, now)
        intake = None if errors else to_intake(record, rules, now, ids[index], keys)
        if intake is not None:
            errors = _time_errors(where, intake, rules, now)
        if errors or intake is None:
            bad[index] = errors
            continue
        good.append((index, intake))
    return good, bad
