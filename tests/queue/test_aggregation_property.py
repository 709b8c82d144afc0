"""For any sequence of usage records, what AWS receives is exactly the sum per grain."""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.queue.conftest import LICENSE, QueueFake, StoreFactory, queue_harness

_TAGS = [
    [{"Key": "team", "Value": "a"}],
    [{"Key": "team", "Value": "b"}],
    [{"Key": "team", "Value": "a"}, {"Key": "env", "Value": "prod"}],
]


@st.composite
def usage_records(draw: st.DrawFn) -> dict[str, Any]:
    decimal = draw(st.booleans())
    amount = draw(st.integers(0, 10_000))
    scale = draw(st.sampled_from([1, 10, 1000])) if decimal else 1
    quantity = Decimal(amount) / scale
    record: dict[str, Any] = {
        "CustomerAWSAccountId": draw(st.sampled_from(["111111111111", "222222222222"])),
        "LicenseArn": LICENSE,
        "Dimension": draw(st.sampled_from(["gb", "users"])),
        "Timestamp": f"2026-11-26T{draw(st.sampled_from([10, 11])):02d}:"
        f"{draw(st.integers(0, 59)):02d}:{draw(st.integers(0, 59)):02d}Z",
    }
    if decimal:
        record["QuantityAsDecimal"] = format(quantity, "f")
    else:
        record["Quantity"] = amount
    if draw(st.booleans()):
        tags = draw(st.sampled_from(_TAGS))
        name = "AllocatedUsageQuantityAsDecimal" if decimal else "AllocatedUsageQuantity"
        record["UsageAllocations"] = [
            {name: format(quantity, "f") if decimal else amount, "Tags": tags}
        ]
    return record


def _expected(
    records: list[dict[str, Any]],
) -> dict[tuple[str, str, str], tuple[Decimal, dict[Any, Decimal]]]:
    sums: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    buckets: dict[tuple[str, str, str], dict[Any, Decimal]] = defaultdict(
        lambda: defaultdict(Decimal)
    )
    for r in records:
        grain = (r["CustomerAWSAccountId"], r["Dimension"], r["Timestamp"][11:13])
        quantity = Decimal(r.get("QuantityAsDecimal") or r.get("Quantity") or 0)
        sums[grain] += quantity
        tags: tuple[tuple[str, str], ...] = ()
        if "UsageAllocations" in r:
            tags = tuple(sorted((t["Key"], t["Value"]) for t in r["UsageAllocations"][0]["Tags"]))
        buckets[grain][tags] += quantity
    return {g: (sums[g], dict(buckets[g])) for g in sums}


def _received(fake: QueueFake) -> dict[tuple[str, str, str], tuple[Decimal, dict[Any, Decimal]]]:
    got: dict[tuple[str, str, str], tuple[Decimal, dict[Any, Decimal]]] = {}
    for call in fake.metering.requests_for("BatchMeterUsage"):
        for record in call.json()["UsageRecords"]:
            hour = f"{(record['Timestamp'] // 3600) % 24:02d}"
            grain = (record["CustomerAWSAccountId"], record["Dimension"], hour)
            assert grain not in got, "a grain was sent twice"
            quantity = Decimal(str(record.get("QuantityAsDecimal") or record.get("Quantity") or 0))
            allocations: dict[Any, Decimal] = {}
            for allocation in record.get("UsageAllocations") or []:
                tags = tuple(sorted((t["Key"], t["Value"]) for t in allocation.get("Tags") or []))
                value = allocation.get("AllocatedUsageQuantityAsDecimal")
                if value is None:
                    value = allocation["AllocatedUsageQuantity"]
                allocations[tags] = Decimal(str(value))
            got[grain] = (quantity, allocations)
    return got


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=st.lists(usage_records(), min_size=1, max_size=40), chunk=st.integers(1, 10))
def test_what_aws_receives_is_the_sum_per_grain(
    queue_fake: QueueFake, records: list[dict[str, Any]], chunk: int
) -> None:
    queue_fake.metering.reset()
    queue_fake.clock.set(11, 59, 59)

    async def scenario(directory: Path) -> None:
        async with queue_harness(StoreFactory("sqlite", directory, None), queue_fake) as h:
            for start in range(0, len(records), chunk):
                await h.submit(*records[start : start + chunk])
            h.clock.set(12, 10)
            await h.cycle()

    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(scenario(Path(directory)))

    expected = _expected(records)
    received = _received(queue_fake)
    assert set(received) == set(expected)
    for grain, (quantity, buckets) in expected.items():
        sent_quantity, sent_allocations = received[grain]
        assert sent_quantity == quantity, grain
        if any(tags for tags in buckets):
            # Tagged usage is allocated per tag set, untagged usage to the () bucket;
            # empty tagged buckets are left out.
            wanted = {t: v for t, v in buckets.items() if v != 0 or t == ()}
            assert sent_allocations == (wanted or {(): Decimal(0)}), grain
        else:
            assert sent_allocations == {}, grain
    # Every grain AWS took is one record, billed once.
    assert len(queue_fake.metering.batch_records) == len(expected)
