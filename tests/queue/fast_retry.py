"""The retry policy the queue's tests give a dispatcher: immediate transport retries,
and a grain kept for another try a minute or more on."""

from __future__ import annotations

from app.runtime.retry import Backoff, CallLimits, RetryBudget, RetryPolicy


def fast_retry(send_attempts: int = 1) -> RetryPolicy:
    """A fresh policy (its own budget), ``send_attempts`` attempts per queued send."""
    return RetryPolicy(
        backoff=Backoff(0.01, 0.01),
        budget=RetryBudget(),
        rest=CallLimits(1, 5),
        wire=CallLimits(1, 5),
        queue=CallLimits(send_attempts, 5),
        grain_backoff=Backoff(60, 600),
    )
