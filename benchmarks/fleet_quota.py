"""What a slot of the fleet's request quota costs a send (app.queue.fleet).

With a shared store every send to AWS first takes a slot of the account's quota
in the store: one statement (``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``
on the action's row) in autocommit, through the store's own pool and call path
(``PostgresStore.run_fleet``). This measures that path on a throwaway
PostgreSQL server on the same machine, beside the in-process bucket a sidecar
on SQLite uses:

- one replica taking slots one after another (a rate high enough that no slot
  waits): wall time and client CPU per slot;
- three replicas (three stores, three pools) taking slots of the same action at
  once: slots per second, the cost of their contending for one row.

A send costs a round trip to AWS (tens of milliseconds); the slot adds one
short round trip to the database. Run on its own:

    .venv/bin/python -m benchmarks.fleet_quota [--slots 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from dataclasses import dataclass
from datetime import timedelta

from app.aws.quota import RequestQuota
from app.queue.fleet import FleetQuota
from app.queue.postgres import PostgresStore
from app.queue.store import GrainPolicy
from tests.pg import PgServer

# So many slots a second that none waits: what is measured is the slot itself.
UNPACED = 1_000_000.0
REPLICAS = 3


@dataclass(frozen=True)
class SlotCost:
    """What slots cost, measured."""

    p50_us: float
    p99_us: float
    cpu_us: float
    contended_per_second: float
    in_process_us: float
    slots: int


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _store(dsn: str) -> PostgresStore:
    return PostgresStore(
        dsn,
        GrainPolicy(grace=timedelta(minutes=5)),
        pool_size=4,
        statement_timeout=5,
        claim_lease=30,
    )


async def _measure(dsn: str, slots: int) -> SlotCost:
    stores = [_store(dsn) for _ in range(REPLICAS)]
    for store in stores:
        await store.open()
    try:
        quota = FleetQuota(stores[0])
        for _ in range(50):  # warm: the pool's connection, the row, the plan
            await quota.reserve("BatchMeterUsage", UNPACED, 60)
        times: list[float] = []
        cpu = _cpu()
        for _ in range(slots):
            started = time.perf_counter()
            await quota.reserve("BatchMeterUsage", UNPACED, 60)
            times.append(time.perf_counter() - started)
        cpu = _cpu() - cpu
        quotas = [FleetQuota(store) for store in stores]
        each = slots // REPLICAS
        started = time.perf_counter()

        async def replica(q: FleetQuota) -> None:
            for _ in range(each):
                await q.reserve("MeterUsage", UNPACED, 60)

        await asyncio.gather(*(replica(q) for q in quotas))
        contended = each * REPLICAS / (time.perf_counter() - started)
    finally:
        for store in stores:
            await store.close()
    bucket = RequestQuota(UNPACED)
    started = time.perf_counter()
    for n in range(slots):
        bucket.reserve(float(n), float(n) + 60)
    in_process = (time.perf_counter() - started) / slots
    times.sort()
    return SlotCost(
        p50_us=statistics.median(times) * 1e6,
        p99_us=times[int(len(times) * 0.99)] * 1e6,
        cpu_us=cpu / slots * 1e6,
        contended_per_second=contended,
        in_process_us=in_process * 1e6,
        slots=slots,
    )


def measure(slots: int = 2000) -> SlotCost:
    """Start a throwaway server and measure ``slots`` slots each way."""
    with PgServer() as server:
        dsn = server.create_database("fleet")
        return asyncio.run(_measure(dsn, slots))


def main(argv: list[str] | None = None) -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(prog="benchmarks.fleet_quota")
    parser.add_argument("--slots", type=int, default=2000)
    args = parser.parse_args(argv)
    cost = measure(args.slots)
    print(
        f"one slot: p50 {cost.p50_us:.0f} us, p99 {cost.p99_us:.0f} us wall, "
        f"{cost.cpu_us:.0f} us client CPU; {REPLICAS} replicas at once: "
        f"{cost.contended_per_second:,.0f} slots/s; in-process bucket "
        f"{cost.in_process_us:.2f} us ({cost.slots} slots)"
    )


if __name__ == "__main__":
    main()
