"""The usage queue's API shapes: what callers send to it and what it shows them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from app.metering.errors import FieldError
from app.metering.grains import GrainKind
from app.metering.shapes import AwsTimestamp, ProductCodeText, UsageRecord

IdempotencyKeyText = Annotated[
    str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/+=@-]+$")
]
MAX_RECORDS_PER_CALL = 1000

RecordStatus = Literal["pending", "accepted", "rejected", "expired"]
# What a record's view may say: its grain's status, or, for a record taken into the
# local spool of a shared store, "spooled" (waiting to move) or "replayed" (when moved,
# its IdempotencyKey was found with the same content: see ReplayOf).
RecordViewStatus = Literal["pending", "accepted", "rejected", "expired", "spooled", "replayed"]
GrainStatus = Literal["open", "frozen", "accepted", "rejected", "expired"]


class QueuedUsageRecord(UsageRecord):
    """Usage to be summed into its billing grain and sent later.

    The fields of AWS's UsageRecord, plus ``ProductCode`` (defaults to the
    configured one; leave it out with ``LicenseArn``) and an optional
    ``IdempotencyKey``: the same key with the same content returns the same
    record, with other content a 409. ``Timestamp`` defaults to now. In
    container mode records carry no customer and no ``LicenseArn``.
    """

    IdempotencyKey: IdempotencyKeyText | None = None
    Timestamp: AwsTimestamp | None = None  # type: ignore[assignment]
    ProductCode: ProductCodeText | None = None

    @field_validator("CustomerIdentifier", "Dimension", "ProductCode")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        # AWS's patterns for these take any character; PostgreSQL's text cannot hold
        # U+0000, so a record with one could be taken by neither the shared store nor,
        # moved from the local spool, ever placed. One rule for both stores.
        if value is not None and "\x00" in value:
            raise ValueError("contains U+0000 (NUL), which the usage queue cannot keep")
        return value


# Items are parsed one by one (to report each bad one with its index), so the
# body model holds plain objects; the document still shows their real schema.
_QUEUED_RECORD_SCHEMA = {
    key: value
    for key, value in QueuedUsageRecord.model_json_schema(
        ref_template="#/components/schemas/{model}"
    ).items()
    if key != "$defs"
}
QueuedRecordItem = Annotated[dict[str, Any], WithJsonSchema(_QUEUED_RECORD_SCHEMA)]


class UsageRecordsRequest(BaseModel):
    """``POST /v1/usage-records``: up to 1,000 records.

    Each item is a ``QueuedUsageRecord``; items are checked one by one so that
    every bad one is reported with its index. With ``AcceptPartial`` the good
    records are queued even when others are bad; without it a single bad
    record refuses the whole call.
    """

    model_config = ConfigDict(extra="forbid")

    UsageRecords: list[QueuedRecordItem] = Field(min_length=1, max_length=MAX_RECORDS_PER_CALL)
    AcceptPartial: StrictBool = False


class QueuedRecordReceipt(BaseModel):
    """A record that is on disk: it will be sent, and never twice."""

    Index: int
    Id: str
    Status: Literal["pending", "accepted", "rejected", "expired", "spooled"] = Field(
        description="Its grain's status (pending: open or frozen), or `spooled`: the shared "
        "store could not take it now, so it is on this sidecar's disk (its local spool) "
        "and moves into the store, under this id, once the store answers."
    )
    GrainId: int | None = Field(description="Its grain; null while the record is spooled.")
    Hour: AwsTimestamp = Field(
        description="The hour its usage counts in (for a spooled record: its own hour; "
        "usage whose grain was sent meanwhile rolls forward when it is moved)."
    )
    RolledForward: bool
    Replayed: bool = Field(description="The IdempotencyKey was seen before with this content.")


class RefusedRecord(BaseModel):
    """A record that was not queued, and why."""

    Index: int
    Errors: list[FieldError]
    Reason: Literal["CustomerSubscriptionEnded", "CustomerFormConflict"] | None = Field(
        None,
        description="Present when the record was refused for its customer: the "
        "subscription has ended, or the customer has usage of this dimension and hour "
        "under its other form.",
    )


class UsageRecordsReceipt(BaseModel):
    """``202``: every record in ``Accepted`` is durably committed."""

    Accepted: list[QueuedRecordReceipt]
    Rejected: list[RefusedRecord] = Field(default_factory=list)


class GrainView(BaseModel):
    """A billing grain: the summed usage AWS is sent as one record."""

    Id: int
    Kind: Literal["batch", "meter"]
    ProductCode: str | None = None
    LicenseArn: str | None = None
    CustomerIdentifier: str | None = None
    CustomerAWSAccountId: str | None = None
    Dimension: str
    Hour: AwsTimestamp
    Status: GrainStatus
    Quantity: str
    Records: int
    Attempts: int
    DueAt: AwsTimestamp
    SubmissionDeadline: AwsTimestamp
    NextAttemptAt: AwsTimestamp | None = None
    MeteringRecordId: str | None = None
    Reason: str | None = None
    LastError: str | None = None
    Sent: dict[str, Any] | None = Field(
        None, description="The frozen record or request: byte-identical on every attempt."
    )


class SpoolView(BaseModel):
    """Where a record taken into a sidecar's local spool (a shared store could not take it
    then) stands there."""

    State: Literal["spooled", "replayed", "rejected"] = Field(
        description="spooled: waiting to move into the shared store; replayed: when moved, "
        "its IdempotencyKey was found there with the same content (nothing counted, see "
        "ReplayOf); rejected: refused when moved, never billed (Reason, Detail)."
    )
    Cause: str = Field(
        description="Why it was spooled: store_unavailable (the store was down), "
        "store_failed (the call failed or passed the store deadline; whether it committed "
        "is settled by its id), keys_waiting (its IdempotencyKey waited in the spool)."
    )
    ReplayOf: str | None = Field(None, description="The record it repeats (State replayed).")
    Detail: str | None = Field(None, description="Why it was refused (State rejected).")
    SettledAt: AwsTimestamp | None = None


class UsageRecordView(BaseModel):
    """One queued record, its grain and its fate."""

    Id: str
    Status: RecordViewStatus
    IdempotencyKey: str | None = None
    ReceivedAt: AwsTimestamp
    Record: dict[str, Any]
    RolledForward: bool
    OriginalHour: AwsTimestamp
    MeteringRecordId: str | None = None
    Reason: str | None = Field(
        None,
        description="Why its grain was rejected or expired; for a spooled record refused "
        "when moved: CustomerSubscriptionEnded, CustomerFormConflict, "
        "IdempotencyKeyConflict or GrainLimitExceeded.",
    )
    Attempts: int
    Grain: GrainView | None = Field(
        None,
        description="Its grain, once the record is in the store (null while it is spooled, "
        "and for one refused when moved; a replayed one shows the grain of ReplayOf).",
    )
    Spool: SpoolView | None = Field(
        None,
        description="Present for a record this sidecar took into its local spool and that "
        "is not in the shared store under its own id (waiting, replayed or rejected).",
    )


class UsageRecordPage(BaseModel):
    """A page of records; pass ``NextCursor`` as ``cursor`` for the next one."""

    Items: list[UsageRecordView]
    NextCursor: str | None = None


class GrainPage(BaseModel):
    """A page of grains; pass ``NextCursor`` as ``cursor`` for the next one."""

    Items: list[GrainView]
    NextCursor: str | None = None


def record_status(grain_status: str) -> RecordStatus:
    """A record's status is its grain's, with open and frozen both "pending"."""
    if grain_status in ("accepted", "rejected", "expired"):
        return grain_status  # type: ignore[return-value]
    return "pending"


@dataclass(frozen=True, slots=True)
class Filters:
    """Listing filters; ``None`` means any."""

    status: str | None = None
    customer: str | None = None
    hour: datetime | None = None
    kind: GrainKind | None = None


CustomerStatusText = Literal["active", "ending", "ended"]


class CustomerEventView(BaseModel):
    """One event in a customer's history (a subscription event, or a ResolveCustomer answer)."""

    EventId: str
    Type: str = Field(
        description="AWS's name for it (unsubscribe-pending, ...) or ResolveCustomer."
    )
    Kind: str = Field(
        description="What it means for metering: subscribed, ending, ended, changed, failed, "
        "unknown (an event), registered (a ResolveCustomer answer)."
    )
    Time: AwsTimestamp | None = Field(None, description="When AWS says it happened.")
    AppliedAt: AwsTimestamp
    Outcome: str = Field(description="applied, or recorded (a kind that changes nothing).")


class CustomerView(BaseModel):
    """One subscription of one product, as the registry knows it."""

    Id: int
    Status: CustomerStatusText
    UsageAccepted: bool = Field(
        description="Whether usage for this customer is taken now (false once its grace "
        "has passed or it has ended: 409 CustomerSubscriptionEnded)."
    )
    CustomerIdentifier: str | None = None
    CustomerAWSAccountId: str | None = None
    LicenseArn: str | None = None
    ProductCode: str | None = None
    AgreementId: str | None = None
    EndingSince: AwsTimestamp | None = Field(
        None, description="When its first ending event happened: the final hour began."
    )
    GraceEndsAt: AwsTimestamp | None = Field(
        None,
        description="When its usage stops being taken and its open usage, the current hour "
        "included, is sent (METERING_CUSTOMER_END_GRACE after EndingSince).",
    )
    FinalUsageSentAt: AwsTimestamp | None = Field(
        None, description="When its open usage was frozen to be sent at once."
    )
    EndedAt: AwsTimestamp | None = None
    CreatedAt: AwsTimestamp
    UpdatedAt: AwsTimestamp
    Events: list[CustomerEventView] | None = Field(
        None, description="Its latest events, oldest first (one customer's view only)."
    )


class CustomerPage(BaseModel):
    """A page of customers; pass ``NextCursor`` as ``cursor`` for the next one."""

    Items: list[CustomerView]
    NextCursor: str | None = None


class EventReceipt(BaseModel):
    """``POST /v1/events``: what applying the event did."""

    EventId: str
    Outcome: Literal["applied", "duplicate", "recorded"] = Field(
        description="applied; duplicate (this event id was applied before: nothing "
        "changed); recorded (a kind that changes nothing, kept with its customer or in "
        "the events log)."
    )
    Customer: CustomerView | None = Field(
        None, description="The customer it concerns, when the registry knows one."
    )
