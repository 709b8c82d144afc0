"""The one retry policy: backoff bounds, the budget that stops storms, one call's attempts,
and when work kept for later is tried again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.config import Settings
from app.runtime.retry import (
    BUDGET_CAPACITY,
    RETRY_COST,
    SUCCESS_REFILL,
    THROTTLING_RETRY_COST,
    Attempts,
    Backoff,
    CallLimits,
    RetryBudget,
    RetryPolicy,
)


def _policy(max_attempts: int, backoff: Backoff, budget: RetryBudget | None = None) -> RetryPolicy:
    limits = CallLimits(max_attempts, 100.0)
    return RetryPolicy(backoff=backoff, budget=budget or RetryBudget(), rest=limits, wire=limits)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    backoff = Backoff(base=0.1, cap=5.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.8]
    assert backoff.ceiling(10) == 5.0
    assert backoff.ceiling(10_000) == 5.0  # no overflow, however long it fails
    assert backoff.delay(3, rng=lambda: 0.0) == 0.0
    assert backoff.delay(3, rng=lambda: 1.0) == 0.4
    assert 0.0 <= backoff.delay(2) <= 0.2
    floored = Backoff(base=1.0, cap=60.0, floor=1.0)
    assert floored.delay(1, rng=lambda: 0.0) == 1.0
    assert floored.delay(3, rng=lambda: 1.0) == 4.0


def test_budget_is_spent_by_retries_and_refilled_by_successes() -> None:
    budget = RetryBudget(capacity=30)
    assert budget.spend(throttled=False) == RETRY_COST
    assert budget.spend(throttled=True) == THROTTLING_RETRY_COST
    assert budget.available == 30 - RETRY_COST - THROTTLING_RETRY_COST
    # Not enough left for a full retry: nothing is taken.
    while budget.spend(throttled=False) is not None:
        pass
    left = budget.available
    assert left < RETRY_COST
    assert budget.spend(throttled=False) is None
    assert budget.available == left
    budget.refill(1_000)
    assert budget.available == 30


def test_a_storm_turns_into_one_attempt_per_call_once_the_budget_is_spent() -> None:
    policy = _policy(5, Backoff(0.0, 0.0))
    attempts_per_call = []
    for _ in range(200):  # 200 calls that all fail, one after the other
        call = policy.attempts(policy.rest, now=0.0)
        while call.start(now=0.0):
            if call.retry_delay(0.0) is None:
                break
        attempts_per_call.append(call.made)
    retries = sum(made - 1 for made in attempts_per_call)
    # The default bucket pays for BUDGET_CAPACITY // RETRY_COST retries in all, then none.
    assert retries == BUDGET_CAPACITY // RETRY_COST
    assert attempts_per_call[0] == 5
    assert set(attempts_per_call[-100:]) == {1}


def test_successes_give_back_what_their_retries_spent() -> None:
    budget = RetryBudget(capacity=100)
    policy = _policy(3, Backoff(0.0, 0.0), budget)
    call = Attempts(policy, 3, deadline=10.0)
    assert call.start(0.0)
    assert call.retry_delay(0.0, throttled=True) == 0.0
    assert budget.available == 100 - THROTTLING_RETRY_COST
    assert call.start(0.0)
    call.succeeded()
    assert budget.available == 100
    budget.available = 50
    plain = Attempts(policy, 3, deadline=10.0)
    assert plain.start(0.0)
    plain.succeeded()
    assert budget.available == 50 + SUCCESS_REFILL


def test_attempts_stop_at_the_limit_and_before_the_deadline() -> None:
    policy = _policy(3, Backoff(1.0, 1.0, floor=1.0))
    call = Attempts(policy, 3, deadline=10.0)
    assert call.start(0.0)
    assert call.retry_delay(0.0) == 1.0
    # A pause that would end past the deadline is not taken.
    assert call.retry_delay(9.5) is None
    assert call.start(1.0)
    assert call.start(2.0)
    assert call.retry_delay(2.0) is None  # three made: no more
    assert not call.start(3.0)
    late = Attempts(policy, 3, deadline=10.0)
    assert not late.start(10.0)
    assert late.next_ceiling() == 1.0


def test_the_policy_is_the_settings() -> None:
    settings = Settings(
        max_attempts=7,
        request_deadline=12,
        wire_max_attempts=3,
        wire_request_deadline=4,
        retry_base_delay=0.2,
        retry_max_delay=2,
        queue_retry_base_delay=10,
        queue_retry_max_delay=100,
        credential_retry_interval=2,
    )
    policy = RetryPolicy.from_settings(settings)
    assert policy.rest == CallLimits(7, 12)
    assert policy.wire == CallLimits(3, 4)
    assert policy.backoff == Backoff(0.2, 2)
    assert policy.grain_backoff == Backoff(10, 100)
    assert policy.gate_backoff.base == 2
    call = policy.attempts(policy.wire, now=50.0)
    assert (call.max_attempts, call.deadline) == (3, 54.0)


def test_a_grain_is_tried_again_backed_off_but_before_its_deadline() -> None:
    policy = _policy(1, Backoff(0.0, 0.0))
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    far = now + timedelta(hours=20)
    # Far from the deadline: the grain curve (5 s doubling to 300 s).
    assert policy.grain_retry_at(20, now, far) - now <= timedelta(seconds=300)
    assert policy.grain_retry_at(20, now, far) - now >= timedelta(0)
    # Near it: at most half of what is left, so the next attempt still lands in time ...
    near = now + timedelta(seconds=60)
    for _ in range(100):
        assert policy.grain_retry_at(20, now, near) <= now + timedelta(seconds=30)
    # ... but never sooner than a second.
    assert policy.grain_retry_at(20, now, now) == now + timedelta(seconds=1)


def test_the_gate_waits_at_least_half_a_step_after_a_refusal() -> None:
    policy = _policy(1, Backoff(0.0, 0.0))
    top = policy.gate_backoff.ceiling(3)
    assert policy.gate_pause(3, refused=True, rng=lambda: 0.0) == top / 2
    assert policy.gate_pause(3, refused=False, rng=lambda: 0.0) == 0.0
    assert policy.gate_pause(3, refused=False, rng=lambda: 1.0) == top
    assert policy.gate_pause(50, refused=False, rng=lambda: 1.0) == 60.0
