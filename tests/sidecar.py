"""Run the real sidecar as a separate process (``python -m app``), the way users run it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

# Variables that would let the host's own AWS setup leak into a test.
_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_MARKETPLACE_METERING",
    "AWS_USE_FIPS_ENDPOINT",
    "AWS_USE_DUALSTACK_ENDPOINT",
    "AWS_CA_BUNDLE",
)
# Variables that would route the sidecar's outbound HTTP through the host's proxy or
# make it trust the host's CA certificates (either case; urllib and httpx read both).
_OUTBOUND_VARIABLES = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"}
)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def isolated_env(extra: Mapping[str, str], home: Path) -> dict[str, str]:
    """The test process's environment without any AWS or METERING setting, proxy or CA
    bundle, plus ``extra`` (where a test passes those itself).

    HOME points at an empty folder, so no ~/.aws files are read, and instance
    metadata is switched off so that a missing credential fails fast.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _AWS_VARIABLES
        and k.upper() not in _OUTBOUND_VARIABLES
        and not k.startswith("METERING_")
    }
    env.update(
        {
            "HOME": str(home),
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


class Sidecar:
    """A running sidecar process and an HTTP client for it."""

    def __init__(
        self, process: subprocess.Popen[bytes], url: str, log_path: Path, ops_url: str | None
    ) -> None:
        self.process = process
        self.url = url
        self.ops_url = ops_url
        self.log_path = log_path
        self.client = httpx.Client(base_url=url, timeout=30.0)

    def log(self) -> str:
        """Everything the process has written to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)


@contextlib.contextmanager
def run_sidecar(
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    *,
    port: int | None = None,
    wait_ready: bool = False,
    startup_timeout: float = 30.0,
) -> Iterator[Sidecar]:
    """Start ``python -m app`` on a free port with an isolated environment; stop it after."""
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="sidecar-") as tmp:
        home = Path(tmp)
        log_path = home / "sidecar.log"
        # The operations listener on a port of its own, on loopback (tests run many
        # sidecars at once; its default 0.0.0.0:8081 would collide).
        full_env = isolated_env(
            {
                "METERING_PORT": str(port),
                "METERING_OPS_PORT": str(free_port()),
                "METERING_OPS_HOST": "127.0.0.1",
                "METERING_QUEUE_PATH": str(home / "queue.sqlite3"),
                **(env or {}),
            },
            home,
        )
        ops_port = int(full_env["METERING_OPS_PORT"])
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", *args],
                cwd=REPO,
                env=full_env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        ops_url = f"http://127.0.0.1:{ops_port}" if ops_port else None
        sidecar = Sidecar(process, f"http://127.0.0.1:{port}", log_path, ops_url)
        try:
            _wait_until_up(sidecar, "/readyz" if wait_ready else "/healthz", startup_timeout)
            yield sidecar
        finally:
            sidecar.stop()


def _wait_until_up(sidecar: Sidecar, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sidecar.process.poll() is not None:
            raise RuntimeError(
                f"sidecar exited with {sidecar.process.returncode}:\n{sidecar.log()}"
            )
        try:
            if sidecar.client.get(path, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"sidecar did not come up within {timeout}s:\n{sidecar.log()}")
