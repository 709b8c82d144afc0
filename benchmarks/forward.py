"""Forwarding through the sidecar: the environments, requests and process figures the
forward rows of ``scripts/bench`` use, and a throughput run of its own.

The upstream is :mod:`benchmarks.upstream` (answers without checking anything,
so that it costs as little as possible). A sidecar's CPU is read from
/proc/<pid>/stat, its memory from /proc/<pid>/status. Run by hand for the
sidecar's CPU per request and throughput under wrk (or a small httpx load
generator when wrk is missing), information only:

    .venv/bin/python -m benchmarks.forward [--seconds 8] [--connections 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import LoadResult, load
from benchmarks.rawhttp import Target
from benchmarks.upstream import run_upstream
from tests.sidecar import run_sidecar

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
BODY = json.dumps({"UsageDimension": "users", "UsageQuantity": 1}).encode()
PATH = "/v1/meter-usage"
BATCH_PATH = "/v1/batch-meter-usage"
PRODUCT = "prod-bench"
# AWS's most records per BatchMeterUsage call.
BATCH_RECORDS = 25
AWS_CONTENT_TYPE = "application/x-amz-json-1.1"


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


def sidecar_env(upstream_url: str) -> dict[str, str]:
    """An aws-mode sidecar forwarding to ``upstream_url``, every other setting its
    default (AWS's request quotas and the access log on)."""
    return {
        "METERING_ENDPOINT_URL": upstream_url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "AWS_ACCESS_KEY_ID": "AKIABENCHMARK",
        "AWS_SECRET_ACCESS_KEY": "benchmark-secret",
        "AWS_REGION": "us-east-1",
    }


def forward_env(upstream_url: str) -> dict[str, str]:
    """``sidecar_env`` with the access log off and no MeterUsage quota (the limiter
    would cap a load at 10 per second)."""
    return {
        **sidecar_env(upstream_url),
        "METERING_ACCESS_LOG": "false",
        "METERING_QUOTA_METER_USAGE": "0",
    }


def batch_records(count: int = BATCH_RECORDS) -> list[dict[str, object]]:
    """``count`` BatchMeterUsage records of this hour, for distinct customers."""
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return [
        {
            "Timestamp": hour.isoformat().replace("+00:00", "Z"),
            "CustomerIdentifier": f"customer-{i:03d}",
            "Dimension": "users",
            "Quantity": 1,
        }
        for i in range(count)
    ]


def sidecar_targets(url: str) -> dict[str, Target]:
    """MeterUsage and BatchMeterUsage through the sidecar's REST API."""
    batch = json.dumps({"UsageRecords": batch_records()}).encode()
    return {
        "meter": Target(url, PATH, body=BODY),
        "batch": Target(url, BATCH_PATH, body=batch),
    }


def upstream_targets(url: str) -> dict[str, Target]:
    """The same two calls straight to the upstream, as the sidecar sends them (AWS JSON
    1.1, the sidecar's defaults filled in; unsigned: the upstream checks nothing)."""
    meter = {
        "ProductCode": PRODUCT,
        "Timestamp": int(datetime.now(UTC).timestamp()),
        "UsageDimension": "users",
        "UsageQuantity": 1,
        "DryRun": False,
        "ClientToken": "00000000-0000-4000-8000-000000000000",
    }
    records = [{**r, "Timestamp": int(datetime.now(UTC).timestamp())} for r in batch_records()]
    batch = {"ProductCode": PRODUCT, "UsageRecords": records}
    return {
        "meter": Target(
            url,
            "/",
            body=json.dumps(meter).encode(),
            headers=(("X-Amz-Target", "AWSMPMeteringService.MeterUsage"),),
            content_type=AWS_CONTENT_TYPE,
        ),
        "batch": Target(
            url,
            "/",
            body=json.dumps(batch).encode(),
            headers=(("X-Amz-Target", "AWSMPMeteringService.BatchMeterUsage"),),
            content_type=AWS_CONTENT_TYPE,
        ),
    }


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
    """Measure the sidecar's throughput and CPU per request under wrk; print them."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    with (
        run_upstream() as (upstream_url, _),
        run_sidecar(forward_env(upstream_url), wait_ready=True) as sidecar,
    ):
        pid = sidecar.process.pid
        measure_forward(sidecar.url, pid, seconds=2, connections=args.connections)
        result = measure_forward(
            sidecar.url, pid, seconds=args.seconds, connections=args.connections
        )
    print(
        f"{result.load.rate:,.0f} req/s, {result.cpu_us_per_request:,.0f} µs CPU/req, "
        f"{result.load.errors} errors, p99 {result.load.p99_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
