"""The one retry policy: everything that tries AWS again asks it, and nothing resends below it.

Two kinds of trying again, both decided here:

- **Within a call** (a REST or wire-protocol call, one send of the queue, one
  RegisterUsage of the entitlement gate): one ``Attempts`` per call, from
  ``RetryPolicy.attempts(limits)``. Every request that leaves the pod is an
  attempt of it: the transport's retries after throttling or a fault, the one
  resend with refreshed credentials after AWS refused them, and each round of
  BatchMeterUsage's ``UnprocessedRecords``. A retry after a failure pauses on
  capped exponential backoff with full jitter and spends from the one
  ``RetryBudget`` every call shares, as in botocore's standard retry mode: a
  retry costs capacity, a success gives some back, and when the bucket is empty
  calls stop retrying, so a storm of failures turns into one attempt per call
  instead of multiplying itself. No attempt starts past the call's deadline.
- **Later** (a grain AWS did not take yet, the entitlement gate between calls):
  ``RetryPolicy.grain_retry_at`` and ``RetryPolicy.gate_pause``, on their own
  slower curves, never past a grain's deadline. A pod that is ending (container
  mode after SIGTERM) has no later: it sends its last usage in rounds until the
  shutdown deadline, each send's attempts ending there too, with
  ``RetryPolicy.parting_pause`` between rounds.

The events queue (AWS Marketplace's subscription events on SQS) tries both ways:
a call to the queue is a few attempts within ``RetryPolicy.events_call``; later,
the poller waits ``RetryPolicy.events_pause`` after a receive that failed, and a
message whose event could not be applied is hidden for
``RetryPolicy.events_redelivery``, on a slow curve by its receive count, so that
an outage of the store spends few of the queue's ``maxReceiveCount`` receives
before the message would go to its dead-letter queue.

The policy is built once from the settings (``RetryPolicy.from_settings``) in
the composition root and handed to every part that sends.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from botocore.retries import quota, standard

if TYPE_CHECKING:
    from app.config import Settings

# botocore's standard mode: 500 units; a retry costs 14 (5 after throttling);
# a success without retries refills 1, one after retries refills what it spent.
BUDGET_CAPACITY: int = quota.RetryQuota.INITIAL_CAPACITY
RETRY_COST: int = getattr(standard.RetryQuotaChecker, "_RETRY_COST", 14)
THROTTLING_RETRY_COST: int = getattr(standard.RetryQuotaChecker, "_THROTTLING_RETRY_COST", 5)
SUCCESS_REFILL: int = getattr(standard.RetryQuotaChecker, "_NO_RETRY_INCREMENT", 1)

# One send of the queue: a few quick attempts; a grain that still fails is kept
# and tried again later on the grain curve, so a cycle never stalls on one call.
QUEUE_CALL_ATTEMPTS = 3
QUEUE_CALL_DEADLINE = 30.0
# The entitlement gate's longest pause between RegisterUsage calls: the app waits
# for it to start, so it keeps asking at least once a minute.
GATE_PAUSE_CAP = 60.0
# Never wait less than this for a grain's next attempt, even near its deadline.
MIN_GRAIN_RETRY = timedelta(seconds=1)
# One call to the events queue (beside a receive's long poll): a few quick attempts;
# a receive that still fails is tried again by the poller after a pause of at most
# EVENTS_PAUSE_CAP, so that a queue fixed by a person is read again within a minute.
EVENTS_CALL_ATTEMPTS = 3
EVENTS_CALL_DEADLINE = 10.0
EVENTS_PAUSE_CAP = 60.0
# A message whose event could not be applied (the store is down) comes back after
# 30 to 60 seconds, then twice as late each time, at most 15 minutes: with a
# maxReceiveCount of 5, it takes an outage of 7.5 minutes at least to send an event
# to the dead-letter queue (10: over an hour), and an event is at most 15 minutes
# late once the store is back (a customer's end grace is 15 minutes by default).
EVENTS_REDELIVERY_BASE = 60.0
EVENTS_REDELIVERY_CAP = 900.0
# SQS's longest visibility timeout (12 hours), in whole seconds as SQS takes it.
MAX_VISIBILITY_TIMEOUT = 43200


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
class CallLimits:
    """How hard one call is tried: requests sent (the first included) and seconds."""

    max_attempts: int
    deadline: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The sidecar's one retry policy (see the module docstring)."""

    backoff: Backoff
    budget: RetryBudget
    rest: CallLimits
    wire: CallLimits
    queue: CallLimits = CallLimits(QUEUE_CALL_ATTEMPTS, QUEUE_CALL_DEADLINE)
    grain_backoff: Backoff = Backoff(5.0, 300.0)
    gate_backoff: Backoff = Backoff(5.0, GATE_PAUSE_CAP)
    events_backoff: Backoff = Backoff(0.1, EVENTS_PAUSE_CAP)
    events_redelivery_backoff: Backoff = Backoff(EVENTS_REDELIVERY_BASE, EVENTS_REDELIVERY_CAP)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the settings describe, with a fresh budget."""
        return cls(
            backoff=Backoff(settings.retry_base_delay, settings.retry_max_delay),
            budget=RetryBudget(),
            rest=CallLimits(settings.max_attempts, settings.request_deadline),
            wire=CallLimits(settings.wire_max_attempts, settings.wire_request_deadline),
            grain_backoff=Backoff(settings.queue_retry_base_delay, settings.queue_retry_max_delay),
            # The pace at which the sidecar already waits for AWS to let it in.
            gate_backoff=Backoff(
                min(settings.credential_retry_interval, GATE_PAUSE_CAP), GATE_PAUSE_CAP
            ),
            # The first step every retry of AWS takes, up to a minute.
            events_backoff=Backoff(
                min(settings.retry_base_delay, EVENTS_PAUSE_CAP), EVENTS_PAUSE_CAP
            ),
        )

    def attempts(self, limits: CallLimits, now: float, *, until: float | None = None) -> Attempts:
        """One call's attempts, with its deadline ``limits.deadline`` seconds from ``now``
        (the event loop's clock), or at ``until`` if that comes first (a stop's deadline)."""
        deadline = now + limits.deadline
        return Attempts(
            self, limits.max_attempts, deadline if until is None else min(deadline, until)
        )

    def parting_pause(self, rounds: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds between rounds of sending the last usage of a pod that is ending (container
        mode after SIGTERM), after its ``rounds``-th round that left usage unsent: the calls'
        own backoff (full jitter), since the pod has only its shutdown deadline left."""
        return self.backoff.delay(rounds, rng)

    def grain_retry_at(self, failures: int, now: datetime, deadline: datetime) -> datetime:
        """When to try a grain again after its ``failures``-th failed send: backed off,
        but closer together near its deadline, so one attempt still lands in time."""
        delay = timedelta(seconds=self.grain_backoff.delay(failures))
        return now + min(delay, max((deadline - now) / 2, MIN_GRAIN_RETRY))

    def events_call(self, wait: float = 0.0) -> CallLimits:
        """One call to the events queue: a few attempts within a short deadline, to
        which a receive's long poll adds its ``wait`` seconds."""
        return CallLimits(EVENTS_CALL_ATTEMPTS, EVENTS_CALL_DEADLINE + wait)

    def events_pause(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Seconds before the poller reads the events queue again after its
        ``failures``-th failed receive in a row (full jitter)."""
        return self.events_backoff.delay(failures, rng)

    def events_redelivery(self, receives: int, rng: Callable[[], float] = random.random) -> int:
        """Whole seconds to hide a message whose event could not be applied, after its
        ``receives``-th receive (SQS's ``ApproximateReceiveCount``): at least half the
        step of its curve (the store will not be back within a second), within SQS's
        longest visibility timeout."""
        top = self.events_redelivery_backoff.ceiling(receives)
        delay = top / 2 + rng() * (top / 2)
        return max(1, min(MAX_VISIBILITY_TIMEOUT, round(delay)))

    def gate_pause(
        self, failures: int, *, refused: bool, rng: Callable[[], float] = random.random
    ) -> float:
        """Seconds before the entitlement gate asks again: full jitter after a failure
        that leaves the answer open, at least half the step after a refusal (it will
        not change within a second)."""
        top = self.gate_backoff.ceiling(failures)
        low = top / 2 if refused else 0.0
        return low + rng() * (top - low)


@dataclass(slots=True)
class Attempts:
    """One call's attempts under a ``RetryPolicy`` and an absolute deadline.

    ``now`` and ``deadline`` are in the same clock (the event loop's).
    """

    policy: RetryPolicy
    max_attempts: int
    deadline: float
    made: int = 0
    spent: list[int] = field(default_factory=list)
    rng: Callable[[], float] = random.random

    def start(self, now: float) -> bool:
        """Begin an attempt; ``False`` when the attempts or the time are used up."""
        if self.made >= self.max_attempts or now >= self.deadline:
            return False
        self.made += 1
        return True

    def retry_delay(self, now: float, *, throttled: bool = False) -> float | None:
        """The pause before the next attempt after a retryable failure, or ``None``
        to give up: the attempts or the deadline would be passed, or the budget
        is empty."""
        if self.made >= self.max_attempts:
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
