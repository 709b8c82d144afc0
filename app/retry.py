"""The one retry engine: capped exponential backoff with jitter, a deadline, and a budget.

Every loop that tries again (a call to AWS, the queue's next attempt at a
grain, the credential refresh) takes its pauses from a ``Backoff``; loops
within one call also spend from the shared ``RetryBudget``, as in botocore's
standard retry mode: a retry costs capacity, a success gives some back, and
when the bucket is empty calls stop retrying. A storm of failures then turns
into one attempt per call instead of multiplying itself.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from botocore.retries import quota, standard

# botocore's standard mode: 500 units; a retry costs 14 (5 after throttling);
# a success without retries refills 1, one after retries refills what it spent.
BUDGET_CAPACITY: int = quota.RetryQuota.INITIAL_CAPACITY
RETRY_COST: int = getattr(standard.RetryQuotaChecker, "_RETRY_COST", 14)
THROTTLING_RETRY_COST: int = getattr(standard.RetryQuotaChecker, "_THROTTLING_RETRY_COST", 5)
SUCCESS_REFILL: int = getattr(standard.RetryQuotaChecker, "_NO_RETRY_INCREMENT", 1)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter (AWS's recommendation).

    The pause after the n-th failure (1-based) is drawn uniformly from
    ``[floor, max(floor, min(cap, base * 2 ** (n - 1)))]``.
    """

    base: float
    cap: float
    floor: float = 0.0

    def ceiling(self, failures: int) -> float:
        """The longest pause after ``failures`` failures."""
        exponent = min(max(failures - 1, 0), 62)
        return max(self.floor, min(self.cap, self.base * 2.0**exponent))

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """A pause after ``failures`` failures."""
        top = self.ceiling(failures)
        return self.floor + rng() * (top - self.floor)


class RetryBudget:
    """A bucket that retries spend from and successes refill; shared by every call.

    Not thread safe: used from the event loop only.
    """

    def __init__(self, capacity: int = BUDGET_CAPACITY) -> None:
        self.capacity = capacity
        self.available = capacity

    def spend(self, *, throttled: bool) -> int | None:
        """Take the cost of one retry; ``None`` (and nothing taken) if the bucket is empty."""
        cost = THROTTLING_RETRY_COST if throttled else RETRY_COST
        if cost > self.available:
            return None
        self.available -= cost
        return cost

    def refill(self, amount: int) -> None:
        """Give ``amount`` back, never above the capacity."""
        self.available = min(self.capacity, self.available + amount)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one call is tried: attempts, pauses, and the budget they spend."""

    max_attempts: int
    backoff: Backoff
    budget: RetryBudget


@dataclass(slots=True)
class Attempts:
    """One call's attempts under a ``RetryPolicy`` and an absolute deadline.

    ``now`` and ``deadline`` are in the same clock (the event loop's).
    """

    policy: RetryPolicy
    deadline: float
    made: int = 0
    spent: list[int] = field(default_factory=list)
    rng: Callable[[], float] = random.random

    def start(self, now: float) -> bool:
        """Begin an attempt; ``False`` when the attempts or the time are used up."""
        if self.made >= self.policy.max_attempts or now >= self.deadline:
            return False
        self.made += 1
        return True

    def repeat(self) -> None:
        """Let the attempt just made not count (a refresh of refused credentials)."""
        self.made = max(0, self.made - 1)

    def retry_delay(self, now: float, *, throttled: bool = False) -> float | None:
        """The pause before the next attempt after a retryable failure, or ``None``
        to give up: the attempts or the deadline would be passed, or the budget
        is empty."""
        if self.made >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff.delay(self.made, self.rng)
        if now + delay >= self.deadline:
            return None
        cost = self.policy.budget.spend(throttled=throttled)
        if cost is None:
            return None
        self.spent.append(cost)
        return delay

    def succeeded(self) -> None:
        """The call succeeded: refill the budget (what the last retry spent, or a little)."""
        self.policy.budget.refill(self.spent[-1] if self.spent else SUCCESS_REFILL)

    def next_ceiling(self) -> float:
        """The longest pause the next retry would take: a fair ``Retry-After``."""
        return self.policy.backoff.ceiling(self.made + 1)
