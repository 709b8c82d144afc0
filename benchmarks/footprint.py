"""Footprint of a fresh sidecar: time from process start to ``/readyz`` 200, idle RSS,
by mode; and what each import costs.

:func:`start_to_ready` starts ``python -m app`` (the environment isolated as the
tests isolate it), polls ``GET /readyz`` every few milliseconds over a plain
socket until it answers 200, then lets the process idle a moment and reads its
VmRSS from /proc/<pid>/status. :func:`footprints` does that three times for each
of :func:`mode_envs`: the two default configurations (aws mode, its endpoint
resolved by botocore, credentials from the environment; the sandbox), both on
SQLite without an events queue, and the aws mode sending to the benchmark's
upstream (what the forward rows load). Idle, none of them sends anything.

:func:`import_costs` imports what the sidecar imports, in its order, step by step
in a fresh interpreter (with the modules ``app.__main__`` marks unimportable
marked so), and reads VmRSS after each step. Run:

    .venv/bin/python -m benchmarks.footprint [--no-imports]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.__main__ import UNUSED_MODULES
from benchmarks.forward import PRODUCT, forward_env, rss_mb, sidecar_env
from benchmarks.upstream import run_upstream
from tests.sidecar import REPO, free_port, isolated_env

POLL_SECONDS = 0.005
SETTLE_SECONDS = 0.5
# The modes of the goal (<= 60 MB idle), and the one the forward rows load.
AWS = "aws"
SANDBOX = "sandbox"
AWS_UPSTREAM = "aws to the bench upstream"
DEFAULT_MODES = (AWS, SANDBOX)

# What the sidecar imports, in the order it imports it: each step names the modules
# it imports (whatever they import that is not loaded yet comes with them). The
# sandbox stops after the app's listeners; aws mode adds the next three steps; the
# last three are imported only when their feature is configured.
IMPORT_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("asyncio (ssl, concurrent.futures)", ("asyncio",)),
    ("uvloop", ("uvloop",)),
    ("pydantic, pydantic_settings", ("pydantic", "pydantic_settings")),
    ("app.config (the settings)", ("app.config",)),
    ("fastapi (starlette, opentelemetry-api)", ("fastapi",)),
    ("prometheus_client", ("prometheus_client",)),
    ("sqlite3", ("sqlite3",)),
    (
        "botocore.loaders, .retries (botocore.utils: urllib3, dateutil)",
        ("botocore.loaders", "botocore.retries.standard"),
    ),
    ("app: routes, OpenAPI, queue, sandbox", ("app.main", "app.api.ops_listener")),
    ("uvicorn (click), its httptools server", ("uvicorn", "app.server.listeners")),
    ("aws mode: httpx (httpcore, h11, anyio's backend)", ("httpx",)),
    ("aws mode: botocore.session (client, credentials)", ("botocore.session",)),
    (
        "aws mode: the app's upstream parts",
        ("app.actions.upstream", "app.aws.endpoint", "app.aws.http_client"),
    ),
    ("with a DSN: psycopg, psycopg_pool, the store", ("app.queue.postgres",)),
    ("with an events queue: the SQS poller", ("app.actions.events",)),
    ("with RDS IAM auth: the token signer", ("app.aws.rds_auth",)),
)
# The index of the last step a sandbox sidecar imports, and an aws-mode one.
SANDBOX_STEPS = 10
AWS_STEPS = 13

_LADDER = """
import importlib, json, sys

def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")

unused, steps = json.loads(sys.argv[1])
for name in unused:
    sys.modules.setdefault(name, None)
out = [["the interpreter", rss(), len(sys.modules)]]
for label, modules in steps:
    for module in modules:
        importlib.import_module(module)
    out.append([label, rss(), len(sys.modules)])
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Startup:
    """Seconds from ``Popen`` to the first 200 from ``/readyz``; RSS (MB) once idle."""

    ready_seconds: float
    idle_rss_mb: float


@dataclass(frozen=True)
class ImportCost:
    """One step of :data:`IMPORT_STEPS`: VmRSS (MB) after it, and modules loaded."""

    label: str
    rss_mb: float
    added_mb: float
    modules: int
    added_modules: int


def mode_envs(upstream_url: str) -> dict[str, dict[str, str]]:
    """The environment of each mode measured, by name (see the module docstring)."""
    aws = {k: v for k, v in sidecar_env(upstream_url).items() if k != "METERING_ENDPOINT_URL"}
    return {
        AWS: aws,
        SANDBOX: {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT},
        AWS_UPSTREAM: forward_env(upstream_url),
    }


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


def footprints(upstream_url: str, runs: int = 3) -> dict[str, Startup]:
    """:func:`startups` of each of :func:`mode_envs`, by mode."""
    return {mode: startups(env, runs) for mode, env in mode_envs(upstream_url).items()}


def import_costs(
    steps: Sequence[tuple[str, Sequence[str]]] = IMPORT_STEPS,
) -> list[ImportCost]:
    """VmRSS after each of ``steps``, imported in order in a fresh interpreter; the
    first entry is the interpreter before any of them."""
    argument = json.dumps([list(UNUSED_MODULES), [[label, list(mods)] for label, mods in steps]])
    done = subprocess.run(
        [sys.executable, "-c", _LADDER, argument],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    costs: list[ImportCost] = []
    previous_rss, previous_modules = 0.0, 0
    for label, rss, modules in json.loads(done.stdout):
        costs.append(
            ImportCost(label, rss, rss - previous_rss, modules, modules - previous_modules)
        )
        previous_rss, previous_modules = rss, modules
    return costs


def format_import_costs(costs: Sequence[ImportCost]) -> str:
    """The steps as lines: RSS after, what the step added (MB, modules)."""
    width = max(len(cost.label) for cost in costs)
    lines = []
    for index, cost in enumerate(costs):
        lines.append(
            f"{cost.label.ljust(width)}  {cost.rss_mb:5.1f} MB  +{cost.added_mb:4.1f} MB"
            f"  {cost.modules:4d} modules  +{cost.added_modules}"
        )
        if index in (SANDBOX_STEPS, AWS_STEPS):
            which = "a sandbox" if index == SANDBOX_STEPS else "an aws-mode"
            lines.append(f"{'':{width}}  = what {which} sidecar imports")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print each mode's median of three starts, then each import's cost."""
    parser = argparse.ArgumentParser(prog="benchmarks.footprint", description=__doc__)
    parser.add_argument("--no-imports", action="store_true", help="skip the import costs")
    parser.add_argument("--runs", type=int, default=3, help="starts per mode (default 3)")
    args = parser.parse_args(argv)
    with run_upstream() as (url, _):
        results = footprints(url, args.runs)
    for mode, result in results.items():
        print(
            f"{mode}: start to /readyz 200 {result.ready_seconds:.2f} s; "
            f"idle RSS {result.idle_rss_mb:.1f} MB"
        )
    if not args.no_imports:
        print()
        print(format_import_costs(import_costs()))


if __name__ == "__main__":
    main()
