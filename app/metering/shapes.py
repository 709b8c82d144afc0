"""Request and result models mirroring the AWS Marketplace Metering service shapes.

Field names are AWS's own (PascalCase), so AWS's documentation applies word for
word. Constraints are those of botocore's model for ``meteringmarketplace``
2016-01-14; checks that span several fields live in ``app.metering.rules``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictInt,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from app.metering.billing import (
    EARLIEST_TIMESTAMP,
    END_OF_TIMESTAMPS,
    TIMESTAMP_RANGE,
    in_timestamp_range,
)
from app.metering.limits import (
    BATCH_MAX_RECORDS,
    DECIMAL_PATTERN,
    MAX_ALLOCATIONS,
    MAX_INTEGER,
    MAX_QUANTITY,
    MAX_TAGS,
)

# Matched whole (fullmatch: "$" alone would take a trailing newline), ASCII digits only.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
# The range of ``in_timestamp_range`` in epoch seconds: 946684800 <= seconds < 253370764800.
_EARLIEST_EPOCH = int(EARLIEST_TIMESTAMP.timestamp())
_END_EPOCH = int(END_OF_TIMESTAMPS.timestamp())
TIMESTAMP_OUT_OF_RANGE = f"must lie in {TIMESTAMP_RANGE}"


def _in_range(value: datetime) -> datetime:
    # Checked before the conversion to UTC: at the ends of the calendar
    # (9999-12-31T23:59:59-23:59) that conversion itself overflows.
    if not in_timestamp_range(value):
        raise ValueError(TIMESTAMP_OUT_OF_RANGE)
    return value.astimezone(UTC)


def parse_timestamp(value: object) -> datetime:
    """Accept RFC 3339 text (with an offset) or epoch seconds; return an aware UTC datetime.

    Only the years 2000 to 9998 (UTC) are taken, so that every later hour, window
    and month close of the result is representable; anything else, or anything
    unreadable, raises ``ValueError`` (never ``OverflowError``).
    """
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise ValueError("datetime must carry a timezone")
        return _in_range(value)
    if isinstance(value, bool):
        raise ValueError("must be RFC 3339 text or epoch seconds")
    if isinstance(value, int | float):
        # Compared before any conversion: NaN, infinities and integers of any size fail here.
        if not _EARLIEST_EPOCH <= value < _END_EPOCH:
            raise ValueError(f"epoch seconds out of range: {TIMESTAMP_OUT_OF_RANGE}")
        return _in_range(datetime.fromtimestamp(value, UTC))
    if isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise ValueError(
                "must be RFC 3339 text with a timezone, e.g. 2026-01-01T10:00:00Z, or epoch seconds"
            )
        text = value.replace("z", "Z").replace("t", "T")
        fraction_end = match.end(1)
        if fraction_end - match.start(1) > 7:
            # fromisoformat takes at most microseconds; drop finer digits.
            text = text[: match.start(1) + 7] + text[fraction_end:]
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValueError(f"not a valid date and time: {exc}") from exc
        return _in_range(parsed)
    raise ValueError("must be RFC 3339 text or epoch seconds")


def format_timestamp(value: datetime) -> str:
    """RFC 3339 text in UTC with a ``Z``."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


AwsTimestamp = Annotated[
    datetime,
    PlainValidator(parse_timestamp),
    PlainSerializer(format_timestamp, when_used="json"),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "number", "minimum": _EARLIEST_EPOCH, "exclusiveMaximum": _END_EPOCH},
            ],
            "description": f"RFC 3339 text or epoch seconds, in {TIMESTAMP_RANGE}; "
            "returned as RFC 3339 text.",
        },
        mode="validation",
    ),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]

# The model's "^[a-zA-Z0-9+ -=._:\/@]+$", where " -=" is the range from space to "=".
TAG_PATTERN = r"^[a-zA-Z0-9+ -=._:/@]+$"
PRODUCT_CODE_PATTERN = r"^[-a-zA-Z0-9/=:_.@]*$"
LICENSE_ARN_PATTERN = (
    r"^arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:"
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}$"
)


def _integral(value: object) -> object:
    # JSON Schema counts 17.0 as an integer; so does the sidecar (still not "17" or true).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[StrictInt, BeforeValidator(_integral)]
QuantityInt = Annotated[JsonInt, Field(ge=0, le=MAX_QUANTITY)]
DecimalText = Annotated[
    str, StringConstraints(min_length=1, max_length=17, pattern=DECIMAL_PATTERN)
]
ProductCodeText = Annotated[str, StringConstraints(max_length=255, pattern=PRODUCT_CODE_PATTERN)]
DimensionText = Annotated[str, StringConstraints(min_length=1, max_length=255)]
CustomerIdentifierText = Annotated[str, StringConstraints(max_length=255)]
AccountIdText = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[0-9]+$")]
LicenseArnText = Annotated[str, StringConstraints(pattern=LICENSE_ARN_PATTERN)]
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=TAG_PATTERN)]
TagValue = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=TAG_PATTERN)]
ClientTokenText = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class _Shape(BaseModel):
    """A request shape: unknown fields are refused, since a misspelt quantity would bill 0."""

    model_config = ConfigDict(extra="forbid")


class _Result(BaseModel):
    """A result shape: whatever AWS adds later is kept, nothing AWS returns is refused."""

    model_config = ConfigDict(extra="allow")


class Tag(_Shape):
    """A key-value pair that defines a bucket of usage."""

    Key: TagKey
    Value: TagValue


class UsageAllocation(_Shape):
    """A part of a record's quantity attributed to a set of tags."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["AllocatedUsageQuantity"]},
                {"required": ["AllocatedUsageQuantityAsDecimal"]},
            ]
        }
    )

    AllocatedUsageQuantity: QuantityInt | None = None
    AllocatedUsageQuantityAsDecimal: DecimalText | None = None
    Tags: list[Tag] | None = Field(None, min_length=1, max_length=MAX_TAGS)


# 1 to 2,500 allocations per record.
Allocations = Annotated[list[UsageAllocation], Field(min_length=1, max_length=MAX_ALLOCATIONS)]


class UsageRecord(_Shape):
    """Usage of one customer, dimension and hour, as BatchMeterUsage takes it.

    Exactly one of ``CustomerIdentifier`` (an empty one counts as absent) and
    ``CustomerAWSAccountId``; at most one of ``Quantity`` and ``QuantityAsDecimal``.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["CustomerIdentifier"],
                    "properties": {"CustomerIdentifier": {"minLength": 1}},
                },
                {"required": ["CustomerAWSAccountId"]},
            ],
            "not": {"required": ["Quantity", "QuantityAsDecimal"]},
        }
    )

    Timestamp: AwsTimestamp
    CustomerIdentifier: CustomerIdentifierText | None = None
    CustomerAWSAccountId: AccountIdText | None = None
    Dimension: DimensionText
    Quantity: QuantityInt | None = None
    QuantityAsDecimal: DecimalText | None = None
    UsageAllocations: list[UsageAllocation] | None = Field(
        None, min_length=1, max_length=MAX_ALLOCATIONS
    )
    LicenseArn: LicenseArnText | None = None

    @field_validator("CustomerIdentifier")
    @classmethod
    def _empty_identifier_is_absent(cls, value: str | None) -> str | None:
        # ResolveCustomer returns "" for new integrations; passing it on beside
        # CustomerAWSAccountId must not count as sending both.
        return value or None


class MeterUsageRequest(_Shape):
    """MeterUsage. ``ProductCode`` defaults to the configured one, ``Timestamp`` to now."""

    model_config = ConfigDict(
        json_schema_extra={"not": {"required": ["UsageQuantity", "UsageQuantityAsDecimal"]}}
    )

    ProductCode: ProductCodeText | None = None
    Timestamp: AwsTimestamp | None = None
    UsageDimension: DimensionText
    UsageQuantity: QuantityInt | None = None
    UsageQuantityAsDecimal: DecimalText | None = None
    DryRun: StrictBool | None = None
    UsageAllocations: list[UsageAllocation] | None = Field(
        None, min_length=1, max_length=MAX_ALLOCATIONS
    )
    ClientToken: ClientTokenText | None = None


class BatchMeterUsageRequest(_Shape):
    """BatchMeterUsage: up to 25 records of one product."""

    UsageRecords: list[UsageRecord] = Field(max_length=BATCH_MAX_RECORDS)
    ProductCode: ProductCodeText | None = None


class ResolveCustomerRequest(_Shape):
    """ResolveCustomer: redeem a buyer's registration token."""

    RegistrationToken: str = Field(min_length=1)


class RegisterUsageRequest(_Shape):
    """RegisterUsage. ``PublicKeyVersion`` defaults to 1, the only version AWS has issued."""

    ProductCode: ProductCodeText | None = None
    PublicKeyVersion: JsonInt = Field(1, ge=1, le=MAX_INTEGER)
    Nonce: str | None = Field(None, max_length=255)


class MeterUsageResult(_Result):
    """MeterUsage's answer."""

    MeteringRecordId: str | None = None


class DryRunResult(_Result):
    """MeterUsage with ``DryRun: true`` that AWS would have accepted."""

    DryRun: Literal[True] = True


class UsageRecordEcho(_Result):
    """A usage record as AWS echoes it back."""

    Timestamp: AwsTimestamp | None = None
    CustomerIdentifier: str | None = None
    CustomerAWSAccountId: str | None = None
    Dimension: str | None = None
    Quantity: int | None = None
    QuantityAsDecimal: str | None = None
    UsageAllocations: list[dict[str, Any]] | None = None
    LicenseArn: str | None = None


class UsageRecordResult(_Result):
    """The outcome of one record of a BatchMeterUsage call."""

    UsageRecord: UsageRecordEcho | None = None
    MeteringRecordId: str | None = None
    Status: Literal["Success", "CustomerNotSubscribed", "DuplicateRecord"] | str | None = None


class BatchMeterUsageResult(_Result):
    """BatchMeterUsage's answer; the sidecar has already retried ``UnprocessedRecords``."""

    Results: list[UsageRecordResult] = Field(default_factory=list)
    UnprocessedRecords: list[UsageRecordEcho] = Field(default_factory=list)


class CustomerMetadata(_Result):
    """What ResolveCustomer says about the agreement."""

    AgreementId: str | None = None


class ResolveCustomerResult(_Result):
    """ResolveCustomer's answer. ``CustomerIdentifier`` is empty for new integrations."""

    CustomerIdentifier: str | None = None
    CustomerAWSAccountId: str | None = None
    ProductCode: str | None = None
    LicenseArn: str | None = None
    Metadata: CustomerMetadata | None = None


class RegisterUsageResult(_Result):
    """RegisterUsage's answer: a signed token and when AWS next rotates its key."""

    PublicKeyRotationTimestamp: AwsTimestamp | None = None
    Signature: str | None = None
