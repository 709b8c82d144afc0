"""AWS's request quotas, kept on our side: one rate limiter per action.

AWS allows 10 MeterUsage and 10 BatchMeterUsage requests per second, and 5
RegisterUsage, per account and region, and answers ``ThrottlingException``
beyond that. Sending past the quota only buys throttles and retries that eat
into it further, so every attempt (REST, wire protocol and queue alike) first
takes a slot here. A slot is a reservation in a token bucket (the generic cell
rate algorithm): the call learns at once when its turn comes, and one whose
turn lies beyond its deadline is told so immediately instead of waiting in vain.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

from app.metering.errors import QuotaExhausted

# A slot is worth taking only with this long left before the call's deadline for
# AWS to answer; a later one is refused at once (429) rather than timing out (504).
ANSWER_TIME = 1.0


class RequestQuota:
    """Requests per second for one action, with a burst of ``burst`` at once.

    ``rate`` 0 means no limit.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self._interval = 1.0 / rate if rate > 0 else 0.0
        burst = max(1.0, burst if burst is not None else rate)
        # How far ahead of the steady pace a request may go: the burst.
        self._tolerance = (burst - 1.0) * self._interval
        # The theoretical arrival time of the next request at the steady pace.
        self._next = -math.inf

    def reserve(self, now: float, latest: float) -> float | None:
        """Reserve the next slot: seconds to wait for it, or ``None`` (nothing
        reserved) if it comes after ``latest``."""
        if self._interval == 0.0:
            return 0.0
        start = max(self._next, now)
        allowed_at = max(now, start - self._tolerance)
        if allowed_at > latest:
            return None
        self._next = start + self._interval
        return allowed_at - now

    def wait_for_slot(self, now: float) -> float:
        """Seconds until a slot would be free (a fair ``Retry-After``)."""
        if self._interval == 0.0:
            return 0.0
        return max(0.0, self._next - self._tolerance - now)


class ActionQuotas:
    """The per-action limiters every send goes through."""

    def __init__(
        self,
        rates: Mapping[str, float],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._quotas = {action: RequestQuota(rate) for action, rate in rates.items()}
        self._sleep = sleep

    async def acquire(self, action: str, deadline: float) -> None:
        """Wait for ``action``'s next slot; raise ``QuotaExhausted`` (429, with
        ``Retry-After``) at once if it would leave AWS less than ``ANSWER_TIME`` before
        ``deadline`` (loop time). A slot free right now is always taken: then the
        quota is not what stands in the way."""
        quota = self._quotas.get(action)
        if quota is None:
            return
        now = asyncio.get_running_loop().time()
        wait = quota.reserve(now, max(now, deadline - ANSWER_TIME))
        if wait is None:
            retry_after = quota.wait_for_slot(now)
            raise QuotaExhausted(
                f"AWS allows {quota.rate:g} {action} requests per second for this sidecar "
                f"(METERING_QUOTA_*); the next free slot is {retry_after:.1f} s away, past "
                "this call's deadline",
                retry_after=max(1.0, retry_after),
            )
        if wait > 0:
            await self._sleep(wait)
