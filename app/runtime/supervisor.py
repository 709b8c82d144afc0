"""What lives as long as the sidecar: its background loops, and the deadline it stops by.

``Supervisor`` runs the background loops (the credential refresh, the queue's
dispatcher, the entitlement gate) as named tasks. A loop that ends while the
sidecar runs (it crashed, or returned) is a fault nobody would otherwise see:
it is logged at error level with its exception, ``/readyz`` says ``degraded``
naming it and ``metering_background_loops_stopped`` counts it until the process
is restarted. Not unready: usage is still taken durably, and a native sidecar's
readiness is its pod's, so failing it would take the app out of its Service for
a fault of the sidecar's own; the alert on the metric is how a person hears of
it. Chosen over stopping the process at once: a SIGTERM-style stop would flush
nothing more than a restart does, and readiness says why.

``ShutdownDeadline`` is the one budget a stop spends, ``METERING_SHUTDOWN_TIMEOUT``
in all, counted from the signal: uvicorn's drain of in-flight requests, then
the dispatcher's last cycle (and, in container mode, the partial hour), then
the store's close, each getting what the ones before left. The Helm chart
checks the pod's grace period against the same setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

log = logging.getLogger("app.lifetime")


class Spawn(Protocol):
    """What ``Supervisor.spawn`` is, and what components accept in its place."""

    def __call__(
        self, name: str, coroutine: Coroutine[Any, Any, None], *, finishes: bool = False
    ) -> asyncio.Task[None]:
        """Run ``coroutine`` as the task ``name``."""
        ...


def plain_spawn(
    name: str, coroutine: Coroutine[Any, Any, None], *, finishes: bool = False
) -> asyncio.Task[None]:
    """A task with no supervisor (components used on their own, as in tests)."""
    del finishes
    return asyncio.create_task(coroutine, name=name)


class Supervisor:
    """The background loops of the sidecar, watched."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, str] = {}
        self._finite: set[str] = set()
        self._closing = False

    def spawn(
        self, name: str, coroutine: Coroutine[Any, Any, None], *, finishes: bool = False
    ) -> asyncio.Task[None]:
        """Run ``coroutine`` as the loop ``name``; ``finishes``: it may end by design (the
        entitlement gate, once registered), and only an exception is a fault then."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks[name] = task
        if finishes:
            self._finite.add(name)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        name = task.get_name()
        if self._closing or task.cancelled():
            return
        error = task.exception()
        if error is None and name in self._finite:
            return
        detail = f"the background loop {name} stopped" + (f": {error!r}" if error else "")
        self._failures[name] = detail
        log.error(
            "a background loop stopped; the sidecar is degraded until restarted",
            extra={"loop": name},
            exc_info=error,
        )

    def shutting_down(self) -> None:
        """The sidecar is stopping: loops that end now end by design."""
        self._closing = True

    def stopped(self) -> int:
        """How many loops have stopped while the sidecar runs (faults)."""
        return len(self._failures)

    def status(self) -> tuple[bool, str]:
        """(all loops running, detail) for ``/readyz``."""
        if self._failures:
            return False, "; ".join(sorted(self._failures.values()))
        names = ", ".join(sorted(n for n, t in self._tasks.items() if not t.done())) or "none"
        return True, f"running: {names}"

    async def aclose(self, budget: float = 5.0) -> None:
        """Cancel every loop still running and wait for them, ``budget`` seconds at most."""
        self._closing = True
        running = [task for task in self._tasks.values() if not task.done()]
        for task in running:
            task.cancel()
        if running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(budget):
                    await asyncio.gather(*running, return_exceptions=True)


class ShutdownDeadline:
    """The one shutdown budget, counted from the first signal (see the module docstring)."""

    def __init__(self, total: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self._clock = clock
        self._began: float | None = None

    def begin(self) -> None:
        """The stop has begun (the first SIGTERM or SIGINT); later calls change nothing."""
        if self._began is None:
            self._began = self._clock()

    def remaining(self) -> float:
        """Seconds left of the budget (all of it before the stop began)."""
        if self._began is None:
            return self.total
        return max(0.0, self.total - (self._clock() - self._began))
