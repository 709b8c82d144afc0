"""AWS Marketplace's subscription events, taken from the seller's SQS queue and applied.

``EventPoller`` long-polls the events queue (``METERING_EVENTS_QUEUE_URL``) and,
for each message: reads it (``app.metering.subscriptions.parse_event``), hands
the event to the sink, which applies it durably and idempotently by its
``event_id`` and says what became of it (``applied``, ``duplicate``, or
``recorded`` for a kind that changes nothing), and only then deletes the message.
SQS delivers at least once, and with several replicas each polls: any replica
may see a message again (a delete that failed, a visibility timeout that ran
out, a stop between the sink and the delete), and the sink then answers
``duplicate``. Nothing is lost by that; a message deleted before its event was
applied would be.

- A message that is no event (``UnreadableEvent``) is logged once, at error
  level, with its message id and never its body, counted as
  ``metering_events{type="unreadable"}``, and not deleted: the queue's redrive
  policy moves it to its dead-letter queue after ``maxReceiveCount`` receives.
  The ids already logged are remembered (the last ``UNREADABLE_MEMORY``), so
  its redeliveries are not logged again.
- A sink that raises (the store is down) leaves the message: it is counted as
  ``failed``, logged at warning level, and hidden for
  ``RetryPolicy.events_redelivery`` (longer each time it comes back), so that an
  outage spends few of its receives.
- One message's trouble never stops the next.
- When SQS cannot be read (access denied, credentials refused, the queue does
  not exist, unreachable) or its messages cannot be deleted, the poller waits on
  the one retry policy's curve and tries again; ``metering_events_queue_problem``
  is 1 and ``status()`` says why until a call of that kind succeeds again.
  ``/readyz`` shows it as a check that does not block readiness: the app keeps
  metering meanwhile.

Each receive asks for one message: the message's visibility timeout then covers
only its own handling (with ten, the tenth would wait for nine sinks and could
reach another replica meanwhile), and the answer's ceiling stays one message's
(``app.aws.sqs``). Subscription events are a few per customer's lifetime, so a
request per message costs nothing that matters.

At shutdown, a long poll (or a pause) is cancelled at once; an event being
applied is given a moment to be applied and deleted, else it simply comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from app.aws.sqs import MAX_WAIT_SECONDS, SqsMessage, SqsQueue
from app.metering.billing import utc_now
from app.metering.errors import Fault, MeteringError
from app.metering.shapes import format_timestamp
from app.metering.subscriptions import EventKind, SubscriptionEvent, UnreadableEvent, parse_event
from app.runtime.metrics import Metrics
from app.runtime.retry import RetryPolicy
from app.runtime.supervisor import Spawn, plain_spawn

log = logging.getLogger("app.events")

Sink = Callable[[SubscriptionEvent], Awaitable[str]]
"""Applies one event durably, idempotent by its ``event_id``; says what became of it."""

# What a sink may answer; the metric's outcome label takes nothing else.
OUTCOMES = frozenset({"applied", "duplicate", "recorded"})
# Message ids of unreadable messages already logged, most recent last.
UNREADABLE_MEMORY = 4096
# How long a received message stays hidden from other receivers while it is handled.
VISIBILITY_TIMEOUT = 60
# How long a stop waits for an event being applied to be applied and deleted.
STOP_BUDGET = 5.0

_DESCRIPTIONS = {
    Fault.CREDENTIALS: "AWS refused the credentials",
    Fault.CONFIGURATION: "AWS refused this role, queue or key",
    Fault.THROTTLING: "SQS throttled the calls",
    Fault.TRANSIENT: "SQS failed or could not be reached",
    Fault.UNKNOWN: "SQS answered with an error code the sidecar does not know",
    Fault.REQUEST: "SQS refused the request",
}
# What a person has to fix; the rest passes by itself (and is retried meanwhile).
_NEEDS_A_PERSON = frozenset({Fault.CREDENTIALS, Fault.CONFIGURATION, Fault.UNKNOWN})


def type_label(event: SubscriptionEvent) -> str:
    """The metric's ``type`` label: AWS's name for a type the sidecar knows (a fixed,
    small set), else ``unknown``; never a value a sender chose freely."""
    return "unknown" if event.kind is EventKind.UNKNOWN else event.type


@dataclass(frozen=True, slots=True)
class QueueTrouble:
    """Why one kind of call to the events queue has been failing, since when."""

    fault: Fault
    code: str
    since: datetime

    def describe(self, what: str) -> str:
        """One sentence for ``/readyz``: no URL, no account, no AWS message."""
        reason = _DESCRIPTIONS.get(self.fault, "SQS refused the request")
        return f"the events queue cannot be {what} since {format_timestamp(self.since)}: " + (
            f"{reason} ({self.code})"
        )


class EventPoller:
    """Takes subscription events from the SQS queue and applies them (see the module
    docstring). ``start`` runs it as a supervised loop; ``stop`` ends it."""

    def __init__(
        self,
        queue: SqsQueue,
        *,
        sink: Sink,
        metrics: Metrics,
        retry: RetryPolicy,
        wait_seconds: int = MAX_WAIT_SECONDS,
        visibility_timeout: int = VISIBILITY_TIMEOUT,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._queue = queue
        self._sink = sink
        self._metrics = metrics
        self._retry = retry
        self._wait = wait_seconds
        self._visibility = visibility_timeout
        self._clock = clock
        self._sleep = sleep
        self._unreadable: OrderedDict[str, None] = OrderedDict()
        # "read" (ReceiveMessage) and "deleted from" (DeleteMessage) -> trouble.
        self._trouble: dict[str, QueueTrouble] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # True while nothing is in hand: the loop waits on SQS or pauses.
        self._idle = True
        metrics.events_queue_problem.set(0)

    def start(self, spawn: Spawn = plain_spawn) -> None:
        """Run the loop through ``spawn`` (the sidecar's supervisor)."""
        self._task = spawn("events-poller", self.run())

    async def stop(self, budget: float = STOP_BUDGET) -> None:
        """End the loop: at once while it waits on SQS; after the message in hand (at
        most ``budget`` seconds) while it handles one."""
        self._stopping = True
        task = self._task
        if task is None or task.done():
            return
        if self._idle:
            task.cancel()
        else:
            await asyncio.wait({task}, timeout=budget)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def status(self) -> tuple[bool, str]:
        """(reading and deleting, detail) for ``/readyz``."""
        if not self._trouble:
            return True, "reading the events queue"
        return False, "; ".join(
            trouble.describe(what) for what, trouble in sorted(self._trouble.items())
        )

    async def run(self) -> None:
        """The loop: receive, handle each message, again; pause after a failed receive."""
        failures = 0
        while not self._stopping:
            self._idle = True
            try:
                messages = await self._queue.receive(
                    max_messages=1,
                    wait_seconds=self._wait,
                    visibility_timeout=self._visibility,
                )
            except MeteringError as exc:
                failures += 1
                self._failed("read", "ReceiveMessage", exc)
                await self._sleep(self._retry.events_pause(failures))
                continue
            failures = 0
            self._succeeded("read")
            self._idle = False
            for message in messages:
                await self.handle(message)

    async def handle(self, message: SqsMessage) -> str:
        """Read, apply and delete one message; what became of it (an outcome word,
        ``unreadable`` or ``failed``). Never raises for the message's sake."""
        try:
            event = parse_event(message.body, carrier_id=message.message_id)
        except Exception as exc:  # UnreadableEvent, or whatever else the body provokes
            self._unreadable_message(message, exc)
            return "unreadable"
        label = type_label(event)
        try:
            outcome = await self._sink(event)
        except Exception as exc:  # the store is down, or the sink failed otherwise
            self._metrics.events.labels(label, "failed").inc()
            log.warning(
                "a subscription event could not be applied; it will be delivered again",
                extra={
                    "message_id": message.message_id,
                    "event_id": event.event_id,
                    "event_type": label,
                    "receive_count": message.receive_count,
                    "error": getattr(exc, "code", type(exc).__name__),
                },
            )
            await self._redeliver_later(message)
            return "failed"
        known = outcome if outcome in OUTCOMES else "applied"
        self._metrics.events.labels(label, known).inc()
        # The sink logs what the event did; this line ties it to its message.
        log.debug(
            "events queue message handled",
            extra={
                "message_id": message.message_id,
                "event_id": event.event_id,
                "event_type": label,
                "kind": event.kind.value,
                "outcome": known,
            },
        )
        await self._delete(message)
        return known

    def _unreadable_message(self, message: SqsMessage, exc: Exception) -> None:
        """Log and count an unreadable message once; leave it to the redrive policy."""
        if message.message_id in self._unreadable:
            self._unreadable.move_to_end(message.message_id)
            return
        self._unreadable[message.message_id] = None
        while len(self._unreadable) > UNREADABLE_MEMORY:
            self._unreadable.popitem(last=False)
        self._metrics.events.labels("unreadable", "unreadable").inc()
        log.error(
            "a message on the events queue is no AWS Marketplace event; it is left to the "
            "queue's redrive policy (its dead-letter queue)",
            extra={
                "message_id": message.message_id,
                "receive_count": message.receive_count,
                # UnreadableEvent's reason never quotes the body; nothing else is trusted to.
                "reason": str(exc) if isinstance(exc, UnreadableEvent) else type(exc).__name__,
            },
        )

    async def _redeliver_later(self, message: SqsMessage) -> None:
        """Hide a message whose event could not be applied for longer each time; if that
        fails, it comes back after the receive's visibility timeout anyway."""
        seconds = self._retry.events_redelivery(message.receive_count)
        try:
            await self._queue.change_visibility(message.receipt_handle, seconds)
        except MeteringError as exc:
            log.info(
                "the message comes back after its visibility timeout instead",
                extra={"message_id": message.message_id, "code": exc.code},
            )

    async def _delete(self, message: SqsMessage) -> None:
        try:
            await self._queue.delete(message.receipt_handle)
        except MeteringError as exc:
            if exc.fault is Fault.REQUEST:
                # Its visibility ran out and it was received again: it comes back, and
                # applying it again changes nothing.
                log.warning(
                    "an applied event's message could not be deleted; it will come back",
                    extra={"message_id": message.message_id, "code": exc.code},
                )
                return
            self._failed("deleted from", "DeleteMessage", exc)
        else:
            self._succeeded("deleted from")

    def _failed(self, what: str, action: str, exc: MeteringError) -> None:
        fault = exc.fault or Fault.UNKNOWN
        current = self._trouble.get(what)
        if current is not None and current.fault is fault and current.code == exc.code:
            return
        trouble = QueueTrouble(fault, exc.code, self._clock())
        self._trouble[what] = trouble
        self._metrics.events_queue_problem.set(1)
        # AWS's message is left out: it names accounts, and for a refusal of the
        # credentials may quote the signed request; the action and code say what to fix.
        log.log(
            logging.ERROR if fault in _NEEDS_A_PERSON else logging.WARNING,
            "the events queue is failing; events wait in it and are tried again",
            extra={"action": action, "cause": fault.value, "code": exc.code},
        )

    def _succeeded(self, what: str) -> None:
        trouble = self._trouble.pop(what, None)
        if trouble is None:
            return
        if not self._trouble:
            self._metrics.events_queue_problem.set(0)
        log.info(
            f"the events queue can be {what} again",
            extra={"since": format_timestamp(trouble.since), "code": trouble.code},
        )
