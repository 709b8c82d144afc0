"""AWS's billing arithmetic: hours, submission windows and quantities compared by value.

Shared by local validation, the sandbox and the usage queue, so that all three
agree with AWS on what one billing grain is and until when it may be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Literal

HOUR = timedelta(hours=1)
# How long after the event AWS takes usage (docs/aws-limits.md): MeterUsage 6
# hours; BatchMeterUsage 24 hours in the current service model (the older API
# reference said 6: the later, longer reading loses nothing, since a record
# AWS finds too old comes back TimestampOutOfBounds and is expired visibly).
METER_USAGE_WINDOW = timedelta(hours=6)
BATCH_METER_USAGE_WINDOW = timedelta(hours=24)
# AWS closes the previous billing month at 06:00 UTC on the 1st, whatever the
# normal window says.
MONTH_CLOSE_GRACE = timedelta(hours=6)
# The instants the sidecar takes: the years 2000 to 9998, UTC. Their hours,
# submission deadlines (at most a day on) and month closes all lie well inside
# datetime's range (years 1 to 9999), so no arithmetic on a timestamp that
# passed ``in_timestamp_range`` can overflow. Usage is never older than 2000.
EARLIEST_TIMESTAMP = datetime(2000, 1, 1, tzinfo=UTC)
END_OF_TIMESTAMPS = datetime(9999, 1, 1, tzinfo=UTC)
TIMESTAMP_RANGE = "the years 2000 to 9998, UTC (2000-01-01T00:00:00Z to 9998-12-31T23:59:59Z)"


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def in_timestamp_range(timestamp: datetime) -> bool:
    """Whether the aware ``timestamp`` lies in the years 2000 to 9998, UTC.

    Comparing aware datetimes never converts them, so this is safe for any of
    them, even one whose conversion to UTC would overflow
    (``9999-12-31T23:59:59-23:59``).
    """
    return EARLIEST_TIMESTAMP <= timestamp < END_OF_TIMESTAMPS


def hour_of(timestamp: datetime) -> datetime:
    """The start of the UTC hour ``timestamp`` falls in: AWS's billing hour."""
    return timestamp.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def month_close(timestamp: datetime) -> datetime:
    """When AWS stops accepting usage of ``timestamp``'s month (06:00 UTC on the next 1st)."""
    ts = timestamp.astimezone(UTC)
    return _month_close(ts.year, ts.month)


@lru_cache(maxsize=64)
def _month_close(year: int, month: int) -> datetime:
    # Cached: intake asks once per record, and a call's records share a month or two.
    first_next = (
        datetime(year + 1, 1, 1, tzinfo=UTC)
        if month == 12
        else datetime(year, month + 1, 1, tzinfo=UTC)
    )
    return first_next + MONTH_CLOSE_GRACE


@dataclass(frozen=True, slots=True)
class SubmissionWindows:
    """How long after the event AWS takes usage, per kind of grain (from the settings)."""

    meter: timedelta = METER_USAGE_WINDOW
    batch: timedelta = BATCH_METER_USAGE_WINDOW

    def of(self, kind: Literal["batch", "meter"]) -> timedelta:
        """The window of BatchMeterUsage ("batch") or MeterUsage ("meter") usage."""
        return self.batch if kind == "batch" else self.meter


def submission_deadline(timestamp: datetime, window: timedelta) -> datetime:
    """The instant after which AWS refuses usage stamped ``timestamp``."""
    return min(timestamp.astimezone(UTC) + window, month_close(timestamp))


def late_usage_horizon(window: timedelta, future_tolerance: timedelta) -> timedelta:
    """How long after an hour begins usage of that hour may still arrive: usage stamped in
    its last instant, taken for ``window`` after that. A grain started up to
    ``future_tolerance`` before its hour (usage stamped ahead of the clock) may settle that
    early, so a settled grain kept this long after it settled outlives every late record of
    its hour."""
    return HOUR + window + future_tolerance


def quantity_value(integer: int | None, decimal: str | None) -> Decimal:
    """A record's quantity by value: 17, "17.0" and "17.00" are equal; neither given is 0."""
    if decimal is not None:
        return Decimal(decimal)
    if integer is not None:
        return Decimal(integer)
    return Decimal(0)


def decimal_text(value: Decimal) -> str:
    """``value`` in AWS's decimal-string form: no exponent, no trailing zeros, at most 6 places."""
    quantized = value.quantize(Decimal("0.000001")).normalize()
    text = format(quantized, "f")
    return text if text != "-0" else "0"
