"""Forwarding cost: the sidecar's CPU per request and throughput, per transport, side by side.

Starts a minimal upstream (uvicorn, answers MeterUsage without checking
anything, so that the upstream costs as little as possible), then for each
transport a sidecar pointed at it, and loads each in turn with ``wrk`` (or a
small httpx load generator when wrk is missing). Prints requests per second
and the sidecar process's CPU microseconds per request, read from
/proc/<pid>/stat, and the ratio between transports. Run:

    .venv/bin/python benchmarks/forward.py [--seconds 8] [--connections 16]

Absolute numbers on a shared 2-core machine are noisy; the ratios measured in
one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import post_load
from tests.fakes import serve
from tests.sidecar import run_sidecar

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODY = json.dumps({"UsageDimension": "users", "UsageQuantity": 1}).encode()


async def _upstream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The cheapest plausible MeterUsage answer."""
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/x-amz-json-1.1"),
                (b"x-amzn-requestid", b"00000000-0000-0000-0000-000000000000"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b'{"MeteringRecordId":"bench"}'})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _load(url: str, seconds: int, connections: int) -> int:
    return post_load(f"{url}/v1/meter-usage", BODY, seconds=seconds, connections=connections)


def main() -> None:
    """Measure each transport and print the figures and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--transports", default="aiohttp,httpcore")
    args = parser.parse_args()
    figures: dict[str, tuple[float, float]] = {}
    with serve(_upstream) as upstream:
        for transport in args.transports.split(","):
            env = {
                "METERING_ENDPOINT_URL": upstream.url,
                "METERING_PRODUCT_CODE": "prod-bench",
                "METERING_HTTP_TRANSPORT": transport,
                "METERING_ACCESS_LOG": "false",
                "AWS_ACCESS_KEY_ID": "AKIABENCHMARK",
                "AWS_SECRET_ACCESS_KEY": "benchmark-secret",
                "AWS_REGION": "us-east-1",
            }
            with run_sidecar(env, wait_ready=True) as sidecar:
                _load(sidecar.url, 2, args.connections)  # warm-up
                pid = sidecar.process.pid
                cpu_before = _cpu_seconds(pid)
                started = time.monotonic()
                requests = _load(sidecar.url, args.seconds, args.connections)
                elapsed = time.monotonic() - started
                cpu = _cpu_seconds(pid) - cpu_before
            figures[transport] = (requests / elapsed, cpu / requests * 1e6)
    print(f"{'transport':<10} {'req/s':>8} {'CPU us/req':>11}")
    for transport, (rate, cpu_us) in figures.items():
        print(f"{transport:<10} {rate:>8.0f} {cpu_us:>11.0f}")
    if {"aiohttp", "httpcore"} <= figures.keys():
        a, h = figures["aiohttp"], figures["httpcore"]
        print(
            f"aiohttp/httpcore: throughput x{a[0] / h[0]:.2f}, CPU per request x{a[1] / h[1]:.2f}"
        )


if __name__ == "__main__":
    main()
