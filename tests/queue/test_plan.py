"""One call's intake plan: each grain read once, and the work of adding a record grows
with what the record carries, never with what its grain already holds (counted)."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest

from app.metering.billing import hour_of
from app.metering.grains import GrainKey, GrainSum, TagSet, Usage, content_to_json
from app.queue.plan import IntakePlan
from app.queue.store import GrainPolicy, Intake, IntakeFailure, Receipt
from tests.queue.conftest import LICENSE, START

KEY = GrainKey("batch", "", LICENSE, "", "111122223333", "gb", hour_of(START))
POLICY = GrainPolicy(grace=timedelta(minutes=5))


def _usage(tags: list[TagSet], amount: int = 1, key: GrainKey = KEY) -> Usage:
    return Usage(
        key, START, Decimal(amount * len(tags)), False, dict.fromkeys(tags, Decimal(amount))
    )


def _tags(prefix: str, n: int) -> list[TagSet]:
    return [(("team", f"{prefix}-{i}"),) for i in range(n)]


def _holding(buckets: int) -> GrainSum:
    total = GrainSum(KEY)
    for chunk in range(0, buckets, 100):
        total.add(_usage(_tags(f"old{chunk}", min(100, buckets - chunk))))
    return GrainSum(KEY, total.content())


def _work_of_ten_records(held: int, run: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """(buckets updated, characters serialized) by adding ten records, alike but for
    the one-letter ``run`` (sizes are cached per tag set), to a grain that holds
    ``held`` tag sets already."""
    total = _holding(held)
    serialized = 0
    real_dumps = json.dumps

    def counting_dumps(*args: object, **kwargs: object) -> str:
        nonlocal serialized
        text = real_dumps(*args, **kwargs)  # type: ignore[arg-type]
        serialized += len(text)
        return text

    before = total.touched
    with monkeypatch.context() as patched:
        patched.setattr(json, "dumps", counting_dumps)
        for n in range(10):
            total.add(_usage(_tags(f"new{run}{n}", 3)))
    return total.touched - before, serialized


def test_adding_costs_what_the_usage_carries_not_what_the_grain_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small = _work_of_ten_records(1, "a", monkeypatch)
    large = _work_of_ten_records(2000, "b", monkeypatch)
    # 10 records of 3 new tag sets each: 30 buckets updated, and only the new tag sets
    # measured for AWS's size limit, however many the grain held already.
    assert small[0] == large[0] == 30
    assert small[1] == large[1] > 0


def test_a_plan_reads_each_grain_once_and_places_records_in_order() -> None:
    other = GrainKey("batch", "", LICENSE, "", "444455556666", "gb", hour_of(START))
    intakes = [
        Intake(f"ur_{n}", key, f"h{n}", _usage([()], 1, grain), f'{{"n":{n}}}', START)
        for n, (key, grain) in enumerate(
            [(None, KEY), ("k1", other), (None, KEY), ("k1", other), ("k1", KEY)]
        )
    ]
    # Records 3 and 4 reuse record 1's key with other content: both conflict.
    plan = IntakePlan(intakes, POLICY)
    assert set(plan.missing()) == {KEY, other}
    frozen = (7, "frozen", content_to_json(_holding(1).content()))
    plan.provide({KEY: frozen, other: None})
    # KEY is frozen: its usage rolls forward, so the next hour is asked for, once.
    assert plan.missing() == [KEY.next_hour()]
    plan.provide({KEY.next_hour(): None})
    assert plan.missing() == []
    failures = plan.place({})
    assert [f.index for f in failures] == [3, 4]
    assert all(f.conflict for f in failures)
    assert [grain.key for grain, _ in plan.new_grains()] == [KEY.next_hour(), other]
    for n, (grain, _) in enumerate(plan.new_grains()):
        grain.id = 100 + n
    # Both grains are new: inserted, never updated as well.
    assert plan.grain_updates() == []
    outcomes = plan.outcomes()
    receipts = [o for o in outcomes if isinstance(o, Receipt)]
    assert [r.record_id for r in receipts] == ["ur_0", "ur_1", "ur_2"]
    assert [r.rolled_forward for r in receipts] == [True, False, True]
    assert isinstance(outcomes[3], IntakeFailure)
    assert len(plan.record_rows()) == 3
    assert len(plan.key_rows()) == 1
