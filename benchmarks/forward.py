"""Forwarding cost: the sidecar's CPU per request and throughput, per transport, side by side.

Starts a minimal upstream (:mod:`benchmarks.upstream`: answers MeterUsage without
checking anything, so that the upstream costs as little as possible), then for
each transport a sidecar pointed at it, and loads each in turn with ``wrk`` (or
a small httpx load generator when wrk is missing). Prints requests per second
and the sidecar process's CPU microseconds per request, read from
/proc/<pid>/stat, and the ratio between transports. Run:

    .venv/bin/python benchmarks/forward.py [--seconds 8] [--connections 16]

Absolute numbers on a shared 2-core machine are noisy; the ratios measured in
one run are what to read. ``scripts/bench`` uses :func:`forward_env` and
:func:`measure_forward` for its forwarding goals.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import LoadResult, load
from benchmarks.upstream import run_upstream
from tests.sidecar import run_sidecar

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODY = json.dumps({"UsageDimension": "users", "UsageQuantity": 1}).encode()
PATH = "/v1/meter-usage"


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (VmRSS from /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def forward_env(upstream_url: str, transport: str | None = None) -> dict[str, str]:
    """An aws-mode sidecar forwarding to ``upstream_url``: access log off, no MeterUsage
    quota (the limiter would cap the load at 10 per second)."""
    env = {
        "METERING_ENDPOINT_URL": upstream_url,
        "METERING_PRODUCT_CODE": "prod-bench",
        "METERING_ACCESS_LOG": "false",
        "METERING_QUOTA_METER_USAGE": "0",
        "AWS_ACCESS_KEY_ID": "AKIABENCHMARK",
        "AWS_SECRET_ACCESS_KEY": "benchmark-secret",
        "AWS_REGION": "us-east-1",
    }
    if transport:
        env["METERING_HTTP_TRANSPORT"] = transport
    return env


@dataclass(frozen=True)
class ForwardResult:
    """One forwarding load: what the load generator saw and the sidecar's CPU."""

    load: LoadResult
    cpu_seconds: float

    @property
    def cpu_us_per_request(self) -> float:
        """Sidecar CPU microseconds per answered request."""
        return self.cpu_seconds / max(1, self.load.requests) * 1e6


def measure_forward(url: str, pid: int, *, seconds: int, connections: int) -> ForwardResult:
    """Load ``POST /v1/meter-usage`` on the sidecar at ``url`` (process ``pid``)."""
    cpu_before = cpu_seconds(pid)
    result = load(f"{url}{PATH}", seconds=seconds, connections=connections, body=BODY)
    return ForwardResult(result, cpu_seconds(pid) - cpu_before)


def main() -> None:
    """Measure each transport and print the figures and their ratio."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--transports", default="http11,aiohttp,httpcore")
    args = parser.parse_args()
    figures: dict[str, tuple[float, float]] = {}
    with run_upstream() as (upstream_url, _):
        for transport in args.transports.split(","):
            with run_sidecar(forward_env(upstream_url, transport), wait_ready=True) as sidecar:
                pid = sidecar.process.pid
                measure_forward(sidecar.url, pid, seconds=2, connections=args.connections)
                result = measure_forward(
                    sidecar.url, pid, seconds=args.seconds, connections=args.connections
                )
            if result.load.errors:
                raise RuntimeError(f"{transport}: {result.load.errors} errors")
            figures[transport] = (result.load.rate, result.cpu_us_per_request)
    print(f"{'transport':<10} {'req/s':>8} {'CPU us/req':>11}")
    for transport, (rate, cpu_us) in figures.items():
        print(f"{transport:<10} {rate:>8.0f} {cpu_us:>11.0f}")
    first, (rate0, cpu0) = next(iter(figures.items()))
    for transport, (rate, cpu_us) in list(figures.items())[1:]:
        print(
            f"{first}/{transport}: throughput x{rate0 / rate:.2f}, "
            f"CPU per request x{cpu0 / cpu_us:.2f}"
        )


if __name__ == "__main__":
    main()
