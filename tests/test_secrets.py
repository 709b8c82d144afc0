"""Secrets never reach a log line or a readiness detail, whoever prints them."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app.runtime import redaction
from app.runtime.logs import JsonFormatter
from tests.sidecar import REPO, free_port, isolated_env

PASSWORD = "Zq7%zzsecretW0rd"  # a raw "%" that is no percent-encoding: psycopg quotes it


def test_registered_secrets_are_masked_in_every_spelling() -> None:
    redaction.register("postgresql://meter:p%40ss%2Fw0rdXY@db.example.com/metering")
    text = (
        "p@ss/w0rdXY, p%40ss%2Fw0rdXY, postgresql://meter:p%40ss%2Fw0rdXY@db.example.com/metering"
    )
    masked = redaction.redact(text)
    assert "w0rdXY" not in masked
    assert masked.count(redaction.MASK) == 3


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("could not connect to postgresql://u:hunter2pw@db/x", "hunter2pw"),
        ("conninfo: host=db user=u password=hunter2pw dbname=x", "hunter2pw"),
        ("conninfo: host=db PASSWORD = 'hunter 2pw' dbname=x", "hunter 2pw"),
        ("proxy https://user:hunter2pw@proxy.example.com:3128", "hunter2pw"),
    ],
)
def test_passwords_in_urls_and_conninfo_are_masked_unregistered(text: str, secret: str) -> None:
    assert secret not in redaction.redact(text)


def test_the_json_formatter_masks_message_extras_and_tracebacks() -> None:
    redaction.register("s3cr3t-t0ken-value")
    formatter = JsonFormatter()
    try:
        raise RuntimeError("failed with s3cr3t-t0ken-value")
    except RuntimeError:
        record = logging.getLogger("test").makeRecord(
            "test",
            logging.ERROR,
            __file__,
            1,
            "token %s refused",
            ("s3cr3t-t0ken-value",),
            sys.exc_info(),
            extra={"detail": "s3cr3t-t0ken-value", "other": ["s3cr3t-t0ken-value"]},
        )
    line = formatter.format(record)
    assert "s3cr3t-t0ken-value" not in line
    parsed = json.loads(line)
    assert parsed["msg"] == f"token {redaction.MASK} refused"
    assert "RuntimeError" in parsed["exception"]


def test_a_dsn_password_psycopg_quotes_never_reaches_the_log() -> None:
    """psycopg's pool logs the part of a DSN it cannot parse; here that is the password."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        dsn_file = home / "dsn"
        dsn_file.write_text(f"postgresql://meter:{PASSWORD}@127.0.0.1:{free_port()}/metering\n")
        env = isolated_env(
            {
                "METERING_MODE": "sandbox",
                "METERING_PORT": str(port),
                "METERING_OPS_PORT": "0",
                "METERING_QUEUE_DSN_FILE": str(dsn_file),
                "METERING_QUEUE_PATH": str(home / "queue.sqlite3"),
                "METERING_QUEUE_STATEMENT_TIMEOUT": "1",
                "METERING_LOG_LEVEL": "debug",
            },
            home,
        )
        log_path = home / "sidecar.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "app"],
                cwd=REPO,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            # A store that cannot be opened no longer stops the start (usage is spooled):
            # the sidecar keeps trying, and telling why, until it is stopped.
            deadline = time.monotonic() + 20
            while "percent-encoded" not in log_path.read_text(errors="replace"):
                if time.monotonic() > deadline or process.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(1)
        finally:
            # Killed: what is logged while trying is the point, not the shutdown (which
            # waits for the store's open to give up first).
            process.kill()
            process.wait(timeout=30)
        log = log_path.read_text(errors="replace")
    # The failure itself is told (so this test can see a leak if there is one) ...
    assert "percent-encoded" in log, log
    # ... and no spelling or part of the password is.
    for part in (PASSWORD, PASSWORD.replace("%", "%25"), "zzsecret", "secretW0rd"):
        assert part not in log, part
