"""AWS's request quotas kept on our side: reservations in a token bucket, per action."""

from __future__ import annotations

import asyncio

import pytest

from app.aws.quota import ANSWER_TIME, ActionQuotas, RequestQuota
from app.metering.errors import QuotaExhausted


def test_a_burst_then_the_steady_rate() -> None:
    quota = RequestQuota(rate=10)
    waits = [quota.reserve(now=0.0, latest=100.0) for _ in range(15)]
    assert waits[:10] == [0.0] * 10
    assert waits[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    # A second later, the bucket has refilled by ten slots but not beyond.
    later = [quota.reserve(now=10.0, latest=100.0) for _ in range(11)]
    assert later[:10] == [0.0] * 10
    assert later[10] == pytest.approx(0.1)


def test_a_slot_past_the_deadline_is_refused_without_being_taken() -> None:
    quota = RequestQuota(rate=5, burst=1)
    assert quota.reserve(now=0.0, latest=0.0) == 0.0
    assert quota.reserve(now=0.0, latest=0.1) is None
    assert quota.wait_for_slot(0.0) == pytest.approx(0.2)
    # Nothing was reserved by the refusal: the next slot is still at 0.2.
    assert quota.reserve(now=0.0, latest=1.0) == pytest.approx(0.2)


def test_rate_zero_means_no_limit() -> None:
    quota = RequestQuota(rate=0)
    assert all(quota.reserve(now=0.0, latest=0.0) == 0.0 for _ in range(1_000))


async def test_acquire_waits_its_turn_or_says_when_to_come_back() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    quotas = ActionQuotas({"RegisterUsage": 5, "MeterUsage": 0}, sleep=sleep)
    now = asyncio.get_running_loop().time()
    for _ in range(6):
        await quotas.acquire("RegisterUsage", deadline=now + 10 + ANSWER_TIME)
    assert len(slept) == 1
    assert slept[0] == pytest.approx(0.2, abs=0.05)
    # The 7th slot (at +0.4 s) leaves AWS its time before a deadline of +0.5 s (plus
    # that time); the 8th (at +0.6 s) does not, and is refused at once.
    await quotas.acquire("RegisterUsage", deadline=now + 0.5 + ANSWER_TIME)
    with pytest.raises(QuotaExhausted) as refused:
        await quotas.acquire("RegisterUsage", deadline=now + 0.5 + ANSWER_TIME)
    assert refused.value.status == 429
    assert refused.value.retry_after is not None
    assert refused.value.retry_after >= 1
    assert "RegisterUsage" in refused.value.detail
    # Inside the last second, a slot that is free right now is still taken (the burst
    # of 5); one that is not is refused.
    fresh = ActionQuotas({"RegisterUsage": 5}, sleep=sleep)
    for _ in range(5):
        await fresh.acquire("RegisterUsage", deadline=now + 0.1)
    with pytest.raises(QuotaExhausted):
        await fresh.acquire("RegisterUsage", deadline=now + 0.1)
    # No limit, and actions without a quota, never wait.
    await quotas.acquire("MeterUsage", deadline=now)
    await quotas.acquire("SomethingElse", deadline=now)
