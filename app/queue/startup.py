"""Building the usage queue from settings, and stopping it in order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from app.actions.backend import MeteringBackend
from app.config import Settings
from app.metering.billing import utc_now
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.intake import IntakeRules
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy, StoreUnavailable, UsageStore
from app.queue.usage_queue import UsageQueue
from app.runtime.metrics import Metrics
from app.runtime.retry import RetryPolicy
from app.runtime.supervisor import ShutdownDeadline, Spawn

if TYPE_CHECKING:
    from app.queue.fleet import Fleet
    from app.queue.postgres import PostgresStore

log = logging.getLogger("app.queue")
# Seconds of the shutdown budget the spool leaves to the dispatcher and the stores'
# closing when it has usage to move.
_CLOSE_RESERVE = 2.0


def shared_store(
    settings: Settings,
    policy: GrainPolicy,
    *,
    password: Callable[[], str] | None = None,
) -> PostgresStore:
    """The shared PostgreSQL store the settings name (``queue_dsn``), not yet opened."""
    # Imported here: psycopg costs start time and memory a sidecar on SQLite never needs.
    from app.queue.fleet import fleet_values
    from app.queue.postgres import PostgresStore

    assert settings.queue_dsn is not None
    return PostgresStore(
        settings.queue_dsn.get_secret_value(),
        policy,
        pool_size=settings.queue_pool_size,
        statement_timeout=settings.queue_statement_timeout,
        claim_lease=settings.queue_claim_lease,
        fleet_settings=fleet_values(settings),
        password=password,
        connect_timeout=settings.queue_connect_timeout,
        deadline=settings.queue_store_deadline,
        idle_transaction_timeout=settings.queue_idle_transaction_timeout,
    )


async def start_queue(
    settings: Settings,
    backend: MeteringBackend,
    metrics: Metrics,
    retry: RetryPolicy,
    stack: AsyncExitStack,
    *,
    spawn: Spawn,
    deadline: ShutdownDeadline,
    clock: Callable[[], datetime] = utc_now,
    on_fleet: Callable[[Fleet], None] | None = None,
    password: Callable[[], str] | None = None,
) -> UsageQueue:
    """Open the store, start the dispatcher (through ``spawn``); ``stack`` stops both,
    the dispatcher first, each within what ``deadline`` has left.

    With a shared store, the local spool (``app.queue.spool``) opens first, at the
    queue path, and the sidecar starts even if the store does not answer: usage is
    spooled until it does, and the store's migrations run then. Nothing is ever summed
    in the local file, so no grain is split across replicas; the spool only holds
    records until the store takes them.
    """
    policy = GrainPolicy(
        grace=timedelta(seconds=settings.queue_grace),
        windows=settings.windows(),
        margin=timedelta(seconds=settings.queue_expiry_margin),
    )
    spool = None
    store: UsageStore
    if settings.queue_dsn is not None:
        from app.queue.fleet import Fleet, FleetSettingsConflict
        from app.queue.spool import Spool, SpoolFile

        shared = shared_store(settings, policy, password=password)
        spool = Spool(
            SpoolFile(SqliteStore(settings.queue_path, policy)),
            shared,
            metrics,
            retention=timedelta(hours=settings.queue_retention_hours),
            clock=clock,
        )
        try:
            await spool.file.open()
        except StoreUnavailable as exc:
            # Not fatal while the store answers; /readyz says so, and the spool's loop
            # tries again.
            log.error("the local spool cannot be opened", extra={"error": str(exc)})

        async def close_spool() -> None:
            await spool.file.close(budget=deadline.remaining())

        stack.push_async_callback(close_spool)
        try:
            await shared.open(at_start=True)
        except FleetSettingsConflict as exc:
            # This replica's grain rules differ from the fleet's: a configuration error,
            # so the start is refused, naming each difference.
            log.error("refusing to start: " + str(exc))
            raise
        except StoreUnavailable as exc:
            log.error(
                "starting without the shared usage queue: usage goes to the local spool "
                "until it answers",
                extra={"error": str(exc), "path": str(settings.queue_path)},
            )
        store = shared
        fleet = Fleet(shared, clock, metrics=metrics, quota_divisor=settings.quota_fallback_divisor)
        await fleet.measure_quietly()
        spawn("fleet-clock", fleet.run())
        # The fleet's decisions (what is due, what expired, how long a claim holds, when
        # a customer's grace ends) follow the database's clock, not this replica's.
        clock = fleet.clock
        if on_fleet is not None:
            on_fleet(fleet)
    else:
        store = SqliteStore(settings.queue_path, policy)
        await store.open()

    async def close_store() -> None:
        await store.close(budget=deadline.remaining())

    stack.push_async_callback(close_store)
    metrics.queue_commits.set_function(lambda: store.commits)
    dispatcher = Dispatcher(
        store,
        backend,
        metrics,
        DispatchPolicy(
            mode=settings.queue_mode,
            poll_interval=settings.queue_poll_interval,
            retention=timedelta(hours=settings.queue_retention_hours),
            key_retention=timedelta(hours=settings.queue_idempotency_hours),
            grace=timedelta(seconds=settings.queue_grace),
            retry=retry,
            windows=settings.windows(),
            future_tolerance=timedelta(seconds=settings.future_tolerance),
            claim_lease=timedelta(seconds=settings.queue_claim_lease),
        ),
        clock=clock,
    )
    dispatcher.start(spawn)

    async def stop_dispatcher() -> None:
        await dispatcher.stop(budget=deadline.remaining())

    stack.push_async_callback(stop_dispatcher)
    if spool is not None:
        spool.start(spawn)

        async def stop_spool(spool: Spool = spool) -> None:
            # First: what waits in the spool is the one thing a deleted pod can lose.
            await spool.stop(budget=max(0.0, deadline.remaining() - _CLOSE_RESERVE))

        stack.push_async_callback(stop_spool)
    rules = IntakeRules(
        mode=settings.queue_mode,
        product_code=settings.product_code,
        policy=policy,
        future_tolerance=timedelta(seconds=settings.future_tolerance),
    )
    return UsageQueue(
        store,
        dispatcher,
        rules,
        metrics,
        clock=clock,
        customer_grace=timedelta(seconds=settings.customer_end_grace),
        spool=spool,
    )
