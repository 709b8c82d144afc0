"""Load generators shared by the benchmarks: wrk when installed, else a small httpx loop."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def _wrk(url: str, seconds: float, connections: int, body: bytes) -> int:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format("REQUESTS %d ERRORS %d\\n", summary.requests,'
            " summary.errors.status + summary.errors.connect + summary.errors.read"
            " + summary.errors.write + summary.errors.timeout))\n"
            "end\n"
        )
    try:
        output = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "-s", script.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        Path(script.name).unlink()
    line = next(x for x in output.splitlines() if x.startswith("REQUESTS"))
    _, requests, _, errors = line.split()
    if int(errors):
        raise RuntimeError(f"wrk saw {errors} errors:\n{output}")
    return int(requests)


async def _httpx_load(url: str, seconds: float, connections: int, body: bytes) -> int:
    done = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                response = await client.post(
                    url, content=body, headers={"content-type": "application/json"}
                )
                response.raise_for_status()
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return done


def post_load(url: str, body: bytes, *, seconds: float, connections: int) -> int:
    """POST ``body`` to ``url`` from ``connections`` connections for ``seconds``; count
    the answers (any error status fails the run)."""
    if shutil.which("wrk"):
        return _wrk(url, seconds, connections, body)
    return asyncio.run(_httpx_load(url, seconds, connections, body))
