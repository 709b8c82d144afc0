"""AWS's limits on a call and on a record, in one place (docs/aws-limits.md says where
each comes from)."""

from __future__ import annotations

from decimal import Decimal

# BatchMeterUsage: at most 25 records, under 1 MB, one product per call.
BATCH_MAX_RECORDS = 25
BATCH_MAX_BYTES = 1_000_000
# UsageAllocations: 1 to 2,500 per record, 1 to 5 tags each.
MAX_ALLOCATIONS = 2500
MAX_TAGS = 5
# A queued grain's record must fit in one BatchMeterUsage call (under 1 MB) with
# room for the envelope and a few neighbours.
MAX_RECORD_BYTES = 900_000
# AWS's integers are 32 bits wide: Quantity, UsageQuantity, AllocatedUsageQuantity.
MAX_INTEGER = 2147483647
MAX_QUANTITY = MAX_INTEGER
# The *AsDecimal strings: the pattern alone bounds them, at 9,999,999,999.999999.
DECIMAL_PATTERN = r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$"
MAX_DECIMAL_QUANTITY = Decimal("9999999999.999999")
