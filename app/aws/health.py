"""How AWS has been answering us lately, said loudly: a log line, a metric, ``/readyz``.

Usage waits in the queue, safe, whenever AWS refuses our credentials, denies
access, throttles or fails; but a seller must learn why it waits, and since
when, without reading code. Every attempt reports here; the first failure of a
kind is logged (at error level for what a person must fix), the gauge
``metering_aws_problem{cause}`` is 1 while it lasts, and ``/readyz`` names it
("AWS has refused our credentials since 12:03:10Z (InvalidSignatureException)").
The first success clears it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from app.metering.billing import utc_now
from app.metering.errors import Fault
from app.metering.shapes import format_timestamp
from app.runtime.metrics import Metrics

log = logging.getLogger("app.upstream")

_DESCRIPTIONS = {
    Fault.CREDENTIALS: "AWS has refused our credentials",
    Fault.CONFIGURATION: "AWS has refused our calls for this account, role, product or region",
    Fault.THROTTLING: "AWS has been throttling our calls",
    Fault.TRANSIENT: "AWS has been failing or unreachable",
    Fault.UNKNOWN: "AWS has been answering with an error code the sidecar does not know",
}
# What a person has to fix; the rest passes by itself (and is retried meanwhile).
_NEEDS_A_PERSON = frozenset({Fault.CREDENTIALS, Fault.CONFIGURATION, Fault.UNKNOWN})


@dataclass(frozen=True, slots=True)
class Trouble:
    """A kind of failure that has lasted since ``since``."""

    fault: Fault
    code: str
    since: datetime

    def describe(self) -> str:
        """One sentence for ``/readyz`` and the log."""
        return f"{_DESCRIPTIONS[self.fault]} since {format_timestamp(self.since)} ({self.code})"


class UpstreamHealth:
    """The latest kind of trouble with AWS, if any."""

    def __init__(self, metrics: Metrics, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._metrics = metrics
        self._clock = clock
        self._trouble: Trouble | None = None
        for fault in _DESCRIPTIONS:
            metrics.aws_problem.labels(fault.value).set(0)

    @property
    def trouble(self) -> Trouble | None:
        """What is wrong now, or ``None``."""
        return self._trouble

    def failed(self, fault: Fault, code: str, message: str) -> None:
        """An attempt failed for a reason that is not about the request itself."""
        if fault is Fault.REQUEST:
            return
        current = self._trouble
        if current is not None and current.fault is fault and current.code == code:
            return
        if current is not None:
            self._metrics.aws_problem.labels(current.fault.value).set(0)
        self._trouble = Trouble(fault, code, self._clock())
        self._metrics.aws_problem.labels(fault.value).set(1)
        level = logging.ERROR if fault in _NEEDS_A_PERSON else logging.WARNING
        extra = {"cause": fault.value, "code": code}
        # A signature error's message may quote the canonical request, session
        # token included: never log what AWS says about our credentials.
        if fault is not Fault.CREDENTIALS:
            extra["aws_message"] = message[:300]
        log.log(
            level, "AWS is refusing or failing our calls; usage is kept and retried", extra=extra
        )

    def succeeded(self) -> None:
        """AWS took a call: whatever was wrong is over."""
        current = self._trouble
        if current is None:
            return
        self._trouble = None
        self._metrics.aws_problem.labels(current.fault.value).set(0)
        log.info(
            "AWS accepts our calls again",
            extra={"cause": current.fault.value, "since": format_timestamp(current.since)},
        )

    def status(self) -> tuple[bool, str]:
        """(fine, detail) for ``/readyz``."""
        if self._trouble is None:
            return True, "AWS answered the last call"
        return False, self._trouble.describe()
