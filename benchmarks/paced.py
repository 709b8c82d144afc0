"""A paced client: fixed-rate streams of requests, each on one raw HTTP/1.1 keep-alive
connection, all at once.

wrk sends as fast as it can; a sidecar at AWS's quota sees a steady, modest rate,
which needs a client that waits for each slot. :func:`paced_streams` opens one
connection per stream (asyncio streams, uvloop when installed) and runs every
stream at the same time for the same seconds, each sending its request *i* at
``t0 + offset + i / rate``, the streams' offsets spread evenly over one interval
so that their requests interleave rather than collide. Streams to the sidecar and
streams straight to its upstream thus run side by side, under the same machine
noise. A request that had to wait for the previous answer past its slot is timed
from its slot (no coordinated omission); otherwise from the moment it was written,
so that the event loop's millisecond timer does not count. A status of 400 or more,
or a broken connection (reopened for the next request), is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.rawhttp import Connection, Target


@dataclass(frozen=True)
class Latencies:
    """Latencies in milliseconds, sorted; the errors and the late starts among them."""

    samples: Sequence[float]
    errors: int
    late: int

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1), nearest rank."""
        if not self.samples:
            return float("nan")
        index = min(len(self.samples) - 1, max(0, round(q * len(self.samples)) - 1))
        return self.samples[index]

    @staticmethod
    def merged(*parts: Latencies) -> Latencies:
        """Several streams' latencies as one."""
        return Latencies(
            sorted(s for part in parts for s in part.samples),
            sum(part.errors for part in parts),
            sum(part.late for part in parts),
        )


async def _stream(
    connection: Connection, rate: float, start: float, count: int
) -> tuple[list[float], int, int]:
    clock = time.perf_counter
    interval = 1.0 / rate
    samples: list[float] = []
    errors = late = 0
    answered = start  # when the previous answer came
    for i in range(count):
        slot = start + i * interval
        delay = slot - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = clock()
        try:
            status = await connection.exchange()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = 599
            with contextlib.suppress(OSError):
                await connection.close()
            await connection.open()
        done = clock()
        if answered > slot:  # this one could not leave on time
            late += 1
            samples.append((done - slot) * 1e3)
        else:
            samples.append((done - sent) * 1e3)
        answered = done
        if status >= 400:
            errors += 1
    return samples, errors, late


async def _run(
    streams: Mapping[str, Target], rate: float, seconds: float, warm_up: int
) -> dict[str, Latencies]:
    connections = {name: Connection(target) for name, target in streams.items()}
    try:
        for connection in connections.values():
            await connection.open()
            for _ in range(warm_up):
                await connection.exchange()
        count = max(1, round(rate * seconds))
        spacing = 1.0 / rate / len(connections)
        t0 = time.perf_counter() + 0.05
        results = await asyncio.gather(
            *(
                _stream(connection, rate, t0 + k * spacing, count)
                for k, connection in enumerate(connections.values())
            )
        )
    finally:
        for connection in connections.values():
            await connection.close()
    return {
        name: Latencies(sorted(samples), errors, late)
        for name, (samples, errors, late) in zip(connections, results, strict=True)
    }


def paced_streams(
    streams: Mapping[str, Target], *, rate: float, seconds: float, warm_up: int = 20
) -> dict[str, Latencies]:
    """Each stream's latencies at ``rate`` requests per second, all streams at once for
    ``seconds`` (after ``warm_up`` requests each, back to back)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(streams, rate, seconds, warm_up))
    return uvloop.run(_run(streams, rate, seconds, warm_up))
