"""Billing grains: what AWS bills one record for, and how usage sums into one.

AWS bills one usage record per grain and ignores any other with different
content. BatchMeterUsage's grain is (LicenseArn or ProductCode, customer,
dimension, hour); MeterUsage's, from a container, is (ProductCode, dimension,
hour) for the pod. So usage is summed per grain here, with exact decimal
arithmetic, and each grain is sent once, as one record.

Pure functions and values only: no I/O, so the rules can be tested on their own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal, NamedTuple

from app.metering.billing import HOUR, decimal_text, hour_of
from app.metering.limits import (
    MAX_ALLOCATIONS,
    MAX_DECIMAL_QUANTITY,
    MAX_QUANTITY,
    MAX_RECORD_BYTES,
)
from app.metering.shapes import parse_timestamp

GrainKind = Literal["batch", "meter"]
TagSet = tuple[tuple[str, str], ...]

_SECOND = timedelta(seconds=1)


# What AWS bills one BatchMeterUsage record for: (LicenseArn or ProductCode,
# customer, dimension, hour). The hour is None for a timestamp that cannot be read.
BatchGrainId = tuple[str, str, str, datetime | None]


def batch_grain_id(
    *,
    license_arn: str | None,
    product_code: str | None,
    customer: str | None,
    dimension: str | None,
    timestamp: object,
) -> BatchGrainId:
    """The grain a BatchMeterUsage record falls in: the one home of that rule."""
    try:
        hour = hour_of(parse_timestamp(timestamp)) if timestamp is not None else None
    except ValueError:
        hour = None
    return (license_arn or product_code or "", customer or "", dimension or "", hour)


def batch_grain_id_of(record: Mapping[str, Any], product_code: str | None) -> BatchGrainId:
    """The grain of a record as sent, or as AWS echoes it back, in a call for
    ``product_code`` (records with a LicenseArn carry their product themselves)."""
    return batch_grain_id(
        license_arn=record.get("LicenseArn"),
        product_code=product_code,
        customer=record.get("CustomerAWSAccountId") or record.get("CustomerIdentifier"),
        dimension=record.get("Dimension"),
        timestamp=record.get("Timestamp"),
    )


class GrainLimitExceeded(ValueError):
    """Adding this usage would make the grain's record impossible to send."""


class GrainKey(NamedTuple):
    """Identifies one billing grain. Empty strings stand for absent fields.

    A named tuple rather than a frozen dataclass: intake hashes and compares keys
    several times per record, and a tuple does both in C.
    """

    kind: GrainKind
    product_code: str
    license_arn: str
    customer_identifier: str
    customer_aws_account_id: str
    dimension: str
    hour: datetime

    def next_hour(self) -> GrainKey:
        """The same grain one hour later: where late usage rolls forward to."""
        return self._replace(hour=self.hour + HOUR)

    def product(self) -> str:
        """What one BatchMeterUsage call may carry: one LicenseArn or one ProductCode."""
        return self.license_arn or self.product_code

    def customer(self) -> str:
        """The customer, whichever form identifies it."""
        return self.customer_aws_account_id or self.customer_identifier

    def batch_id(self) -> BatchGrainId:
        """The grain as ``batch_grain_id`` names a record of it."""
        return (self.product(), self.customer(), self.dimension, self.hour)


class Usage(NamedTuple):
    """One usage record's contribution, as the queue takes it (a named tuple: intake
    builds one per record, and a tuple is the cheapest immutable value to build)."""

    key: GrainKey
    timestamp: datetime
    quantity: Decimal
    decimal_form: bool
    # Quantity per tag set; None when the record has no allocations.
    allocations: dict[TagSet, Decimal] | None = None


@dataclass(frozen=True, slots=True)
class GrainContent:
    """The running sum of a grain."""

    quantity: Decimal = Decimal(0)
    decimal_form: bool = False
    has_allocations: bool = False
    # Quantity per tag set; usage without allocations sits in the () bucket.
    buckets: dict[TagSet, Decimal] = field(default_factory=dict)
    # The latest event time seen, kept inside the grain's hour; sent as Timestamp.
    timestamp: datetime | None = None


def tag_set(tags: list[dict[str, str]] | None) -> TagSet:
    """A canonical, order-free form of a tag list."""
    return tuple(sorted((t["Key"], t["Value"]) for t in tags or []))


class GrainSum:
    """A grain's running sum, added to in place.

    An ``add`` costs what the usage carries (its tag sets), never what the grain
    already holds: AWS's 1 MB limit is kept with a running upper bound of the
    record's size rather than by serializing the record again each time.
    ``touched`` counts the buckets adds have updated: the per-record work.
    """

    def __init__(self, key: GrainKey, content: GrainContent | None = None) -> None:
        start = content or GrainContent()
        self.key = key
        self.quantity = start.quantity
        self.decimal_form = start.decimal_form
        self.has_allocations = start.has_allocations
        self.buckets = dict(start.buckets)
        self.timestamp = start.timestamp
        self.size_bound = _record_bound(key) + sum(map(_allocation_bound, self.buckets))
        self.touched = 0

    def add(self, usage: Usage) -> None:
        """Add ``usage``; raise ``GrainLimitExceeded`` (changing nothing) past AWS's limits.

        An integer total that grows past ``Quantity``'s range (2,147,483,647) goes
        on in decimal form, whose pattern reaches 9,999,999,999.999999.
        """
        quantity = self.quantity + usage.quantity
        if quantity > MAX_DECIMAL_QUANTITY:
            raise GrainLimitExceeded(
                f"the hour's total for this grain would be {quantity}, over AWS's maximum "
                f"of {MAX_DECIMAL_QUANTITY}"
            )
        parts = usage.allocations or {(): usage.quantity}
        new_tag_sets = [tags for tags in parts if tags not in self.buckets]
        if len(self.buckets) + len(new_tag_sets) > MAX_ALLOCATIONS:
            raise GrainLimitExceeded(
                f"the grain would carry {len(self.buckets) + len(new_tag_sets)} tag sets; AWS "
                f"takes at most {MAX_ALLOCATIONS}"
            )
        grown = sum(map(_allocation_bound, new_tag_sets))
        has_allocations = self.has_allocations or usage.allocations is not None
        if has_allocations and self.size_bound + grown > MAX_RECORD_BYTES:
            raise GrainLimitExceeded("the grain's record would be over AWS's 1 MB request limit")
        for tags, amount in parts.items():
            self.buckets[tags] = self.buckets.get(tags, Decimal(0)) + amount
        self.touched += len(parts)
        self.size_bound += grown
        self.quantity = quantity
        self.decimal_form = self.decimal_form or usage.decimal_form or quantity > MAX_QUANTITY
        self.has_allocations = has_allocations
        hour_start = self.key.hour
        clamped = min(max(usage.timestamp, hour_start), hour_start + HOUR - _SECOND)
        latest = clamped if self.timestamp is None else max(self.timestamp, clamped)
        self.timestamp = latest.replace(microsecond=0)

    def content(self) -> GrainContent:
        """The sum as a value."""
        return GrainContent(
            quantity=self.quantity,
            decimal_form=self.decimal_form,
            has_allocations=self.has_allocations,
            buckets=dict(self.buckets),
            timestamp=self.timestamp,
        )


def add_usage(content: GrainContent, usage: Usage) -> GrainContent:
    """``content`` with ``usage`` added; raises ``GrainLimitExceeded`` past AWS's limits."""
    total = GrainSum(usage.key, content)
    total.add(usage)
    return total.content()


# The widest a quantity can be written: "9999999999.999999", quoted.
_WIDEST_AMOUNT = 19


def _record_bound(key: GrainKey) -> int:
    """At least the bytes of the grain's record without its allocations."""
    return _fixed_bound(
        key.dimension, key.customer_identifier, key.customer_aws_account_id, key.license_arn
    )


@lru_cache(maxsize=4096)
def _fixed_bound(
    dimension: str, customer_identifier: str, customer_aws_account_id: str, license_arn: str
) -> int:
    # Cached: every hour of a customer's dimension has the same bound.
    fixed = {
        "Timestamp": 10**10,
        "Dimension": dimension,
        "CustomerIdentifier": customer_identifier,
        "CustomerAWSAccountId": customer_aws_account_id,
        "LicenseArn": license_arn,
        "QuantityAsDecimal": "",
        "UsageAllocations": [],
    }
    return len(json.dumps(fixed, separators=(",", ":"))) + _WIDEST_AMOUNT


@lru_cache(maxsize=4096)
def _allocation_bound(tags: TagSet) -> int:
    """At least the bytes one allocation of ``tags`` adds to the record (comma included)."""
    allocation: dict[str, Any] = {"AllocatedUsageQuantityAsDecimal": ""}
    if tags:
        allocation["Tags"] = [{"Key": k, "Value": v} for k, v in tags]
    return len(json.dumps(allocation, separators=(",", ":"))) + _WIDEST_AMOUNT + 1


def _amount(value: Decimal, decimal_form: bool) -> int | str:
    return decimal_text(value) if decimal_form else int(value)


def _allocations(content: GrainContent) -> list[dict[str, Any]] | None:
    if not content.has_allocations:
        return None
    allocations: list[dict[str, Any]] = []
    name = "AllocatedUsageQuantityAsDecimal" if content.decimal_form else "AllocatedUsageQuantity"
    for tags, amount in sorted(content.buckets.items()):
        if amount == 0 and tags != ():
            continue
        allocation: dict[str, Any] = {name: _amount(amount, content.decimal_form)}
        if tags:
            allocation["Tags"] = [{"Key": k, "Value": v} for k, v in tags]
        allocations.append(allocation)
    # AWS wants at least one allocation; a grain whose tagged usage summed to 0
    # says so with an untagged 0.
    return allocations or [{name: _amount(Decimal(0), content.decimal_form)}]


def batch_record(key: GrainKey, content: GrainContent) -> dict[str, Any]:
    """The grain as one BatchMeterUsage UsageRecord (Timestamp in epoch seconds)."""
    assert content.timestamp is not None
    record: dict[str, Any] = {
        "Timestamp": int(content.timestamp.timestamp()),
        "Dimension": key.dimension,
    }
    if key.customer_aws_account_id:
        record["CustomerAWSAccountId"] = key.customer_aws_account_id
    else:
        record["CustomerIdentifier"] = key.customer_identifier
    if key.license_arn:
        record["LicenseArn"] = key.license_arn
    if content.decimal_form:
        record["QuantityAsDecimal"] = decimal_text(content.quantity)
    else:
        record["Quantity"] = int(content.quantity)
    allocations = _allocations(content)
    if allocations is not None:
        record["UsageAllocations"] = allocations
    return record


def meter_usage_request(key: GrainKey, content: GrainContent, client_token: str) -> dict[str, Any]:
    """The grain as one MeterUsage request, with its own ClientToken."""
    assert content.timestamp is not None
    request: dict[str, Any] = {
        "ProductCode": key.product_code,
        "Timestamp": int(content.timestamp.timestamp()),
        "UsageDimension": key.dimension,
        "ClientToken": client_token,
    }
    if content.decimal_form:
        request["UsageQuantityAsDecimal"] = decimal_text(content.quantity)
    else:
        request["UsageQuantity"] = int(content.quantity)
    allocations = _allocations(content)
    if allocations is not None:
        request["UsageAllocations"] = allocations
    return request


def frozen_payload(key: GrainKey, content: GrainContent, client_token: str) -> str:
    """What a grain sends, built once when it freezes and resent byte for byte: a
    BatchMeterUsage record, or a MeterUsage request with its own ClientToken."""
    if key.kind == "batch":
        payload = batch_record(key, content)
    else:
        payload = meter_usage_request(key, content, client_token)
    return json.dumps(payload, separators=(",", ":"))


def content_to_json(content: GrainContent) -> str:
    """Serialize for storage: decimals as text, exactly."""
    return json.dumps(
        {
            "quantity": str(content.quantity),
            "decimal_form": content.decimal_form,
            "has_allocations": content.has_allocations,
            "buckets": [[list(map(list, tags)), str(v)] for tags, v in content.buckets.items()],
            "timestamp": content.timestamp.timestamp() if content.timestamp else None,
        },
        separators=(",", ":"),
    )


def content_from_json(text: str) -> GrainContent:
    """The inverse of ``content_to_json``."""
    data = json.loads(text)
    return GrainContent(
        quantity=Decimal(data["quantity"]),
        decimal_form=bool(data["decimal_form"]),
        has_allocations=bool(data["has_allocations"]),
        buckets={
            tuple((k, v) for k, v in tags): Decimal(amount) for tags, amount in data["buckets"]
        },
        timestamp=(
            datetime.fromtimestamp(data["timestamp"], UTC)
            if data["timestamp"] is not None
            else None
        ),
    )
