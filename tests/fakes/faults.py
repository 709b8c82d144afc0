"""Fault injection queue for the fake AWS endpoints.

Tests arm faults from the test thread while the fake consumes them in its server
thread, so the queue is lock-protected and hands out immutable snapshots.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Literal

from .model import modelled_errors, operation_names

__all__ = ["Fault", "FaultKind", "FaultPlan", "InjectedDisconnect"]

FaultKind = Literal[
    "throttle", "server_error", "delay", "drop_connection", "auth_failure", "modelled_error"
]

_DEFAULT_SERVER_ERROR_CODES = {
    500: "InternalServiceErrorException",
    503: "ServiceUnavailableException",
}
# AWS JSON services throttle with 400 (ThrottlingException) or 429; credential
# errors come back as 400 as often as 403.
_THROTTLE_STATUSES = frozenset({400, 429})
_AUTH_FAILURE_STATUSES = frozenset({400, 403})


def _check_status(status: int, allowed: frozenset[int], kind: str) -> None:
    """Reject an HTTP status AWS never uses for this kind of fault."""
    if status not in allowed:
        raise ValueError(f"{kind} status must be one of {sorted(allowed)}, not {status}")


class InjectedDisconnect(Exception):
    """Raised inside a fake's ASGI handler so uvicorn aborts the connection.

    ``serve`` hides uvicorn's "Exception in ASGI application" log for it, since
    the abort is the point rather than a bug.
    """


@dataclass(frozen=True)
class Fault:
    """One armed fault; ``remaining`` counts the requests it still applies to."""

    kind: FaultKind
    remaining: int
    action: str | None = None
    status: int = 400
    code: str = ""
    seconds: float = 0.0


class FaultPlan:
    """Ordered, thread-safe list of faults for one fake.

    A request takes the first armed fault whose action filter matches it, so
    ``throttle(2)`` then ``server_error(1)`` yields two throttles, then a 500.
    """

    def __init__(self) -> None:
        """Start with nothing armed."""
        self._lock = threading.Lock()
        self._queue: list[Fault] = []
        self._unprocessed = 0

    def _arm(self, fault: Fault) -> None:
        if fault.remaining < 0:
            raise ValueError("fault count must be >= 0")
        with self._lock:
            self._queue.append(fault)

    def throttle(
        self,
        n: int,
        action: str | None = None,
        code: str = "ThrottlingException",
        status: int = 400,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` (400 or 429) ``code``.

        ``code`` may be any throttling name AWS uses (``TooManyRequestsException``,
        ``RequestLimitExceeded``, ``Throttling``, ...); the message is "Rate exceeded".
        """
        _check_status(status, _THROTTLE_STATUSES, "throttle")
        if not code:
            raise ValueError("throttle code must not be empty")
        self._arm(Fault("throttle", n, action, status=status, code=code))

    def server_error(
        self, n: int, status: int = 500, code: str | None = None, action: str | None = None
    ) -> None:
        """Answer the next ``n`` matching requests with a 5xx.

        ``code`` defaults to ``InternalServiceErrorException`` for 500 and
        ``ServiceUnavailableException`` for 503.
        """
        chosen = code or _DEFAULT_SERVER_ERROR_CODES.get(status, "InternalServiceErrorException")
        self._arm(Fault("server_error", n, action, status=status, code=chosen))

    def delay(self, seconds: float, n: int, action: str | None = None) -> None:
        """Sleep ``seconds`` before answering the next ``n`` matching requests normally."""
        self._arm(Fault("delay", n, action, seconds=seconds))

    def drop_connection(self, n: int, action: str | None = None) -> None:
        """Break the connection mid-response for the next ``n`` matching requests."""
        self._arm(Fault("drop_connection", n, action))

    def auth_failure(
        self,
        n: int,
        code: str = "ExpiredTokenException",
        action: str | None = None,
        status: int = 403,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` ``code``, signatures valid.

        ``status`` is 403 or 400: AWS JSON services send credential errors
        (``ExpiredTokenException``, ``InvalidClientTokenId``, ...) with either.
        """
        _check_status(status, _AUTH_FAILURE_STATUSES, "auth_failure")
        if not code:
            raise ValueError("auth_failure code must not be empty")
        self._arm(Fault("auth_failure", n, action, status=status, code=code))

    def modelled_error(self, n: int, code: str, action: str | None = None) -> None:
        """Answer the next ``n`` matching requests with ``code``, an error botocore's
        service model lists for ``action`` (for some action, if ``action`` is None), with
        the status AWS gives it there: 500 for a fault (``InternalServiceErrorException``),
        400 for the rest. Signatures are still checked first, as for every fault.
        """
        actions = [action] if action is not None else operation_names()
        statuses = {
            status
            for name in actions
            for modelled, status in modelled_errors(name).items()
            if modelled == code
        }
        if not statuses:
            raise ValueError(f"{code!r} is not an error the model lists for {actions}")
        (status,) = statuses
        self._arm(Fault("modelled_error", n, action, status=status, code=code))

    def unprocessed(self, n: int) -> None:
        """Return the next ``n`` BatchMeterUsage records (across calls) as unprocessed."""
        if n < 0:
            raise ValueError("fault count must be >= 0")
        with self._lock:
            self._unprocessed += n

    def clear(self) -> None:
        """Disarm every fault."""
        with self._lock:
            self._queue.clear()
            self._unprocessed = 0

    def take(self, action: str | None) -> Fault | None:
        """Consume one use of the first fault matching ``action``; ``None`` if none."""
        with self._lock:
            for index, fault in enumerate(self._queue):
                if fault.remaining <= 0 or fault.action not in (None, action):
                    continue
                if fault.remaining == 1:
                    del self._queue[index]
                else:
                    self._queue[index] = replace(fault, remaining=fault.remaining - 1)
                return replace(fault, remaining=1)
            return None

    def take_unprocessed(self) -> bool:
        """Consume one unprocessed-record fault; ``True`` if one was armed."""
        with self._lock:
            if self._unprocessed <= 0:
                return False
            self._unprocessed -= 1
            return True

    def pending(self) -> list[Fault]:
        """Snapshot of the faults still armed (excluding unprocessed-record faults)."""
        with self._lock:
            return [f for f in self._queue if f.remaining > 0]

    @property
    def unprocessed_pending(self) -> int:
        """How many BatchMeterUsage records will still come back unprocessed."""
        with self._lock:
            return self._unprocessed
