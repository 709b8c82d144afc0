"""What a started sidecar has loaded: the default modes (aws mode, the sandbox; SQLite, no
events queue) import only what they use, and each feature that is configured imports
its own parts (issue #19: idle RSS is paid once per pod).

A real sidecar is started as ``python -m app`` starts it (``runpy``, in a fresh
process); once it answers ``/healthz`` (its lifespan has started everything) it
writes the names of its loaded modules and the botocore data files it read, and
exits. No figure is asserted here: ``benchmarks/footprint.py`` measures the RSS,
and one test checks that it reports each mode's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.__main__ import UNUSED_MODULES
from tests.sidecar import REPO, free_port, isolated_env

# Runs the sidecar as `python -m app` does, with a thread that reports, once /healthz
# answers, what the process has loaded (a module marked unimportable is not loaded).
_PROBE = """
import json, os, runpy, socket, sys, threading, time
import botocore.loaders

read = []
_load = botocore.loaders.Loader.load_data_with_path

def load_data_with_path(self, name):
    read.append(name)
    return _load(self, name)

botocore.loaders.Loader.load_data_with_path = load_data_with_path

def up(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
            return sock.recv(16).startswith(b"HTTP/1.1 200")
    except OSError:
        return False

def report():
    port = int(os.environ["METERING_PORT"])
    while not up(port):
        time.sleep(0.02)
    modules = sorted(name for name, module in list(sys.modules.items()) if module is not None)
    with open(os.environ["FOOTPRINT_REPORT"], "w") as out:
        json.dump({"modules": modules, "botocore_data": read}, out)
    os._exit(0)

threading.Thread(target=report, daemon=True).start()
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""

# Credentials from the environment; nothing is sent at start (no RegisterUsage).
AWS = {
    "METERING_PRODUCT_CODE": "prod-footprint",
    "AWS_ACCESS_KEY_ID": "AKIAFOOTPRINT",
    "AWS_SECRET_ACCESS_KEY": "footprint-secret",
    "AWS_REGION": "us-east-1",
}
SANDBOX = {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": "prod-footprint"}

# What each feature imports, and only it.
POSTGRES = ("psycopg", "psycopg_pool", "app.queue.postgres", "app.queue.fleet")
EVENTS = ("app.aws.sqs", "app.actions.events")
RDS_SIGNER = ("app.aws.rds_auth",)
# What aws mode imports and the sandbox does not.
UPSTREAM = (
    "httpx",
    "httpcore",
    "botocore.session",
    "botocore.client",
    "app.aws.credentials",
    "app.aws.http_client",
    "app.aws.signing",
    "app.actions.upstream",
)
# What no sidecar imports: UNUSED_MODULES and what only they would bring (rich and
# pygments for httpx's command line, where the test tools install them), and any
# WebSocket library (uvicorn is told there are no WebSockets).
NEVER = (*UNUSED_MODULES, "rich", "pygments", "websockets", "wsproto")


@dataclass(frozen=True)
class Loaded:
    """What a started sidecar had loaded."""

    modules: frozenset[str]
    botocore_data: tuple[str, ...]

    def has(self, name: str) -> bool:
        """Whether module ``name`` (or one of its submodules) is loaded."""
        return name in self.modules or any(m.startswith(name + ".") for m in self.modules)


def loaded(env: Mapping[str, str]) -> Loaded:
    """Start a sidecar with ``env`` (isolated as tests/sidecar.py isolates it) and report
    what it has loaded once it serves."""
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        home = Path(tmp)
        report = home / "report.json"
        full_env = isolated_env(
            {
                "METERING_PORT": str(free_port()),
                "METERING_OPS_HOST": "127.0.0.1",
                "METERING_OPS_PORT": str(free_port()),
                "METERING_QUEUE_PATH": str(home / "queue.sqlite3"),
                "FOOTPRINT_REPORT": str(report),
                **env,
            },
            home,
        )
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            cwd=REPO,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert report.exists(), f"the sidecar did not start:\n{done.stdout}{done.stderr}"
        found = json.loads(report.read_text())
    return Loaded(frozenset(found["modules"]), tuple(found["botocore_data"]))


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port nothing listens on: where the configured features find nobody,
    so that nothing leaves the machine."""
    return free_port()


def test_aws_mode_imports_no_feature_it_is_not_configured_for() -> None:
    found = loaded(AWS)
    for name in (*POSTGRES, *EVENTS, *RDS_SIGNER, *NEVER):
        assert not found.has(name), name
    for name in UPSTREAM:
        assert found.has(name), name


def test_aws_mode_resolves_its_endpoint_without_botocores_endpoints_file() -> None:
    # endpoints.json (1.2 MB of JSON) would stay in the process as several MB of RSS;
    # the endpoint comes from the service's rule set and the partitions.
    data = loaded(AWS).botocore_data
    assert "endpoints" not in data
    assert "partitions" in data
    assert any(name.endswith("endpoint-rule-set-1") for name in data)


def test_the_sandbox_imports_nothing_of_aws_mode() -> None:
    found = loaded(SANDBOX)
    for name in (*POSTGRES, *EVENTS, *RDS_SIGNER, *NEVER, *UPSTREAM):
        assert not found.has(name), name
    assert "endpoints" not in found.botocore_data


def test_each_feature_imports_its_own_parts_when_configured(closed_port: int) -> None:
    dsn = f"postgresql://metering@127.0.0.1:{closed_port}/metering?sslmode=require"
    # The store does not answer: the sidecar starts on its local spool, after a second.
    store = {
        "METERING_QUEUE_DSN": dsn,
        "METERING_QUEUE_CONNECT_TIMEOUT": "1",
        "METERING_QUEUE_STORE_DEADLINE": "1",
    }
    features = {
        "events queue": (
            {
                **AWS,
                "METERING_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}",
                "METERING_EVENTS_QUEUE_URL": f"http://127.0.0.1:{closed_port}/123456789012/q",
            },
            EVENTS,
            (*POSTGRES, *RDS_SIGNER),
        ),
        "shared store": (
            {**SANDBOX, **store},
            POSTGRES,
            (*EVENTS, *RDS_SIGNER, *UPSTREAM),
        ),
        "RDS IAM authentication": (
            {**SANDBOX, **AWS, **store, "METERING_QUEUE_IAM_AUTH": "true"},
            (*POSTGRES, *RDS_SIGNER, "app.aws.credentials"),
            (*EVENTS, "app.actions.upstream", "app.aws.http_client"),
        ),
    }
    for feature, (env, present, absent) in features.items():
        found = loaded(env)
        for name in present:
            assert found.has(name), (feature, name)
        for name in (*absent, *NEVER):
            assert not found.has(name), (feature, name)


def test_the_benchmark_reports_each_modes_idle_rss() -> None:
    from benchmarks.footprint import AWS as AWS_MODE
    from benchmarks.footprint import (
        AWS_UPSTREAM,
        SANDBOX_STEPS,
        ImportCost,
        Startup,
        import_costs,
        start_to_ready,
    )
    from benchmarks.footprint import SANDBOX as SANDBOX_MODE
    from benchmarks.run import Run, _footprint_rows

    started = start_to_ready(SANDBOX)
    assert started.idle_rss_mb > 0
    assert started.ready_seconds > 0
    run = Run(seconds=1, connections=1, goals={8})
    _footprint_rows(
        run,
        {
            AWS_MODE: Startup(1.25, 99.5),
            SANDBOX_MODE: started,
            AWS_UPSTREAM: Startup(1.0, 63.4),
        },
    )
    idle, startup = (row for row in run.rows if row.goal in ("8a footprint", "8c footprint"))
    assert idle.measured.startswith("99.5 MB idle RSS after start (aws mode")
    assert f"sandbox {started.idle_rss_mb:.1f}" in idle.measured
    assert f"{AWS_UPSTREAM} 63.4" in idle.measured
    assert startup.measured.startswith("1.25 s start to /readyz 200 (aws mode")
    # Each import's cost, read in a fresh interpreter, the modes' sums marked.
    costs = import_costs()
    assert costs[0].label == "the interpreter"
    assert all(isinstance(cost, ImportCost) and cost.rss_mb > 0 for cost in costs)
    assert costs[SANDBOX_STEPS].label.startswith("uvicorn")
    assert costs[-1].rss_mb >= costs[SANDBOX_STEPS].rss_mb
