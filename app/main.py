"""The application: ``create_app(settings)`` wires routers, handlers and the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app import __version__
from app.actions.backend import MeteringBackend
from app.actions.registration import EntitlementGate
from app.actions.sandbox import SandboxBackend
from app.actions.service import MeteringService
from app.api.context import install_request_context
from app.api.openapi import install_openapi
from app.api.problems import install_problem_handlers
from app.api.routes import calls, customers, entitlement, probes, usage, wire
from app.config import Settings
from app.metering.billing import utc_now
from app.queue.startup import start_queue
from app.runtime.metrics import Metrics
from app.runtime.retry import RetryPolicy
from app.runtime.supervisor import ShutdownDeadline, Supervisor
from app.state import Sidecar

# What only some settings use is imported where they use it (tests/test_footprint.py):
# the upstream's client and backend in aws mode, the events queue's poller with
# METERING_EVENTS_QUEUE_URL, the RDS token signer with METERING_QUEUE_IAM_AUTH, and
# the credentials with either.
if TYPE_CHECKING:
    from app.actions.events import EventPoller
    from app.aws.credentials import CredentialProvider
    from app.aws.health import UpstreamHealth
    from app.aws.quota import ActionQuotas
    from app.aws.rds_auth import RdsTokens
    from app.aws.sqs import SqsQueue
    from app.queue.fleet import Fleet

log = logging.getLogger("app")


# Every router the API listener serves.
ROUTERS = (
    calls.router,
    entitlement.router,
    usage.router,
    customers.router,
    probes.router,
    wire.router,
)


def rds_tokens(settings: Settings, credentials: CredentialProvider) -> RdsTokens:
    """The shared store's password with RDS IAM authentication: a new token each time,
    signed with ``credentials`` for the database the DSN names."""
    from app.aws.rds_auth import RdsTokens, database_of

    assert settings.queue_dsn is not None
    database = database_of(
        settings.queue_dsn.get_secret_value(),
        region=settings.queue_iam_region,
        default_region=settings.region,
    )
    return RdsTokens(database, credentials.current)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    """Build the sidecar app. The lifespan owns every resource and closes them in reverse."""
    settings = settings or Settings()
    metrics = Metrics()
    # One budget for the whole stop, begun by the server at the first signal.
    shutdown = ShutdownDeadline(settings.shutdown_timeout)
    metrics.sandbox.set(1 if settings.mode == "sandbox" else 0)

    async def start_credentials(
        stack: AsyncExitStack, supervisor: Supervisor
    ) -> CredentialProvider:
        """botocore's credential chain, refreshed in the background, closed with ``stack``."""
        from app.aws.credentials import CredentialProvider

        provider = CredentialProvider(
            refresh_margin=settings.credential_refresh_margin,
            retry_interval=settings.credential_retry_interval,
            metrics=metrics,
            clock=clock,
        )
        await provider.start(supervisor.spawn)
        stack.push_async_callback(provider.close)
        return provider

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            # Closed last: whatever loop a component left running is cancelled.
            supervisor = Supervisor()
            stack.push_async_callback(supervisor.aclose)
            metrics.background_stopped.set_function(supervisor.stopped)
            # The one retry policy every part that sends consults, with one budget.
            retry = RetryPolicy.from_settings(settings)
            credentials: CredentialProvider | None = None
            quotas: ActionQuotas | None = None
            health: UpstreamHealth | None = None
            endpoint: str | None = None
            events_queue: SqsQueue | None = None
            backend: MeteringBackend
            if settings.mode == "sandbox":
                backend = SandboxBackend(product_code=settings.product_code, clock=clock)
            else:
                from app.actions.upstream import AwsMeteringBackend
                from app.aws.endpoint import resolve_endpoint
                from app.aws.health import UpstreamHealth
                from app.aws.http_client import create_client
                from app.aws.quota import ActionQuotas

                endpoint = await asyncio.to_thread(
                    resolve_endpoint, settings.region, settings.endpoint_url
                )
                credentials = await start_credentials(stack, supervisor)
                client = create_client(settings)
                stack.push_async_callback(client.aclose)
                health = UpstreamHealth(metrics, clock=clock)
                quotas = ActionQuotas(settings.quotas(), metrics=metrics, wall=clock)
                backend = AwsMeteringBackend(
                    client,
                    endpoint=endpoint,
                    region=settings.region,
                    credentials=credentials,
                    quotas=quotas,
                    health=health,
                    metrics=metrics,
                )
                if settings.events_queue_url is not None:
                    from app.aws.sqs import SqsQueue

                    # On the same client: its proxies, CA trust and pool, closed after it.
                    events_queue = SqsQueue(
                        client,
                        settings.events_queue_url,
                        region=settings.events_region,
                        credentials=credentials,
                        retry=retry,
                    )
            service = MeteringService(backend, settings, metrics, retry, clock=clock)
            # RDS IAM authentication: the shared store's connections get fresh tokens signed
            # with the sidecar's own credentials (in the sandbox too, which sends nothing
            # else to AWS).
            password: Callable[[], str] | None = None
            if settings.queue_iam_auth:
                if credentials is None:
                    credentials = await start_credentials(stack, supervisor)
                password = rds_tokens(settings, credentials)
            # With a shared store: what the replicas share beside the usage (the account's
            # request quota, the database's clock, the grain rules).
            fleets: list[Fleet] = []
            queue = await start_queue(
                settings,
                backend,
                metrics,
                retry,
                stack,
                spawn=supervisor.spawn,
                deadline=shutdown,
                clock=clock,
                on_fleet=fleets.append,
                password=password,
            )
            fleet = fleets[0] if fleets else None
            if fleet is not None and quotas is not None:
                quotas.share(fleet.quota)
            # Every ResolveCustomer answer registers its customer; every direct
            # BatchMeterUsage is checked against the registry.
            service.use_registry(queue)
            gate: EntitlementGate | None = None
            if settings.register_usage:
                # Both modes: the sandbox answers RegisterUsage locally.
                gate = EntitlementGate(service, settings, retry, clock=clock)
                gate.start(supervisor.spawn)
                stack.push_async_callback(gate.stop)
            events: EventPoller | None = None
            if events_queue is not None:
                from app.actions.events import STOP_BUDGET, EventPoller

                # aws mode only: in the sandbox, POST /v1/events takes the events.
                events = EventPoller(
                    events_queue, sink=queue.apply_event, metrics=metrics, retry=retry
                )
                events.start(supervisor.spawn)
                log.info(
                    "taking subscription events from the events queue",
                    extra={"events_region": settings.events_region},
                )

                async def stop_events(poller: EventPoller = events) -> None:
                    # Before the queue closes: an event in hand is applied and deleted.
                    await poller.stop(min(STOP_BUDGET, shutdown.remaining()))

                stack.push_async_callback(stop_events)
            app.state.sidecar = Sidecar(
                settings,
                metrics,
                service,
                credentials,
                endpoint,
                queue,
                health,
                entitlement=gate,
                supervisor=supervisor,
                events=events,
                quotas=quotas,
                fleet=fleet,
            )
            # Where the API and the probes are to be reached, for whoever reads the log
            # first when they cannot be; an IPv6 host in brackets keeps its port apart.
            log.info(
                "metering-sidecar started",
                extra={
                    "version": __version__,
                    "mode": settings.mode,
                    "region": settings.region,
                    "endpoint": endpoint,
                    "api_listener": (
                        f"[{settings.host}]:{settings.port}"
                        if ":" in settings.host
                        else f"{settings.host}:{settings.port}"
                    ),
                    "ops_listener": (
                        "off"
                        if settings.ops_port == 0
                        else f"[{settings.ops_host}]:{settings.ops_port}"
                        if ":" in settings.ops_host
                        else f"{settings.ops_host}:{settings.ops_port}"
                    ),
                },
            )
            yield
            supervisor.shutting_down()
            log.info("metering-sidecar stopping")

    app = FastAPI(
        title="metering-sidecar",
        version=__version__,
        summary="AWS Marketplace Metering as plain HTTP on localhost.",
        lifespan=lifespan,
        # The sidecar's telemetry is its Prometheus metrics and logs. FastAPI's own
        # OpenTelemetry would otherwise look up the global providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    for router in ROUTERS:
        app.include_router(router)
    install_problem_handlers(app, ROUTERS)
    app.state.shutdown = shutdown
    install_openapi(app)
    install_request_context(
        app,
        metrics=metrics,
        auth_token=settings.auth_token.get_secret_value() if settings.auth_token else None,
        sandbox=settings.mode == "sandbox",
        access_log_enabled=settings.access_log,
    )
    return app
