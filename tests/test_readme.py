"""The README documents every setting and starts with two commands: the first installs
and starts a sandbox sidecar (run here in a fresh copy), the second is what CI runs."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx

from app.config import Settings
from tests import guides
from tests.sidecar import REPO, free_port, isolated_env


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`METERING_{name.upper()}`" in readme, name
        assert f"`--{name.replace('_', '-')}`" in readme, name


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "```sh\n./scripts/test\n```" in readme
    assert "./scripts/test" in ci


def test_first_command_installs_and_starts_a_sandbox(tmp_path: Path) -> None:
    """README's first command, typed in a fresh copy of the repository: it installs
    the project into a new venv (pip, from the package index) and starts a sandbox
    sidecar that answers. Only its listeners are moved to free ports."""
    (block,) = [b for b in guides.blocks(REPO / "README.md")[:1] if b.kind == "run"]
    command = block.text.strip()
    assert command.startswith("python3 -m venv .venv && .venv/bin/pip install . && "), command
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    clone = tmp_path / "clone"
    for name in filter(None, tracked):
        source = REPO / name.decode()
        if source.is_file():
            (clone / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name.decode())
    port, ops_port = free_port(), free_port()
    env = isolated_env(
        {
            "METERING_PORT": str(port),
            "METERING_OPS_PORT": str(ops_port),
            "METERING_QUEUE_PATH": str(tmp_path / "queue.sqlite3"),
        },
        tmp_path,
    )
    # pip as the user has it: their home (its cache and configuration) and any
    # proxy to the package index. The sandbox itself sends nothing anywhere.
    env.update(
        {
            key: value
            for key, value in os.environ.items()
            if key == "HOME" or key.upper() in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
        }
    )
    log = (tmp_path / "first-command.log").open("wb")
    process = subprocess.Popen(
        ["bash", "-c", command],
        cwd=clone,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        answer: httpx.Response | None = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.5)
        output = (tmp_path / "first-command.log").read_text(errors="replace")
        assert answer is not None, f"no sidecar answered (exit {process.poll()}):\n{output}"
        assert answer.status_code == 200, answer.text
        assert answer.json()["checks"]["mode"]["detail"].startswith("sandbox"), answer.text
        called = httpx.post(
            f"http://127.0.0.1:{port}/v1/meter-usage",
            json={"UsageDimension": "users", "UsageQuantity": 1},
            timeout=10,
        )
        assert called.status_code == 200, called.text
        assert (clone / ".venv" / "bin" / "metering-sidecar").is_file()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()
