"""Which async PostgreSQL driver for the shared store: psycopg 3 or asyncpg, side by side.

Starts a throwaway PostgreSQL server (as the tests do), then runs the shared
store's hot transaction (an advisory lock, a grain row locked, updated, a record
inserted, commit) with each driver from the same number of concurrent tasks,
and prints transactions per second and client CPU per transaction. Run:

    .venv/bin/pip install asyncpg   # only for this comparison
    .venv/bin/python benchmarks/pg_driver.py [--seconds 5] [--tasks 8]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from psycopg_pool import AsyncConnectionPool

from tests.pg import PgServer

SCHEMA = """
CREATE TABLE grains (id BIGSERIAL PRIMARY KEY, k TEXT UNIQUE, content TEXT NOT NULL);
CREATE TABLE usage_records (id BIGSERIAL PRIMARY KEY, grain_id BIGINT NOT NULL, record TEXT);
INSERT INTO grains (k, content) SELECT 'g' || n, '{}' FROM generate_series(0, 99) n;
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _drive(one: Callable[[int], Awaitable[None]], seconds: float, tasks: int) -> int:
    done = 0
    stop = time.monotonic() + seconds

    async def worker(offset: int) -> None:
        nonlocal done
        n = offset
        while time.monotonic() < stop:
            await one(n)
            done += 1
            n += tasks

    await asyncio.gather(*(worker(i) for i in range(tasks)))
    return done


async def _psycopg(dsn: str, seconds: float, tasks: int) -> tuple[int, float]:
    async with AsyncConnectionPool(dsn, min_size=tasks, max_size=tasks, open=False) as pool:

        async def one(n: int) -> None:
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (n % 100,))
                cursor = await conn.execute(
                    "SELECT id, content FROM grains WHERE k = %s FOR UPDATE", (f"g{n % 100}",)
                )
                row = await cursor.fetchone()
                assert row is not None
                await conn.execute("UPDATE grains SET content = %s WHERE id = %s", ("{}", row[0]))
                await conn.execute(
                    "INSERT INTO usage_records (grain_id, record) VALUES (%s, %s)", (row[0], "{}")
                )

        await pool.wait()
        started = _cpu()
        done = await _drive(one, seconds, tasks)
        return done, _cpu() - started


async def _asyncpg(dsn: str, seconds: float, tasks: int) -> tuple[int, float]:
    import asyncpg  # an optional tool of this comparison (the bench extra)

    pool = await asyncpg.create_pool(dsn, min_size=tasks, max_size=tasks)
    try:

        async def one(n: int) -> None:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", n % 100)
                row = await conn.fetchrow(
                    "SELECT id, content FROM grains WHERE k = $1 FOR UPDATE", f"g{n % 100}"
                )
                await conn.execute("UPDATE grains SET content = $1 WHERE id = $2", "{}", row[0])
                await conn.execute(
                    "INSERT INTO usage_records (grain_id, record) VALUES ($1, $2)", row[0], "{}"
                )

        started = _cpu()
        done = await _drive(one, seconds, tasks)
        return done, _cpu() - started
    finally:
        await pool.close()


def main() -> None:
    """Run both drivers against one throwaway server and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    with PgServer() as server:
        dsn = server.create_database("bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA.encode())
        rows = []
        for name, run in (("psycopg 3 (async pool)", _psycopg), ("asyncpg", _asyncpg)):
            try:
                done, cpu = asyncio.run(run(dsn, args.seconds, args.tasks))
            except ImportError:
                rows.append((name, "not installed", "", ""))
                continue
            rows.append(
                (name, f"{done / args.seconds:,.0f}", f"{cpu / done * 1e6:,.0f}", str(args.tasks))
            )
    print(f"{'driver':<24} {'transactions/s':>15} {'client CPU µs/tx':>17} {'tasks':>6}")
    for name, rate, cpu_text, tasks in rows:
        print(f"{name:<24} {rate:>15} {cpu_text:>17} {tasks:>6}")


if __name__ == "__main__":
    main()
