"""Footprint of a fresh sidecar: time from process start to ``/readyz`` 200, idle RSS.

:func:`start_to_ready` starts ``python -m app`` (the environment isolated as the
tests isolate it), polls ``GET /readyz`` every few milliseconds over a plain
socket until it answers 200, then lets the process idle a moment and reads its
VmRSS from /proc/<pid>/status. Run:

    .venv/bin/python -m benchmarks.footprint
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks.forward import forward_env, rss_mb
from benchmarks.upstream import run_upstream
from tests.sidecar import REPO, free_port, isolated_env

POLL_SECONDS = 0.005
SETTLE_SECONDS = 0.5


@dataclass(frozen=True)
class Startup:
    """Seconds from ``Popen`` to the first 200 from ``/readyz``; RSS (MB) once idle."""

    ready_seconds: float
    idle_rss_mb: float


def _status(port: int, path: str) -> int | None:
    """The status of ``GET path``, or None while nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            head = sock.recv(64)
    except OSError:
        return None
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def start_to_ready(env: Mapping[str, str], timeout: float = 30.0) -> Startup:
    """Start a sidecar with ``env``, time it to ready, read its idle RSS, stop it."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        home = Path(tmp)
        full_env = isolated_env(
            {
                "METERING_PORT": str(port),
                # The operations listener on loopback and a free port, as tests/sidecar.py
                # starts it: its default 0.0.0.0:8081 collides with any sidecar running here.
                "METERING_OPS_HOST": "127.0.0.1",
                "METERING_OPS_PORT": str(free_port()),
                "METERING_QUEUE_PATH": str(home / "q.sqlite3"),
                **env,
            },
            home,
        )
        log = (home / "sidecar.log").open("wb")
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=REPO, env=full_env, stdout=log, stderr=log
        )
        try:
            while _status(port, "/readyz") != 200:
                if process.poll() is not None or time.monotonic() - started > timeout:
                    log.flush()
                    raise RuntimeError(
                        "the sidecar did not get ready:\n" + (home / "sidecar.log").read_text()
                    )
                time.sleep(POLL_SECONDS)
            ready = time.monotonic() - started
            time.sleep(SETTLE_SECONDS)
            return Startup(ready, rss_mb(process.pid))
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
            log.close()


def startups(env: Mapping[str, str], runs: int = 3) -> Startup:
    """The median of ``runs`` fresh starts (ready time and idle RSS each)."""
    samples = [start_to_ready(env) for _ in range(runs)]
    return Startup(
        statistics.median(s.ready_seconds for s in samples),
        statistics.median(s.idle_rss_mb for s in samples),
    )


def main() -> None:
    """Print the median of three starts of an aws-mode sidecar."""
    with run_upstream() as (url, _):
        result = startups(forward_env(url))
    print(
        f"start to /readyz 200: {result.ready_seconds:.2f} s; idle RSS {result.idle_rss_mb:.1f} MB"
    )


if __name__ == "__main__":
    main()
