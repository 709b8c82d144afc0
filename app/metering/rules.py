"""Checks that span several fields, made before anything is sent to AWS.

The models check each field on its own; these functions check what AWS
documents about fields together (one quantity form, allocations summing to
the quantity, one customer form, the submission window, one product per
batch) and return every violation, each naming its field.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal

from app.metering.billing import in_timestamp_range, quantity_value, submission_deadline
from app.metering.errors import FieldError
from app.metering.grains import BatchGrainId, batch_grain_id
from app.metering.shapes import (
    TIMESTAMP_OUT_OF_RANGE,
    BatchMeterUsageRequest,
    MeterUsageRequest,
    UsageAllocation,
    UsageRecord,
)


def check_quantity(
    where: str,
    integer_field: str,
    decimal_field: str,
    integer: int | None,
    decimal: str | None,
    allocations: Sequence[UsageAllocation] | None,
) -> list[FieldError]:
    """One quantity form at most; allocations of the same form, summing to it, tag sets unique."""
    errors: list[FieldError] = []
    if integer is not None and decimal is not None:
        errors.append(
            FieldError(
                f"{where}{decimal_field}", f"give {integer_field} or {decimal_field}, not both"
            )
        )
        return errors
    if not allocations:
        return errors
    uses_decimal = decimal is not None
    total = Decimal(0)
    seen_tag_sets: dict[frozenset[tuple[str, str]], int] = {}
    for index, allocation in enumerate(allocations):
        at = f"{where}UsageAllocations[{index}]"
        has_int = allocation.AllocatedUsageQuantity is not None
        has_dec = allocation.AllocatedUsageQuantityAsDecimal is not None
        if has_int == has_dec:
            errors.append(
                FieldError(
                    at,
                    "give exactly one of AllocatedUsageQuantity or AllocatedUsageQuantityAsDecimal",
                )
            )
            continue
        if uses_decimal and has_int:
            errors.append(
                FieldError(
                    f"{at}.AllocatedUsageQuantity",
                    f"{decimal_field} is used, so allocations must use "
                    "AllocatedUsageQuantityAsDecimal",
                )
            )
        elif not uses_decimal and has_dec:
            errors.append(
                FieldError(
                    f"{at}.AllocatedUsageQuantityAsDecimal",
                    f"{integer_field} is used (or no quantity, which is 0), so allocations "
                    "must use AllocatedUsageQuantity",
                )
            )
        total += quantity_value(
            allocation.AllocatedUsageQuantity, allocation.AllocatedUsageQuantityAsDecimal
        )
        tags = allocation.Tags or []
        keys = [tag.Key for tag in tags]
        if len(set(keys)) != len(keys):
            errors.append(FieldError(f"{at}.Tags", "tag keys must be unique within an allocation"))
        tag_set = frozenset((tag.Key, tag.Value) for tag in tags)
        if tag_set in seen_tag_sets:
            errors.append(
                FieldError(
                    f"{at}.Tags",
                    f"same tag set as UsageAllocations[{seen_tag_sets[tag_set]}]; "
                    "each allocation needs a unique set of tags",
                )
            )
        else:
            seen_tag_sets[tag_set] = index
    quantity = quantity_value(integer, decimal)
    if not errors and total != quantity:
        errors.append(
            FieldError(
                f"{where}UsageAllocations",
                f"allocations sum to {total}, but the quantity is {quantity}",
            )
        )
    return errors


def field_path(where: str, field: str) -> str:
    """The path of ``field`` under ``where`` (``UsageRecords[2]`` + ``Timestamp``)."""
    if not where:
        return field
    return f"{where}.{field}" if field else where


def check_customer(where: str, identifier: str | None, account: str | None) -> list[FieldError]:
    """A record names its customer in exactly one form."""
    if (identifier is None) == (account is None):
        return [FieldError(where, "give exactly one of CustomerIdentifier or CustomerAWSAccountId")]
    return []


def check_product(field: str, *, license_arn: bool, product_code: str | None) -> list[FieldError]:
    """A record of a LicenseArn goes without ProductCode, any other needs one."""
    if license_arn and product_code:
        return [
            FieldError(
                field,
                "must not be sent with LicenseArn records (AWS would bill twice); leave it out",
            )
        ]
    if not license_arn and not product_code:
        return [
            FieldError(
                field,
                "required (no METERING_PRODUCT_CODE is configured)",
            )
        ]
    return []


def check_pod_record(where: str, record: UsageRecord) -> list[FieldError]:
    """Container mode meters the pod itself: a record names no customer and no license."""
    return [
        FieldError(
            field_path(where, name), "container mode meters the pod with MeterUsage: leave it out"
        )
        for name in ("CustomerIdentifier", "CustomerAWSAccountId", "LicenseArn")
        if getattr(record, name) is not None
    ]


def check_usage_record(
    where: str,
    record: UsageRecord,
    timestamp: datetime | None,
    *,
    now: datetime,
    window: timedelta,
    future_tolerance: timedelta,
) -> list[FieldError]:
    """One BatchMeterUsage record, whether sent now or queued: one customer form, one
    quantity form and its allocations, the window (a queued record's ``timestamp``
    may be absent: it is now)."""
    errors = check_customer(where, record.CustomerIdentifier, record.CustomerAWSAccountId)
    errors += check_quantity(
        f"{where}." if where else "",
        "Quantity",
        "QuantityAsDecimal",
        record.Quantity,
        record.QuantityAsDecimal,
        record.UsageAllocations,
    )
    if timestamp is not None:
        errors += check_window(
            field_path(where, "Timestamp"),
            timestamp,
            now=now,
            window=window,
            future_tolerance=future_tolerance,
        )
    return errors


def _hours(window: timedelta) -> str:
    hours = round(window.total_seconds() / 3600, 2)
    return f"{hours:g} hours"


def check_window(
    field: str,
    timestamp: datetime,
    *,
    now: datetime,
    window: timedelta,
    future_tolerance: timedelta,
) -> list[FieldError]:
    """The timestamp must lie inside AWS's submission window and not in the future.

    Total for any aware datetime: one outside the years 2000 to 9998 (parsing
    refuses those already) is refused before any arithmetic could overflow.
    """
    if not in_timestamp_range(timestamp):
        return [FieldError(field, TIMESTAMP_OUT_OF_RANGE)]
    if timestamp > now + future_tolerance:
        return [FieldError(field, "lies in the future; AWS refuses future usage")]
    if now >= submission_deadline(timestamp, window):
        return [
            FieldError(
                field,
                f"is past AWS's submission window ({_hours(window)} after the event; the "
                "previous month closes at 06:00 UTC on the 1st)",
            )
        ]
    return []


def check_meter_usage(
    request: MeterUsageRequest,
    *,
    now: datetime,
    window: timedelta,
    future_tolerance: timedelta,
) -> list[FieldError]:
    """MeterUsage: a product, a quantity in one form, allocations, the window (6 hours)."""
    errors = check_product("ProductCode", license_arn=False, product_code=request.ProductCode)
    errors += check_quantity(
        "",
        "UsageQuantity",
        "UsageQuantityAsDecimal",
        request.UsageQuantity,
        request.UsageQuantityAsDecimal,
        request.UsageAllocations,
    )
    if request.Timestamp is not None:
        errors += check_window(
            "Timestamp",
            request.Timestamp,
            now=now,
            # MeterUsage accepts up to (and including) the window's end.
            window=window + timedelta(microseconds=1),
            future_tolerance=future_tolerance,
        )
    return errors


def _record_content(record: UsageRecord) -> tuple[object, ...]:
    allocations = tuple(
        (
            quantity_value(a.AllocatedUsageQuantity, a.AllocatedUsageQuantityAsDecimal),
            frozenset((t.Key, t.Value) for t in a.Tags or []),
        )
        for a in record.UsageAllocations or []
    )
    return (quantity_value(record.Quantity, record.QuantityAsDecimal), frozenset(allocations))


def check_batch_meter_usage(
    request: BatchMeterUsageRequest,
    *,
    now: datetime,
    window: timedelta,
    future_tolerance: timedelta,
) -> list[FieldError]:
    """BatchMeterUsage: per record checks, one product per call, one record per grain."""
    errors: list[FieldError] = []
    with_license = [r.LicenseArn is not None for r in request.UsageRecords]
    if any(with_license) and not all(with_license):
        errors.append(
            FieldError(
                "UsageRecords",
                "records with LicenseArn and records without it cannot share a call "
                "(one product per call)",
            )
        )
    if request.UsageRecords:
        errors += check_product(
            "ProductCode", license_arn=any(with_license), product_code=request.ProductCode
        )
    grains: dict[BatchGrainId, tuple[int, tuple[object, ...]]] = {}
    for index, record in enumerate(request.UsageRecords):
        where = f"UsageRecords[{index}]"
        errors += check_usage_record(
            where,
            record,
            record.Timestamp,
            now=now,
            window=window,
            future_tolerance=future_tolerance,
        )
        if not in_timestamp_range(record.Timestamp):
            continue  # named above; it has no billing hour to compare
        grain = batch_grain_id(
            license_arn=record.LicenseArn,
            product_code=request.ProductCode,
            customer=record.CustomerAWSAccountId or record.CustomerIdentifier,
            dimension=record.Dimension,
            timestamp=record.Timestamp,
        )
        content = _record_content(record)
        if grain in grains and grains[grain][1] != content:
            errors.append(
                FieldError(
                    where,
                    f"same customer, dimension and hour as UsageRecords[{grains[grain][0]}] with "
                    "another quantity; AWS bills only the first (sum them into one record, or "
                    "queue them with POST /v1/usage-records)",
                )
            )
        grains.setdefault(grain, (index, content))
    return errors
