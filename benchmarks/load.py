"""Load generators shared by the benchmarks: wrk when installed, else a small httpx loop.

:func:`load` runs one bounded load and returns a :class:`LoadResult` (answers, errors,
the load's own duration, latency percentiles). :func:`drained_load` is
for calls that take a large part of a second each (1,000-record intake): wrk
stops dead at its deadline and drops the calls in flight, which then count for
nothing; this one stops sending at the deadline, waits for every call in
flight, and divides by the time to the last answer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.rawhttp import Connection, Target

# Answers slower than this count as errors (wrk's default, 2 s, is too short for
# 1,000-record calls from many connections on a busy 2-core machine).
TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class LoadResult:
    """One load's figures: complete answers (any status), errors, seconds, latency."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    tool: str

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_available() -> bool:
    """Whether the wrk binary is on PATH."""
    return shutil.which("wrk") is not None


def _wrk_script(method: str, body: bytes | None) -> str:
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines += [
            f"wrk.body = {json.dumps(body.decode())}",
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    lines += [
        "done = function(summary, latency, requests)",
        '  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests,',
        "    summary.errors.status + summary.errors.connect + summary.errors.read",
        "    + summary.errors.write + summary.errors.timeout, summary.duration,",
        "    latency:percentile(50), latency:percentile(99)))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def _wrk(url: str, seconds: int, connections: int, method: str, body: bytes | None) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_wrk_script(method, body))
    try:
        output = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                f"--timeout={TIMEOUT_SECONDS}s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + TIMEOUT_SECONDS + 30,
        ).stdout
    finally:
        Path(script.name).unlink()
    line = next(x for x in output.splitlines() if x.startswith("RESULT"))
    requests, errors, duration_us, p50_us, p99_us = (int(x) for x in line.split()[1:])
    return LoadResult(requests, errors, duration_us / 1e6, p50_us / 1e3, p99_us / 1e3, "wrk")


async def _httpx_load(
    url: str, seconds: float, connections: int, method: str, body: bytes | None
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    headers = {"content-type": "application/json"} if body is not None else {}
    async with httpx.AsyncClient(limits=limits, timeout=TIMEOUT_SECONDS) as client:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                sent = time.perf_counter()
                try:
                    response = await client.request(method, url, content=body, headers=headers)
                except httpx.TransportError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                if response.status_code >= 400:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.monotonic() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0

    return LoadResult(len(latencies), errors, elapsed, pct(0.5), pct(0.99), "httpx")


def load(
    url: str,
    *,
    seconds: int,
    connections: int,
    method: str = "POST",
    body: bytes | None = None,
) -> LoadResult:
    """Send ``method`` (with ``body`` as JSON, if given) to ``url`` from ``connections``
    keep-alive connections for ``seconds``. Errors (status >= 400, connect, read,
    write, timeout) are counted, not raised."""
    if wrk_available():
        return _wrk(url, seconds, connections, method, body)
    return asyncio.run(_httpx_load(url, seconds, connections, method, body))


async def _drained(target: Target, seconds: float, connections: int) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    clock = time.perf_counter
    workers = [Connection(target) for _ in range(connections)]
    for connection in workers:
        await connection.open()
    started = clock()
    stop_at = started + seconds
    last = started

    async def worker(connection: Connection) -> None:
        nonlocal errors, last
        while clock() < stop_at:
            sent = clock()
            try:
                status = await asyncio.wait_for(connection.exchange(), TIMEOUT_SECONDS)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                errors += 1  # the connection is unusable now: this worker stops
                return
            last = clock()
            latencies.append(last - sent)
            if status >= 400:
                errors += 1

    try:
        await asyncio.gather(*(worker(connection) for connection in workers))
    finally:
        for connection in workers:
            await connection.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3 if latencies else 0

    return LoadResult(len(latencies), errors, last - started, pct(0.5), pct(0.99), "drained")


def drained_load(
    url: str,
    *,
    seconds: float,
    connections: int,
    method: str = "POST",
    body: bytes | None = None,
) -> LoadResult:
    """Send for ``seconds`` from ``connections`` connections, then wait for the calls in
    flight; the result's ``seconds`` runs to the last answer."""
    parts = url.split("/", 3)
    target = Target("/".join(parts[:3]), "/" + (parts[3] if len(parts) > 3 else ""), method, body)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_drained(target, seconds, connections))
    return uvloop.run(_drained(target, seconds, connections))
