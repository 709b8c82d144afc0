"""Background loops watched, and one shutdown deadline for the whole stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from app.runtime.supervisor import ShutdownDeadline, Supervisor
from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import run_sidecar


async def test_a_loop_that_dies_is_logged_and_makes_the_sidecar_unready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    supervisor = Supervisor()
    stopped = asyncio.Event()

    async def steady() -> None:
        await stopped.wait()

    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("disk on fire")

    supervisor.spawn("steady", steady())
    with caplog.at_level(logging.ERROR, logger="app.lifetime"):
        task = supervisor.spawn("broken", broken())
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    ok, detail = supervisor.status()
    assert not ok
    assert "broken" in detail
    assert "disk on fire" in detail
    assert "steady" not in detail
    assert any(getattr(r, "loop", None) == "broken" for r in caplog.records)
    # Closing cancels what still runs, and a cancelled loop is no failure.
    await supervisor.aclose(budget=1)
    assert supervisor.status()[1] == detail


async def test_loops_closed_on_purpose_are_no_failure() -> None:
    supervisor = Supervisor()

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("forever", forever())
    assert supervisor.status() == (True, "running: forever")
    await supervisor.aclose(budget=1)
    assert supervisor.status()[0]


def test_the_deadline_counts_from_the_first_signal() -> None:
    now = [100.0]
    deadline = ShutdownDeadline(20, clock=lambda: now[0])
    now[0] = 150.0
    assert deadline.remaining() == 20
    deadline.begin()
    now[0] = 158.0
    deadline.begin()  # a second signal changes nothing
    assert deadline.remaining() == 12
    now[0] = 200.0
    assert deadline.remaining() == 0


def test_a_stop_keeps_to_one_budget_even_when_aws_hangs(
    fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    # Container mode sends the partial hour on SIGTERM; AWS never answers in time.
    fake_aws.metering.faults.delay(8, 100)
    env = aws_mode_env(
        fake_aws.url,
        static_key,
        **{
            **FAST_RETRIES,
            "METERING_QUEUE_MODE": "container",
            "METERING_SHUTDOWN_TIMEOUT": "4",
            "METERING_READ_TIMEOUT": "60",
            "METERING_REQUEST_DEADLINE": "60",
        },
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        ready = sidecar.client.get("/readyz").json()
        assert ready["checks"]["background"]["ok"] is True
        assert "usage-dispatcher" in ready["checks"]["background"]["detail"]
        queued = sidecar.client.post(
            "/v1/usage-records", json={"UsageRecords": [{"Dimension": "d", "Quantity": 1}]}
        )
        assert queued.status_code == 202, queued.text
        # A caller's request is in flight, held by AWS, when the signal comes.
        caller = threading.Thread(
            target=lambda: _swallow(
                lambda: httpx.post(
                    f"{sidecar.url}/v1/meter-usage",
                    json={"UsageDimension": "d", "UsageQuantity": 1},
                    timeout=30,
                )
            ),
            daemon=True,
        )
        caller.start()
        time.sleep(0.5)
        started = time.monotonic()
        code = sidecar.stop(signal.SIGTERM, timeout=30)
        elapsed = time.monotonic() - started
        log = sidecar.log()
    assert code in (0, -signal.SIGTERM), log[-2000:]
    # One budget of 4 s for the drain, the flush and the store, not one each (that
    # would be 4 + 4 + more); some slack for a busy machine.
    assert elapsed < 6.5, (elapsed, log[-2000:])
    assert "partial hour not fully sent before exit" in log


def _swallow(call: Callable[[], object]) -> None:
    """Run ``call``; the sidecar may hang up on it while it stops."""
    with contextlib.suppress(httpx.HTTPError):
        call()
