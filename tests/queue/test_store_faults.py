"""Store faults are visible and retryable: a 503 ``QueueUnavailable`` and /readyz 503,
never a 500, and never a 202 for a record that is not in the live queue file.

The in-process tests drive ``SqliteStore`` directly; the others run the real
sidecar and break its queue file or volume for real while clients post: the
file deleted, another file renamed over it, and the volume turned read-only
(an ext4 image on a loop device mounted ``errors=remount-ro``, to which the
kernel is told of an error, as a failing disk would; a tmpfs cannot be
remounted read-only while the sidecar holds files on it open for writing).
Mounting needs root, which the project's CI machines have.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from app.queue.sqlite import SqliteStore
from app.queue.store import Receipt, StoreUnavailable
from tests.conftest import PRODUCT
from tests.queue.test_queue_api import record, wait_until
from tests.queue.test_store import POLICY, _intake
from tests.sidecar import Sidecar, run_sidecar

LOST = "deleted or replaced while the sidecar ran"

# -- the store in-process ---------------------------------------------------


async def test_a_deleted_queue_file_is_refused_not_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    await store.open()
    try:
        await store.ingest([_intake(1)], all_or_nothing=True)
        await store.check_writable()
        path.unlink()
        with caplog.at_level(logging.ERROR, logger="app.queue.store"):
            for n in (2, 3):
                with pytest.raises(StoreUnavailable, match=LOST):
                    await store.ingest([_intake(n)], all_or_nothing=True)
            with pytest.raises(StoreUnavailable, match=LOST):
                await store.check_writable()
        # No fresh database was made in its place, to hide the loss.
        assert not path.exists()
        # Said loudly, once, with what a restart would lose.
        lines = [r for r in caplog.records if LOST in r.getMessage()]
        assert len(lines) == 1
        assert "restart" in lines[0].getMessage()
        assert getattr(lines[0], "records_in_unlinked_file", None) == 1
        # What was acknowledged can still be read (and sent) while the process runs.
        assert await store.get_record("ur_00000001") is not None
    finally:
        await store.close()
    assert not path.exists()


async def test_a_replaced_queue_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    await store.open()
    try:
        await store.ingest([_intake(1)], all_or_nothing=True)
        other = tmp_path / "other.sqlite3"
        with sqlite3.connect(other) as conn:
            conn.execute("CREATE TABLE other (x)")
        conn.close()
        os.replace(other, path)
        with pytest.raises(StoreUnavailable, match=LOST):
            await store.ingest([_intake(2)], all_or_nothing=True)
        with pytest.raises(StoreUnavailable, match=LOST):
            await store.check_writable()
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert tables == {"other"}


async def test_a_database_error_inside_a_write_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = SqliteStore(path, POLICY)
    await store.open()
    try:
        await store.ingest([_intake(1)], all_or_nothing=True)
        await store.check_writable()
        # From now on inserting a record fails inside the job, in the middle of the
        # write, and the transaction itself goes on (unlike SQLITE_FULL or an I/O error).
        with sqlite3.connect(path) as other:
            other.execute(
                "CREATE TRIGGER fail BEFORE INSERT ON usage_records "
                "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
            )
        other.close()
        with pytest.raises(StoreUnavailable, match="simulated write failure"):
            await store.ingest([_intake(2)], all_or_nothing=True)
        # The probe's own write works, but real work just failed: not ready.
        with pytest.raises(StoreUnavailable, match="simulated write failure"):
            await store.check_writable()
        # The writer thread is still there; nothing of the failed call was kept.
        assert await store.get_record("ur_00000001") is not None
        assert await store.get_record("ur_00000002") is None
        with sqlite3.connect(path) as other:
            other.execute("DROP TRIGGER fail")
        other.close()
        await store.ingest([_intake(3)], all_or_nothing=True)
        await store.check_writable()
    finally:
        await store.close()


async def test_any_failure_of_a_group_is_store_unavailable_and_the_writer_goes_on(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()
    try:

        def broken(conn: sqlite3.Connection) -> None:
            raise OSError(5, "Input/output error")

        with pytest.raises(StoreUnavailable, match="Input/output error"):
            await store._submit(broken)
        await store.ingest([_intake(1)], all_or_nothing=True)
    finally:
        await store.close()


async def test_a_volume_that_cannot_be_asked_for_its_free_space_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()
    try:

        def disk_usage(path: object) -> object:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        with pytest.raises(StoreUnavailable, match="free space"):
            await store.check_writable()
    finally:
        await store.close()


async def test_calls_after_close_are_refused(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "q.sqlite3", POLICY)
    await store.open()
    queued = asyncio.ensure_future(store.ingest([_intake(1)], all_or_nothing=True))
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    # A call made while the store closes is refused at once; one queued before is done.
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.ingest([_intake(2)], all_or_nothing=True)
    await closing
    assert isinstance((await queued)[0], Receipt)
    with pytest.raises(StoreUnavailable, match="not open"):
        await store.get_record("ur_00000001")


# -- the real sidecar, its file or volume broken while clients post -----------


@dataclass
class Answer:
    """One call and what it got."""

    sent_at: float
    status: int
    ids: list[str]


@dataclass
class Load:
    """Clients posting records and a client polling /readyz, until stopped."""

    url: str
    posters: int = 4
    answers: list[Answer] = field(default_factory=list)
    readiness: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._post) for _ in range(self.posters)]
        self._threads.append(threading.Thread(target=self._ready))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _post(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                batch = [record(str(uuid.uuid4().int)[:12]) for _ in range(20)]
                sent_at = time.monotonic()
                response = client.post("/v1/usage-records", json={"UsageRecords": batch})
                ids = (
                    [a["Id"] for a in response.json()["Accepted"]]
                    if response.status_code == 202
                    else []
                )
                self.answers.append(Answer(sent_at, response.status_code, ids))

    def _ready(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                self.readiness.append(client.get("/readyz").status_code)
                time.sleep(0.02)


def _env(path: Path) -> dict[str, str]:
    return {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_QUEUE_PATH": str(path),
        "METERING_QUEUE_GRACE": "3600",
    }


def _break_under_load(sidecar: Sidecar, fault: Callable[[], None]) -> tuple[Load, float]:
    """Post for a while, apply ``fault``, post on; the answers and when the fault was done."""
    assert sidecar.client.get("/readyz").status_code == 200
    with Load(sidecar.url) as load:
        wait_until(lambda: sum(a.status == 202 for a in load.answers) >= 10, 30, "no 202")
        fault()
        broken_at = time.monotonic()
        wait_until(lambda: sum(a.sent_at > broken_at for a in load.answers) >= 10, 30, "answers")
    return load, broken_at


def _assert_refused(sidecar: Sidecar, load: Load, broken_at: float, cause: str) -> None:
    """Never a 500; every call sent after the fault is a retryable 503; /readyz names it."""
    assert {a.status for a in load.answers} <= {202, 503}, sorted({a.status for a in load.answers})
    assert set(load.readiness) <= {200, 503}, sorted(set(load.readiness))
    after = [a for a in load.answers if a.sent_at > broken_at]
    assert after
    assert all(a.status == 503 for a in after), [a.status for a in after]
    response = sidecar.client.post("/v1/usage-records", json={"UsageRecords": [record("1" * 12)]})
    assert response.status_code == 503, response.text
    problem = response.json()
    assert problem["code"] == "QueueUnavailable"
    assert problem["retryable"] is True
    assert float(response.headers["Retry-After"]) > 0
    ready = sidecar.client.get("/readyz")
    assert ready.status_code == 503
    queue = ready.json()["checks"]["queue"]
    assert queue["ok"] is False
    assert cause in queue["detail"], queue["detail"]
    # The process goes on serving.
    assert sidecar.client.get("/healthz").status_code == 200


def _ids_in(path: Path, scratch: Path) -> set[str]:
    """The record ids in the queue file at ``path`` (and its WAL), read from a copy in
    ``scratch`` (the file's own volume may be read-only)."""
    if not path.exists():
        return set()
    with_wal = Path(f"{path}-wal")
    copy = scratch / f"copy-{uuid.uuid4().hex}.sqlite3"
    try:
        shutil.copyfile(path, copy)
        if with_wal.exists():
            shutil.copyfile(with_wal, f"{copy}-wal")
        with sqlite3.connect(copy) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
            ids = (
                {i for (i,) in conn.execute("SELECT id FROM usage_records")}
                if "usage_records" in tables
                else set()
            )
        conn.close()
        return ids
    finally:
        for leftover in (copy, Path(f"{copy}-wal"), Path(f"{copy}-shm")):
            leftover.unlink(missing_ok=True)


def _acknowledged(answers: list[Answer]) -> set[str]:
    return {i for a in answers if a.status == 202 for i in a.ids}


def test_a_deleted_queue_file_is_503_and_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    with run_sidecar(_env(path)) as sidecar:
        load, broken_at = _break_under_load(sidecar, path.unlink)
        _assert_refused(sidecar, load, broken_at, LOST)
        log = sidecar.log()
    assert log.count(LOST) >= 1
    assert '"level":"error"' in next(line for line in log.splitlines() if LOST in line)
    # No fresh database was created in its place, during the run or at exit ...
    assert not path.exists()
    # ... and so no 202 was answered for a record that is not in the live file.
    assert not _acknowledged([a for a in load.answers if a.sent_at > broken_at])


def test_a_replaced_queue_file_is_503_and_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"

    def replace() -> None:
        fresh = tmp_path / "fresh.sqlite3"
        with sqlite3.connect(fresh) as conn:
            conn.execute("CREATE TABLE placeholder (x)")
        conn.close()
        os.replace(fresh, path)

    with run_sidecar(_env(path)) as sidecar:
        load, broken_at = _break_under_load(sidecar, replace)
        _assert_refused(sidecar, load, broken_at, LOST)
    acknowledged = _acknowledged([a for a in load.answers if a.sent_at > broken_at])
    assert acknowledged <= _ids_in(path, tmp_path)
    assert not _ids_in(path, tmp_path)
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert tables == {"placeholder"}


@pytest.fixture
def failing_volume(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """An 8 MiB ext4 image mounted through a loop device with ``errors=remount-ro``,
    and a function that tells its kernel of an error: the volume turns read-only."""
    image = tmp_path / "volume.img"
    with image.open("wb") as file:
        file.truncate(8 * 1024 * 1024)
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True, check=False
    )
    assert made.returncode == 0, f"this test needs mkfs.ext4 (e2fsprogs): {made.stderr}"
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-o", "loop,errors=remount-ro", str(image), str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"this test mounts a loop device and needs root: {result.stderr}"

    def turn_read_only() -> None:
        device = next(
            line.split()[0]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1] == str(mount_point)
        )
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        trigger.write_text("test_store_faults: the volume fails\n")

        def read_only() -> bool:
            try:
                (mount_point / "probe").write_text("x")
            except OSError:
                return True
            return False

        wait_until(read_only, 30, "the volume turning read-only")

    try:
        yield mount_point, turn_read_only
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_volume_turned_read_only_is_503_and_not_ready(
    failing_volume: tuple[Path, Callable[[], None]], tmp_path: Path
) -> None:
    mount_point, turn_read_only = failing_volume
    path = mount_point / "queue.sqlite3"
    with run_sidecar(_env(path)) as sidecar:
        load, broken_at = _break_under_load(sidecar, turn_read_only)
        _assert_refused(sidecar, load, broken_at, "disk I/O error")
        # What was acknowledged can still be read.
        some = next(a.ids[0] for a in load.answers if a.status == 202)
        assert sidecar.client.get(f"/v1/usage-records/{some}").status_code == 200
    acknowledged = _acknowledged(load.answers)
    assert acknowledged
    # Every 202, before the fault or during it, is in the file.
    assert acknowledged <= _ids_in(path, tmp_path)
