"""What the lifespan builds and the routes use: one object, on ``app.state.sidecar``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.actions.registration import EntitlementGate
from app.actions.service import MeteringService
from app.config import Settings
from app.queue.usage_queue import UsageQueue
from app.runtime.metrics import Metrics
from app.runtime.supervisor import Supervisor

# Parts only some settings build: imported by whoever builds them (app.main).
if TYPE_CHECKING:
    from app.actions.events import EventPoller
    from app.aws.credentials import CredentialProvider
    from app.aws.health import UpstreamHealth
    from app.aws.quota import ActionQuotas
    from app.queue.fleet import Fleet


@dataclass(slots=True)
class Sidecar:
    """The running sidecar's parts."""

    settings: Settings
    metrics: Metrics
    service: MeteringService
    credentials: CredentialProvider | None
    endpoint: str | None
    queue: UsageQueue | None = None
    health: UpstreamHealth | None = None
    # The RegisterUsage gate, when METERING_REGISTER_USAGE is on.
    entitlement: EntitlementGate | None = None
    # The background loops, watched.
    supervisor: Supervisor | None = None
    # The events queue's poller, when METERING_EVENTS_QUEUE_URL is set (aws mode).
    events: EventPoller | None = None
    # AWS's request quotas as this replica keeps them (aws mode).
    quotas: ActionQuotas | None = None
    # With a shared store: the fleet's clock, quota and grain rules, as this replica sees them.
    fleet: Fleet | None = None
