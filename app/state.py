"""What the lifespan builds and the routes use: one object, on ``app.state.sidecar``."""

from __future__ import annotations

from dataclasses import dataclass

from app.aws.credentials import CredentialProvider
from app.aws.health import UpstreamHealth
from app.config import Settings
from app.entitlement import EntitlementGate
from app.lifetime import Supervisor
from app.metrics import Metrics
from app.operations import MeteringService
from app.queue.service import UsageQueue


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
