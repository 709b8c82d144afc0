"""AWS's request quotas, kept on our side: one rate limiter per action.

AWS allows 10 MeterUsage and 10 BatchMeterUsage requests per second, and 5
RegisterUsage, per account and region, and answers ``ThrottlingException``
beyond that. Sending past the quota only buys throttles and retries that eat
into it further, so every attempt (REST, wire protocol and queue alike) first
takes a slot here. A slot is a reservation in a token bucket (the generic cell
rate algorithm): the call learns at once when its turn comes, and one whose
turn lies beyond its deadline is told so immediately instead of waiting in vain.

Three things decide a slot, in this order:

- **AWS's own answers.** After a ``ThrottlingException`` this replica slows down
  by itself, as botocore's adaptive retry mode does (its CUBIC rate calculator and
  rate clock, ``botocore.retries``): the rate drops to 70 % of what it was sending
  at, climbs back on the CUBIC curve as answers come back unthrottled (within
  seconds), and stops limiting once it is back at the configured rate. So other senders in the
  account (another product, a batch job, a replica of an older version) are
  tolerated instead of met with a storm of retries.
- **The account's quota, shared by the fleet** (``share``): with a shared store
  every replica takes its slots from one budget kept there
  (``app.queue.fleet``), so N replicas together keep to the quota whatever N is.
  If the budget cannot be reached, this replica falls back to the account's rate
  divided by a safe figure (``fallback_divisor``), says so (a log line, the gauge
  ``metering_quota_shared_unreachable``, ``/readyz``), and tries the budget again
  a few seconds later: sending never stops for it.
- **Otherwise this sidecar's own bucket** at the configured rate (SQLite: one
  sidecar owns the queue, and the figures are its own).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import NoReturn, Protocol

from botocore.retries import adaptive, bucket, throttling

from app.metering.billing import utc_now
from app.metering.errors import QuotaExhausted
from app.metering.shapes import format_timestamp
from app.runtime.metrics import Metrics

log = logging.getLogger("app.upstream")

# A slot is worth taking only with this long left before the call's deadline for
# AWS to answer; a later one is refused at once (429) rather than timing out (504).
ANSWER_TIME = 1.0
# botocore's adaptive mode never goes below this many requests per second.
MIN_ADAPTIVE_RATE: float = getattr(bucket.TokenBucket, "_MIN_RATE", 0.5)
# ... nor above twice the rate it measured itself sending at.
MAX_RATE_ADJUST_SCALE: float = getattr(adaptive.ClientRateLimiter, "_MAX_RATE_ADJUST_SCALE", 2.0)
# The burst the adaptive rate lets through at once for an action without a quota.
DEFAULT_BURST = 10.0
# After the shared budget failed, sends use the fallback this long before it is
# asked again: a store that does not answer must not cost every send its deadline.
SHARED_RETRY_AFTER = 5.0


class RequestQuota:
    """Requests per second for one action, with a burst of ``burst`` at once.

    ``rate`` 0 means no limit.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        # The theoretical arrival time of the next request at the steady pace.
        self._next = -math.inf
        self._burst = burst
        self._interval = 0.0
        self.retune(rate)

    def retune(self, rate: float, now: float | None = None) -> None:
        """Keep to ``rate`` from ``now`` on. The slots handed out ahead of ``now`` stay
        handed out, as many of them, at the new pace."""
        interval = 1.0 / rate if rate > 0 else 0.0
        if now is not None and self._next > now and self._interval > 0 and interval > 0:
            self._next = now + (self._next - now) * interval / self._interval
        self.rate = rate
        self._interval = interval
        burst = max(1.0, self._burst if self._burst is not None else rate)
        # How far ahead of the steady pace a request may go: the burst.
        self._tolerance = (burst - 1.0) * self._interval

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


class _Clock:
    """botocore's clock interface (``current_time``) on a clock of ours."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now

    def current_time(self) -> float:
        return self._now()


class AdaptiveRate:
    """How fast this replica may send one action after AWS throttled it: botocore's
    adaptive retry mode, on botocore's own ``CubicCalculator`` and ``RateClocker``.

    Until the first throttling answer nothing is limited. A throttling answer sets
    the rate to 70 % of the rate this replica was sending at (measured from AWS's
    answers, and never above twice that); every other answer lets it climb back on
    the CUBIC curve, and once it reaches ``ceiling`` (the configured quota) the
    action is no longer limited here.
    """

    def __init__(self, ceiling: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = ceiling if ceiling > 0 else math.inf
        self._clock = clock
        self._cubic = throttling.CubicCalculator(starting_max_rate=0, start_time=clock())
        self._measured = adaptive.RateClocker(_Clock(clock))
        self.limiting = False
        self.rate = self.ceiling
        # The sustained rate is what draws throttles; a burst of the configured size (a
        # second's worth, as AWS's own bucket allows) still goes out at once, so that one
        # call's retries are paced by the retry policy, not by this. Retuned to ``rate``
        # (on the loop's clock) before each slot is taken from it.
        self.pace = RequestQuota(0.0, burst=ceiling if ceiling > 0 else DEFAULT_BURST)
        self.throttles = 0

    def current(self) -> float:
        """The rate in effect now: it climbs back with time alone, on the CUBIC curve of
        the last throttle, so a replica that stopped sending is not held back by a
        throttle long past."""
        if self.limiting:
            self._set(max(MIN_ADAPTIVE_RATE, float(self._cubic.success_received(self._clock()))))
        return self.rate

    def answered(self, *, throttled: bool) -> None:
        """AWS answered a request of this action (throttled or not)."""
        measured = float(self._measured.record())
        now = self._clock()
        if throttled:
            self.throttles += 1
            basis = min(measured, self.rate) if self.limiting else measured
            new = float(self._cubic.error_received(basis, now))
            self.limiting = True
            rate = max(MIN_ADAPTIVE_RATE, min(new, MAX_RATE_ADJUST_SCALE * measured))
        elif self.limiting:
            # botocore also keeps the climb under twice the measured rate, which holds a
            # client whose traffic is sporadic at its lowest rate for as long as it stays
            # sporadic; metering comes in bursts (an hour's grains at once), so here the
            # rate climbs back with time alone, on the same curve: a few seconds after
            # the last throttle it is back at the configured rate.
            rate = max(MIN_ADAPTIVE_RATE, float(self._cubic.success_received(now)))
        else:
            return
        if throttled:
            self.rate = min(rate, self.ceiling)
        else:
            self._set(rate)

    def _set(self, rate: float) -> None:
        """Climb to ``rate``; at the ceiling, stop limiting."""
        if rate >= self.ceiling:
            self.limiting = False
            self.rate = self.ceiling
            return
        self.rate = max(self.rate, rate)


class SharedBudget(Protocol):
    """The account's request quota, kept where every replica of the fleet takes its slots
    (``app.queue.fleet.FleetQuota``, in the shared store)."""

    async def reserve(self, action: str, rate: float, max_wait: float) -> tuple[bool, float]:
        """Reserve ``action``'s next slot at ``rate`` requests per second for the whole
        fleet: ``(True, seconds to wait for it)``, or ``(False, seconds until one would
        be free)`` with nothing reserved when it comes later than ``max_wait`` seconds
        from now. Raises when the budget cannot be reached."""
        ...

    def fallback_divisor(self) -> float:
        """While the budget cannot be reached, each replica keeps to the account's rate
        divided by this."""
        ...


def _rate_text(rate: float) -> str:
    return "no limit" if not math.isfinite(rate) or rate <= 0 else f"{rate:.3g}/s"


class ActionQuotas:
    """The per-action limiters every send goes through (see the module docstring)."""

    def __init__(
        self,
        rates: Mapping[str, float],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utc_now,
        metrics: Metrics | None = None,
    ) -> None:
        self._rates = dict(rates)
        self._quotas = {action: RequestQuota(rate) for action, rate in rates.items()}
        self._adaptive = {action: AdaptiveRate(rate, clock) for action, rate in rates.items()}
        self._sleep = sleep
        self._clock = clock
        self._wall = wall
        self._metrics = metrics
        self._shared: SharedBudget | None = None
        # While the shared budget cannot be reached: since when, why, and when to ask
        # it again (``_clock`` time); the fallback buckets meanwhile.
        self._shared_problem: tuple[datetime, str] | None = None
        self._shared_retry_at = 0.0
        self._fallback: dict[str, RequestQuota] = {}
        self._divisor = 1.0
        if metrics is not None:
            for action, rate in rates.items():
                metrics.quota_adaptive_rate.labels(action).set(rate)

    def share(self, budget: SharedBudget) -> None:
        """Take slots from ``budget``, the fleet's, from now on."""
        self._shared = budget
        if self._metrics is not None:
            self._metrics.quota_shared_unreachable.set(0)

    async def acquire(self, action: str, deadline: float) -> None:
        """Wait for ``action``'s next slot; raise ``QuotaExhausted`` (429, with
        ``Retry-After``) at once if it would leave AWS less than ``ANSWER_TIME`` before
        ``deadline`` (loop time). A slot free right now is always taken: then the
        quota is not what stands in the way."""
        rate = self._rates.get(action)
        if rate is None:
            return
        loop = asyncio.get_running_loop()
        adaptive = self._adaptive[action]
        if adaptive.limiting and adaptive.current() < adaptive.ceiling:
            adaptive.pace.retune(adaptive.rate, loop.time())
            await self._take(
                action,
                adaptive.pace,
                deadline,
                f"AWS has been throttling {action}: this replica slowed down to "
                f"{_rate_text(adaptive.rate)}",
            )
        if rate <= 0:
            return
        if self._shared is not None and self._clock() >= self._shared_retry_at:
            started = loop.time()
            try:
                taken, wait = await self._shared.reserve(
                    action, rate, max(started, deadline - ANSWER_TIME) - started
                )
            except Exception as exc:  # whatever it is, sending goes on without it
                self._shared_failed(exc)
            else:
                self._shared_answered(loop.time() - started)
                if not taken:
                    self._refuse(
                        action,
                        f"AWS allows {rate:g} {action} requests per second for the account, "
                        "shared by the fleet (METERING_QUOTA_*)",
                        wait,
                    )
                if wait > 0:
                    await self._sleep(wait)
                return
        if self._shared is not None:
            quota = self._fallback_quota(action, rate)
            why = (
                f"the fleet's quota cannot be reached: this replica keeps to {rate:g} {action} "
                f"requests per second divided by {self._divisor:g}"
            )
        else:
            quota = self._quotas[action]
            why = (
                f"AWS allows {quota.rate:g} {action} requests per second for this sidecar "
                "(METERING_QUOTA_*)"
            )
        await self._take(action, quota, deadline, why)

    async def _take(self, action: str, quota: RequestQuota, deadline: float, why: str) -> None:
        now = asyncio.get_running_loop().time()
        wait = quota.reserve(now, max(now, deadline - ANSWER_TIME))
        if wait is None:
            self._refuse(action, why, quota.wait_for_slot(now))
        if wait:
            await self._sleep(wait)

    @staticmethod
    def _refuse(action: str, why: str, retry_after: float) -> NoReturn:
        raise QuotaExhausted(
            f"{why}; the next free slot is {retry_after:.1f} s away, past this call's deadline",
            retry_after=max(1.0, retry_after),
        )

    def answered(self, action: str, *, throttled: bool) -> None:
        """AWS answered a request of ``action``: throttled, or not (any other answer)."""
        rate = self._adaptive.get(action)
        if rate is None:
            return
        limiting = rate.limiting
        rate.answered(throttled=throttled)
        if rate.limiting and not limiting:
            log.warning(
                "AWS throttled us: this replica slows down by itself until AWS lets it "
                "climb back (other senders share the account's quota)",
                extra={"action": action, "rate": round(rate.rate, 3)},
            )
        elif limiting and not rate.limiting:
            log.info(
                "back at the configured request rate after AWS throttled us",
                extra={"action": action, "rate": rate.ceiling},
            )
        if self._metrics is not None:
            self._metrics.quota_adaptive_rate.labels(action).set(
                rate.rate if math.isfinite(rate.rate) else 0
            )

    def _fallback_quota(self, action: str, rate: float) -> RequestQuota:
        quota = self._fallback.get(action)
        if quota is None:
            quota = self._fallback[action] = RequestQuota(rate / self._divisor)
        return quota

    def _shared_failed(self, exc: Exception) -> None:
        assert self._shared is not None
        self._shared_retry_at = self._clock() + SHARED_RETRY_AFTER
        if self._shared_problem is not None:
            return
        detail = f"{type(exc).__name__}: {exc}"[:300]
        self._shared_problem = (self._wall(), detail)
        divisor = max(1.0, float(self._shared.fallback_divisor()))
        if divisor != self._divisor or not self._fallback:
            self._divisor = divisor
            self._fallback = {}
        if self._metrics is not None:
            self._metrics.quota_shared_unreachable.set(1)
        log.error(
            "the fleet's request quota cannot be reached in the shared store: this replica "
            "keeps to the account's quota divided by the fallback divisor until it can",
            extra={"error": detail, "divisor": divisor},
        )

    def _shared_answered(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.quota_slot_seconds.observe(seconds)
        if self._shared_problem is None:
            return
        since = format_timestamp(self._shared_problem[0])
        self._shared_problem = None
        if self._metrics is not None:
            self._metrics.quota_shared_unreachable.set(0)
        log.warning("the fleet's request quota is shared again", extra={"since": since})

    def status(self) -> tuple[bool, str]:
        """(the quota is kept as configured, detail) for ``/readyz``."""
        parts: list[str] = []
        ok = True
        if self._shared is None:
            parts.append("kept by this sidecar alone")
        elif self._shared_problem is None:
            parts.append("the account's quota, shared by the fleet through the shared store")
        else:
            ok = False
            since, detail = self._shared_problem
            parts.append(
                f"the fleet's quota cannot be reached in the shared store since "
                f"{format_timestamp(since)} ({detail}): this replica keeps to the account's "
                f"quota divided by {self._divisor:g}"
            )
        for action, rate in sorted(self._adaptive.items()):
            if rate.limiting:
                parts.append(
                    f"AWS throttled {action}: this replica sends it at "
                    f"{_rate_text(rate.rate)} at most until AWS lets it climb back "
                    f"(configured: {_rate_text(rate.ceiling)})"
                )
        return ok, "; ".join(parts)
