"""What an app does without the sidecar: boto3 ``meter_usage`` in a loop, one process.

Calls ``URL`` (the benchmark's minimal upstream) back to back from one thread for
``SECONDS`` after a short warm-up, and prints one JSON line: calls, seconds, and
the process's CPU seconds over the timed part. :func:`boto3_rate` runs it as a
subprocess, so that it has a process (and a GIL) of its own, as an app would:

    .venv/bin/python -m benchmarks.boto_loop URL SECONDS
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WARM_UP_CALLS = 20


@dataclass(frozen=True)
class BotoResult:
    """Calls made in ``seconds`` and the CPU seconds the loop's process used for them."""

    calls: int
    seconds: float
    cpu_seconds: float

    @property
    def rate(self) -> float:
        """Calls per second."""
        return self.calls / self.seconds

    @property
    def cpu_us_per_call(self) -> float:
        """CPU microseconds per call."""
        return self.cpu_seconds / self.calls * 1e6


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _loop(url: str, seconds: float) -> dict[str, Any]:
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "meteringmarketplace",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="AKIABENCHMARK",
        aws_secret_access_key="benchmark-secret",  # noqa: S106 - a fake upstream's key
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}),
    )

    def call() -> None:
        client.meter_usage(
            ProductCode="prod-bench",
            Timestamp=datetime.now(UTC),
            UsageDimension="users",
            UsageQuantity=1,
        )

    for _ in range(WARM_UP_CALLS):
        call()
    calls = 0
    cpu_before = _cpu()
    started = time.monotonic()
    stop_at = started + seconds
    while time.monotonic() < stop_at:
        call()
        calls += 1
    elapsed = time.monotonic() - started
    return {"calls": calls, "seconds": elapsed, "cpu_seconds": _cpu() - cpu_before}


def boto3_rate(url: str, seconds: float) -> BotoResult:
    """Run the loop in a subprocess against ``url`` for ``seconds``."""
    output = subprocess.run(
        [sys.executable, "-m", "benchmarks.boto_loop", url, str(seconds)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    ).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    return BotoResult(figures["calls"], figures["seconds"], figures["cpu_seconds"])


def main() -> None:
    """Loop against argv[1] for argv[2] seconds; print the JSON figures."""
    print(json.dumps(_loop(sys.argv[1], float(sys.argv[2]))))


if __name__ == "__main__":
    main()
