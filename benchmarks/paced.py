"""A paced client: requests at a fixed rate on one raw HTTP/1.1 keep-alive connection.

wrk sends as fast as it can; latency under a steady, modest rate needs a client that
waits for each slot. :func:`paced_latencies` opens one connection per target
(asyncio streams, uvloop when installed), then alternates between the targets
one second at a time, sending request *i* to a target at ``t0 + i / rate``, and
records each latency. A request that had to wait for the previous answer past
its slot is timed from its slot (no coordinated omission); otherwise from the
moment it was written, so that the event loop's millisecond timer does not count.
Alternating in one-second chunks keeps both targets under the same machine
noise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.rawhttp import Connection, Target


@dataclass(frozen=True)
class Latencies:
    """One target's latencies in milliseconds, sorted, and the errors it answered."""

    samples: Sequence[float]
    errors: int
    late: int

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0..1), nearest rank."""
        if not self.samples:
            return float("nan")
        index = min(len(self.samples) - 1, max(0, round(q * len(self.samples)) - 1))
        return self.samples[index]


async def _run(
    targets: Mapping[str, Target], rate: float, seconds: float, warm_up: int
) -> dict[str, Latencies]:
    connections = {name: Connection(target) for name, target in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    errors = dict.fromkeys(targets, 0)
    late = dict.fromkeys(targets, 0)
    clock = time.perf_counter
    try:
        for connection in connections.values():
            await connection.open()
            for _ in range(warm_up):
                await connection.exchange()
        interval = 1.0 / rate
        per_chunk = max(1, round(rate))
        chunks = max(1, round(seconds))
        for _ in range(chunks):
            for name, connection in connections.items():
                start = clock() + interval
                answered = start  # when the previous answer came
                for i in range(per_chunk):
                    slot = start + i * interval
                    delay = slot - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent = clock()
                    status = await connection.exchange()
                    done = clock()
                    if answered > slot:  # this one could not leave on time
                        late[name] += 1
                        samples[name].append((done - slot) * 1e3)
                    else:
                        samples[name].append((done - sent) * 1e3)
                    answered = done
                    if status >= 400:
                        errors[name] += 1
    finally:
        for connection in connections.values():
            await connection.close()
    return {name: Latencies(sorted(samples[name]), errors[name], late[name]) for name in targets}


def paced_latencies(
    targets: Mapping[str, Target], *, rate: float = 100.0, seconds: float = 4.0, warm_up: int = 20
) -> dict[str, Latencies]:
    """Latencies of each target at ``rate`` requests per second, ``seconds`` each,
    the targets taking turns a second at a time."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_run(targets, rate, seconds, warm_up))
    return uvloop.run(_run(targets, rate, seconds, warm_up))
