"""The retry engine: backoff bounds, the budget that stops storms, one call's attempts."""

from __future__ import annotations

from app.retry import (
    BUDGET_CAPACITY,
    RETRY_COST,
    SUCCESS_REFILL,
    THROTTLING_RETRY_COST,
    Attempts,
    Backoff,
    RetryBudget,
    RetryPolicy,
)


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
    policy = RetryPolicy(max_attempts=5, backoff=Backoff(0.0, 0.0), budget=RetryBudget())
    attempts_per_call = []
    for _ in range(200):  # 200 calls that all fail, one after the other
        call = Attempts(policy, deadline=100.0)
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
    policy = RetryPolicy(max_attempts=3, backoff=Backoff(0.0, 0.0), budget=budget)
    call = Attempts(policy, deadline=10.0)
    assert call.start(0.0)
    assert call.retry_delay(0.0, throttled=True) == 0.0
    assert budget.available == 100 - THROTTLING_RETRY_COST
    assert call.start(0.0)
    call.succeeded()
    assert budget.available == 100
    budget.available = 50
    plain = Attempts(policy, deadline=10.0)
    assert plain.start(0.0)
    plain.succeeded()
    assert budget.available == 50 + SUCCESS_REFILL


def test_attempts_stop_at_the_limit_and_before_the_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, backoff=Backoff(1.0, 1.0, floor=1.0), budget=RetryBudget())
    call = Attempts(policy, deadline=10.0)
    assert call.start(0.0)
    assert call.retry_delay(0.0) == 1.0
    # A pause that would end past the deadline is not taken.
    assert call.retry_delay(9.5) is None
    assert call.start(1.0)
    assert call.start(2.0)
    assert call.retry_delay(2.0) is None  # three made: no more
    assert not call.start(3.0)
    late = Attempts(policy, deadline=10.0)
    assert not late.start(10.0)
    # A repeated attempt (fresh credentials) does not count.
    again = Attempts(policy, deadline=10.0)
    assert again.start(0.0)
    again.repeat()
    assert again.made == 0
    assert again.next_ceiling() == 1.0
