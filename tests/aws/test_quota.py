"""AWS's request quotas kept on our side: reservations in a token bucket, per action."""

from __future__ import annotations

import asyncio

import pytest

from app.aws.quota import ANSWER_TIME, ActionQuotas, AdaptiveRate, RequestQuota
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


class _Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _answers(rate: AdaptiveRate, clock: _Clock, per_second: float, seconds: float) -> None:
    """``per_second`` unthrottled answers a second for ``seconds``."""
    for _ in range(round(per_second * seconds)):
        clock.now += 1 / per_second
        rate.answered(throttled=False)


def test_a_throttle_slows_the_replica_down_and_it_climbs_back() -> None:
    clock = _Clock()
    rate = AdaptiveRate(10, clock)
    _answers(rate, clock, 10, 3)
    # Answers without throttling limit nothing.
    assert not rate.limiting
    assert rate.rate == 10
    rate.answered(throttled=True)
    # 70 % of the rate it was sending at, as botocore's adaptive mode does.
    assert rate.limiting
    assert rate.rate == pytest.approx(7, rel=0.05)
    # A second throttle soon after: lower again.
    clock.now += 0.2
    rate.answered(throttled=True)
    assert rate.rate < 5.5
    # Unthrottled answers let it climb back on the CUBIC curve, and once it is back at
    # the configured rate nothing is limited any more.
    lowest = rate.rate
    _answers(rate, clock, lowest, 1)
    assert lowest < rate.rate < 10
    _answers(rate, clock, 5, 6)
    assert not rate.limiting
    assert rate.rate == 10


async def test_acquire_paces_at_the_adaptive_rate_after_a_throttle() -> None:
    slept: list[float] = []
    loop = asyncio.get_running_loop()

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    clock = _Clock()
    quotas = ActionQuotas({"MeterUsage": 10}, sleep=sleep, clock=clock)
    for _ in range(30):
        clock.now += 0.1
        quotas.answered("MeterUsage", throttled=False)
    quotas.answered("MeterUsage", throttled=True)
    ok, detail = quotas.status()
    assert ok
    assert "AWS throttled MeterUsage" in detail
    now = loop.time()
    for _ in range(14):
        await quotas.acquire("MeterUsage", deadline=now + 60)
    # A burst of the configured size still goes at once (one call's retries are the
    # retry policy's to pace); past it, evenly spaced at about 7 a second, where the
    # configured 10 a second would have let them go a tenth of a second apart (the
    # configured bucket is still taken from too; the fake sleep moves no clock).
    adaptive, configured = slept[::2], slept[1::2]
    assert adaptive == pytest.approx([1 / 7, 2 / 7, 3 / 7, 4 / 7], rel=0.1)
    assert configured == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=0.1)
    # The rate climbs back with time alone: a few seconds later nothing is limited.
    clock.now += 5
    slept.clear()
    await quotas.acquire("MeterUsage", deadline=now + 60)
    assert quotas.status() == (True, "kept by this sidecar alone")
    # An action without a quota of its own (0: no limit) is slowed down too.
    slept.clear()
    unlimited = ActionQuotas({"MeterUsage": 0}, sleep=sleep, clock=clock)
    unlimited.answered("MeterUsage", throttled=True)
    for _ in range(11):
        await unlimited.acquire("MeterUsage", deadline=now + 60)
    assert slept == pytest.approx([2.0], rel=0.1)


class _Budget:
    """A shared budget that answers with slots, or fails when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []
        self.failing = False
        self.refusing = False

    async def reserve(self, action: str, rate: float, max_wait: float) -> tuple[bool, float]:
        self.calls.append((action, rate, max_wait))
        if self.failing:
            raise OSError("the shared store does not answer")
        if self.refusing:
            return False, 3.0
        return True, 0.25

    def fallback_divisor(self) -> float:
        return 4


async def test_a_shared_budget_gives_the_slots_and_its_loss_falls_back() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    clock = _Clock()
    quotas = ActionQuotas({"BatchMeterUsage": 8}, sleep=sleep, clock=clock)
    budget = _Budget()
    quotas.share(budget)
    now = asyncio.get_running_loop().time()
    await quotas.acquire("BatchMeterUsage", deadline=now + 30)
    assert budget.calls[0][:2] == ("BatchMeterUsage", 8)
    assert budget.calls[0][2] == pytest.approx(30 - ANSWER_TIME, abs=0.5)
    assert slept == [0.25]
    assert quotas.status() == (
        True,
        "the account's quota, shared by the fleet through the shared store",
    )
    budget.refusing = True
    with pytest.raises(QuotaExhausted) as refused:
        await quotas.acquire("BatchMeterUsage", deadline=now + 30)
    assert refused.value.retry_after == 3.0
    # The store cannot be reached: 8 / 4 = 2 a second for this replica, burst 2, and
    # sending goes on; the budget is not asked again for a few seconds.
    budget.refusing = False
    budget.failing = True
    slept.clear()
    for _ in range(4):
        await quotas.acquire("BatchMeterUsage", deadline=now + 30)
    assert len(budget.calls) == 3
    assert slept == pytest.approx([0.5, 1.0], abs=0.05)
    ok, detail = quotas.status()
    assert not ok
    assert "divided by 4" in detail
    assert "the shared store does not answer" in detail
    # Once it answers again, slots are the fleet's again.
    budget.failing = False
    clock.now += 10
    await quotas.acquire("BatchMeterUsage", deadline=now + 30)
    assert len(budget.calls) == 4
    assert quotas.status()[0]
