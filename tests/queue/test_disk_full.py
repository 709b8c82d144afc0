"""A full disk: the queue refuses with 503 (never a false 202) and /readyz says not ready.

The queue's volume is a tiny tmpfs, filled for real; this needs root to
mount, which the project's CI machines have.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PRODUCT
from tests.queue.test_queue_api import record
from tests.sidecar import run_sidecar


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test."""
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"this test mounts a tmpfs and needs root: {result.stderr}"
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_full_disk_is_503_and_not_ready(tiny_volume: Path) -> None:
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_PATH": str(tiny_volume / "queue.sqlite3"),
        "METERING_QUEUE_GRACE": "3600",
    }
    with run_sidecar(env) as sidecar:
        assert sidecar.client.get("/readyz").status_code == 200
        accepted: list[str] = []
        status = 202
        for _ in range(50):
            batch = [record(str(uuid.uuid4().int)[:12]) for _ in range(500)]
            response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": batch})
            status = response.status_code
            if status != 202:
                break
            accepted += [a["Id"] for a in response.json()["Accepted"]]
        assert status == 503, "the tiny volume never filled up"
        problem = response.json()
        assert problem["code"] == "QueueUnavailable"
        assert problem["retryable"] is True
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["queue"]["ok"] is False
        # Everything that was acknowledged is still there and readable.
        assert accepted
        for record_id in (accepted[0], accepted[-1]):
            assert sidecar.client.get(f"/v1/usage-records/{record_id}").status_code == 200
        assert sidecar.client.get("/healthz").status_code == 200
