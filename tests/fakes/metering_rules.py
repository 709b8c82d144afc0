"""Semantic rules of AWS Marketplace Metering that the service model cannot express.

Kept apart from the ASGI app so each rule is a small pure function: quantities
compared by value, usage allocations, timestamp windows, BatchMeterUsage's month
close and the hour grain. Quantity ranges are the model's (``model.py``): the
integer forms are 0..2147483647, the ``*AsDecimal`` strings only match a pattern
allowing up to 9999999999.999999.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from .model import Violation, format_violations

__all__ = [
    "MONTH_CLOSE_GRACE",
    "Allocations",
    "AwsError",
    "QuantityKind",
    "check_month_close",
    "check_timestamp",
    "error_for_violations",
    "hour_of",
    "month_close",
    "normalize_allocations",
    "parse_quantity",
]

# BatchMeterUsage takes the previous month's records until 06:00 UTC on the 1st.
MONTH_CLOSE_GRACE = timedelta(hours=6)

QuantityKind = Literal["integer", "decimal"]
# Allocations normalised for by-value comparison: {(tag set, quantity)}. Decimal
# hashing is value-based, so 17 and 17.00 land in the same set entry.
Allocations = frozenset[tuple[frozenset[tuple[str, str]], Decimal]]

_TAGS_PATH = re.compile(r"\.tags(\.|$)")


@dataclass
class AwsError(Exception):
    """An AWS JSON 1.1 error response: HTTP ``status``, ``code`` for ``__type``, ``message``."""

    code: str
    message: str
    status: int = 400
    extra_headers: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        """Render as ``Code: message`` for assertion output."""
        return f"{self.code}: {self.message}"


def error_for_violations(violations: list[Violation]) -> AwsError:
    """Map model violations to the error AWS reports for them.

    Tag-level problems (pattern, length, more than 5 tags) are
    ``InvalidTagException`` per AWS's documentation of that error; anything else
    is a plain ``ValidationException``.
    """
    if all(_TAGS_PATH.search(v.path) for v in violations):
        return AwsError("InvalidTagException", format_violations(violations))
    return AwsError("ValidationException", format_violations(violations))


def parse_quantity(
    obj: dict[str, Any], int_key: str, decimal_key: str, *, required: bool = False
) -> tuple[Decimal, QuantityKind | None]:
    """Read a quantity given either as an integer or as a decimal string.

    Returns ``(value, kind)``; neither form present gives ``(0, None)`` (AWS's
    default) unless ``required``. Both forms present is a ``ValidationException``.
    """
    has_int = obj.get(int_key) is not None
    has_decimal = obj.get(decimal_key) is not None
    if has_int and has_decimal:
        raise AwsError(
            "ValidationException", f"You can't specify both {int_key} and {decimal_key}."
        )
    if has_int:
        return Decimal(obj[int_key]), "integer"
    if has_decimal:
        try:
            value = Decimal(obj[decimal_key])
        except InvalidOperation:
            # The model pattern normally catches this first.
            raise AwsError(
                "ValidationException", f"{decimal_key} is not a decimal number."
            ) from None
        # No ceiling beyond the model's pattern: ten integer digits are legal here.
        return value, "decimal"
    if required:
        raise AwsError(
            "InvalidUsageAllocationsException",
            f"Exactly one of {int_key} or "
            f"{decimal_key} must be specified for each usage allocation.",
        )
    return Decimal(0), None


def normalize_allocations(
    allocations: list[dict[str, Any]] | None, total: Decimal, kind: QuantityKind | None
) -> Allocations | None:
    """Check ``UsageAllocations`` against the record's quantity and normalise them.

    Each allocation carries exactly one quantity form, of the same kind as the
    record's; tag sets are unique (the untagged bucket at most once), keys are
    unique within an allocation, and the quantities sum to ``total``.
    """
    if allocations is None:
        return None
    seen_kinds: set[QuantityKind] = set()
    normalized: set[tuple[frozenset[tuple[str, str]], Decimal]] = set()
    seen_tag_sets: set[frozenset[tuple[str, str]]] = set()
    running = Decimal(0)
    for allocation in allocations:
        quantity, allocation_kind = parse_quantity_for_allocation(allocation)
        seen_kinds.add(allocation_kind)
        if kind is not None and allocation_kind != kind:
            raise AwsError(
                "InvalidUsageAllocationsException",
                "Allocations must use the same type of quantity as the usage quantity: "
                "AllocatedUsageQuantity with a whole-number quantity, "
                "AllocatedUsageQuantityAsDecimal with a decimal quantity.",
            )
        tags: list[dict[str, str]] = allocation.get("Tags") or []
        keys = [tag["Key"] for tag in tags]
        if len(set(keys)) != len(keys):
            raise AwsError(
                "InvalidUsageAllocationsException",
                f"Tag keys must be unique within a usage allocation: {keys}",
            )
        tag_set = frozenset((tag["Key"], tag["Value"]) for tag in tags)
        if tag_set in seen_tag_sets:
            raise AwsError(
                "InvalidUsageAllocationsException",
                "Each UsageAllocation must have a unique set of tags"
                + (" (only one allocation may be untagged)." if not tag_set else "."),
            )
        seen_tag_sets.add(tag_set)
        normalized.add((tag_set, quantity))
        running += quantity
    if len(seen_kinds) > 1:
        raise AwsError(
            "InvalidUsageAllocationsException",
            "All allocations must use the same type of quantity (whole number or decimal).",
        )
    if running != total:
        raise AwsError(
            "InvalidUsageAllocationsException",
            f"Sum of allocated usage quantities ({running}) is not equal to the usage "
            f"quantity ({total}).",
        )
    return frozenset(normalized)


def parse_quantity_for_allocation(allocation: dict[str, Any]) -> tuple[Decimal, QuantityKind]:
    """An allocation's quantity; exactly one form is mandatory, unlike on records."""
    try:
        value, kind = parse_quantity(
            allocation,
            "AllocatedUsageQuantity",
            "AllocatedUsageQuantityAsDecimal",
            required=True,
        )
    except AwsError as error:
        # Both forms on an allocation is an allocation error, not a generic one.
        raise AwsError("InvalidUsageAllocationsException", error.message) from None
    assert kind is not None  # required=True never returns kind None
    return value, kind


def to_datetime(timestamp: float) -> datetime | None:
    """Epoch seconds to an aware UTC datetime; ``None`` if not representable."""
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def check_timestamp(
    timestamp: float, now: datetime, past: timedelta, future: timedelta
) -> datetime:
    """Return the timestamp as a datetime if within ``[now - past, now + future]``.

    Raises ``TimestampOutOfBoundsException`` otherwise.
    """
    when = to_datetime(timestamp)
    if when is None or when < now - past or when > now + future:
        raise AwsError(
            "TimestampOutOfBoundsException",
            f"Timestamp {timestamp} is out of the allowed range "
            f"[{(now - past).isoformat()}, {(now + future).isoformat()}].",
        )
    return when


def month_close(when: datetime) -> datetime:
    """When the month of ``when`` closes: 06:00 UTC on the 1st of the next month."""
    utc = when.astimezone(UTC)
    first_of_next = (utc.replace(day=28) + timedelta(days=4)).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    return first_of_next + MONTH_CLOSE_GRACE


def check_month_close(when: datetime, now: datetime) -> None:
    """Refuse a BatchMeterUsage record once its month has closed, even inside 24 hours.

    Raises ``TimestampOutOfBoundsException`` when ``now`` is at or after
    :func:`month_close` of the record's timestamp.
    """
    closed_at = month_close(when)
    if now >= closed_at:
        raise AwsError(
            "TimestampOutOfBoundsException",
            f"Timestamp {when.isoformat()} is in a billing month that closed at "
            f"{closed_at.isoformat()}.",
        )


def hour_of(when: datetime) -> datetime:
    """Floor to the hour: the grain AWS uses for duplicate detection."""
    return when.replace(minute=0, second=0, microsecond=0)
