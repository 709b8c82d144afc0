"""Checking queued records one by one, and turning each into its grain's contribution."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from app.config import QueueMode
from app.metering.billing import hour_of, quantity_value
from app.metering.errors import FieldError, field_errors
from app.metering.grains import GrainKey, TagSet, Usage, tag_set
from app.metering.models import format_timestamp
from app.metering.rules import check_quantity, check_window
from app.queue.models import QueuedUsageRecord
from app.queue.store import GrainPolicy, Intake


def new_record_id(now: datetime) -> str:
    """Time-ordered ids, so that listing by id lists by arrival."""
    return f"ur_{int(now.timestamp() * 1000):012x}{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class IntakeRules:
    """What a queued record must satisfy in this sidecar's mode."""

    mode: QueueMode
    product_code: str | None
    policy: GrainPolicy
    future_tolerance: timedelta


def _rule_errors(record: QueuedUsageRecord, rules: IntakeRules, now: datetime) -> list[FieldError]:
    errors: list[FieldError] = []
    has_identifier = record.CustomerIdentifier is not None
    has_account = record.CustomerAWSAccountId is not None
    if rules.mode == "container":
        for name in ("CustomerIdentifier", "CustomerAWSAccountId", "LicenseArn"):
            if getattr(record, name) is not None:
                errors.append(
                    FieldError(name, "container mode meters the pod with MeterUsage: leave it out")
                )
    else:
        if has_identifier == has_account:
            errors.append(
                FieldError("", "give exactly one of CustomerIdentifier or CustomerAWSAccountId")
            )
        if record.LicenseArn is not None and record.ProductCode is not None:
            errors.append(
                FieldError("ProductCode", "leave it out with LicenseArn (AWS would bill twice)")
            )
    if record.LicenseArn is None and not (record.ProductCode or rules.product_code):
        errors.append(
            FieldError("ProductCode", "required (no METERING_PRODUCT_CODE is configured)")
        )
    errors += check_quantity(
        "",
        "Quantity",
        "QuantityAsDecimal",
        record.Quantity,
        record.QuantityAsDecimal,
        record.UsageAllocations,
    )
    if record.Timestamp is not None:
        errors += check_window(
            "Timestamp",
            record.Timestamp,
            now=now,
            window=rules.policy.windows.of("meter" if rules.mode == "container" else "batch"),
            future_tolerance=rules.future_tolerance,
        )
    return errors


def _time_errors(intake: Intake, rules: IntakeRules, now: datetime) -> list[FieldError]:
    # The queue must still have time to send it: the same margin the dispatcher
    # relies on, so nothing accepted here expires without being tried.
    usage = intake.usage
    deadline = rules.policy.in_time(usage.key, usage.timestamp, now)
    if deadline is None:
        return []
    margin = int(rules.policy.margin.total_seconds())
    return [
        FieldError(
            "Timestamp",
            f"too late for the queue: AWS takes this usage until {format_timestamp(deadline)}, "
            f"and the queue needs {margin} s after the hour closes to send it "
            "(METERING_QUEUE_EXPIRY_MARGIN)",
        )
    ]


def _content_hash(content: dict[str, Any]) -> str:
    # The record as the caller sent it (before defaults: a replay without a
    # Timestamp must match), without the key itself. Stored hashes depend on
    # this exact form: changing it would turn replays into conflicts.
    return hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def to_intake(record: QueuedUsageRecord, rules: IntakeRules, now: datetime) -> Intake:
    """A checked record as the store takes it."""
    timestamp = record.Timestamp or now
    product = "" if record.LicenseArn else (record.ProductCode or rules.product_code or "")
    key = GrainKey(
        kind="meter" if rules.mode == "container" else "batch",
        product_code=product,
        license_arn=record.LicenseArn or "",
        customer_identifier=record.CustomerIdentifier or "",
        customer_aws_account_id=record.CustomerAWSAccountId or "",
        dimension=record.Dimension,
        hour=hour_of(timestamp),
    )
    allocations: dict[TagSet, Any] | None = None
    if record.UsageAllocations:
        allocations = {
            tag_set([t.model_dump() for t in a.Tags or []]): quantity_value(
                a.AllocatedUsageQuantity, a.AllocatedUsageQuantityAsDecimal
            )
            for a in record.UsageAllocations
        }
    sent = record.model_dump(mode="json", exclude_none=True, exclude={"IdempotencyKey"})
    content_hash = _content_hash(sent)
    stored = sent  # what is kept: what was sent, with the defaults filled in
    stored["Timestamp"] = timestamp.isoformat().replace("+00:00", "Z")
    if product:
        stored["ProductCode"] = product
    return Intake(
        record_id=new_record_id(now),
        idempotency_key=record.IdempotencyKey,
        content_hash=content_hash,
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


def check_records(
    raw_records: list[dict[str, Any]], rules: IntakeRules, now: datetime
) -> tuple[list[tuple[int, Intake]], dict[int, list[FieldError]]]:
    """Each raw record checked on its own: (index, intake) for the good, errors for the bad.

    Error fields are prefixed ``UsageRecords[i].`` so that they name the field in the call.
    """
    good: list[tuple[int, Intake]] = []
    bad: dict[int, list[FieldError]] = {}
    for index, raw in enumerate(raw_records):
        prefix = f"UsageRecords[{index}]"
        try:
            record = QueuedUsageRecord.model_validate(raw)
        except ValidationError as exc:
            bad[index] = field_errors(exc.errors(include_input=False), prefix=prefix)
            continue
        errors = _rule_errors(record, rules, now)
        intake = None if errors else to_intake(record, rules, now)
        if intake is not None:
            errors = _time_errors(intake, rules, now)
        if errors or intake is None:
            bad[index] = [FieldError(_join(prefix, e.field), e.message) for e in errors]
            continue
        good.append((index, intake))
    return good, bad


def _join(prefix: str, field: str) -> str:
    return f"{prefix}.{field}" if field else prefix
