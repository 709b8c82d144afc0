"""Building the usage queue from settings, and stopping it in order."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta

from app.actions.backend import MeteringBackend
from app.config import Settings
from app.metering.billing import utc_now
from app.queue.dispatcher import Dispatcher, DispatchPolicy
from app.queue.intake import IntakeRules
from app.queue.sqlite import SqliteStore
from app.queue.store import GrainPolicy, UsageStore
from app.queue.usage_queue import UsageQueue
from app.runtime.metrics import Metrics
from app.runtime.retry import RetryPolicy
from app.runtime.supervisor import ShutdownDeadline, Spawn


def open_store(settings: Settings, policy: GrainPolicy) -> UsageStore:
    """The store the settings name: the shared PostgreSQL database, or the SQLite file.

    Never a silent fallback: a DSN that cannot be reached fails the start,
    since usage summed in a local file would split a grain across replicas.
    """
    if settings.queue_dsn is not None:
        # Imported here: psycopg costs start time and memory a sidecar on SQLite
        # never needs.
        from app.queue.postgres import PostgresStore

        return PostgresStore(
            settings.queue_dsn.get_secret_value(),
            policy,
            pool_size=settings.queue_pool_size,
            statement_timeout=settings.queue_statement_timeout,
            claim_lease=settings.queue_claim_lease,
        )
    return SqliteStore(settings.queue_path, policy)


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
) -> UsageQueue:
    """Open the store, start the dispatcher (through ``spawn``); ``stack`` stops both,
    the dispatcher first, each within what ``deadline`` has left."""
    policy = GrainPolicy(
        grace=timedelta(seconds=settings.queue_grace),
        windows=settings.windows(),
        margin=timedelta(seconds=settings.queue_expiry_margin),
    )
    store = open_store(settings, policy)
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
        ),
        clock=clock,
    )
    dispatcher.start(spawn)

    async def stop_dispatcher() -> None:
        await dispatcher.stop(budget=deadline.remaining())

    stack.push_async_callback(stop_dispatcher)
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
    )
