"""The HTTP servers: the API listener and the operations listener, one process, one loop.

The API listener (``METERING_HOST``, loopback by default) serves everything;
the operations listener (``METERING_OPS_HOST``/``METERING_OPS_PORT``) serves
only ``/healthz``, ``/readyz`` and ``/metrics``, without the token, so kubelet
probes and Prometheus reach them while the API stays private. Both share the
running sidecar's state.

Both run uvicorn over httptools, with the limits of ``app.server.guard``.

The API listener owns the signals: on SIGTERM it drains and runs the
lifespan's shutdown while the operations listener keeps answering probes;
then that one stops too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn._compat import asyncio_run

from app.config import Settings
from app.runtime.supervisor import ShutdownDeadline
from app.server.guard import guarded_protocol


class _ApiServer(uvicorn.Server):
    """The API listener: owns the signals, and starts the shutdown deadline's clock."""

    def __init__(self, config: uvicorn.Config, deadline: ShutdownDeadline | None) -> None:
        super().__init__(config)
        self._deadline = deadline

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._deadline is not None:
            self._deadline.begin()
        super().handle_exit(sig, frame)


class _OpsServer(uvicorn.Server):
    """The operations listener: the API listener owns the signals and says when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _config(
    app: Any, settings: Settings, host: str, port: int, *, bodies: bool = True, **options: Any
) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=guarded_protocol(settings, bodies=bodies),
        # No WebSockets (the guard renames every Upgrade header): uvicorn's "auto" would
        # import a WebSocket library wherever one is installed.
        ws="none",
        access_log=False,
        log_config=None,
        server_header=False,
        # Callers are on the pod's loopback or network: no proxy in front whose
        # X-Forwarded-* headers should rewrite the client (and one layer less).
        proxy_headers=False,
        timeout_keep_alive=math.ceil(settings.keepalive_timeout),
        **options,
    )


def _bind(host: str, port: int) -> socket.socket:
    """The operations listener's socket, bound now: a port in use fails the start loudly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve(app: Any, ops_app: Any | None, settings: Settings) -> None:
    """Serve the API (and the operations listener, if on) until SIGTERM has drained them."""
    # The drain of in-flight requests may spend half the shutdown budget; the rest
    # is the queue's (its last cycle, the partial hour in container mode, the store).
    deadline: ShutdownDeadline | None = getattr(app.state, "shutdown", None)
    api = _ApiServer(
        _config(
            app,
            settings,
            settings.host,
            settings.port,
            lifespan="on",
            timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout / 2)),
        ),
        deadline,
    )
    if ops_app is None or settings.ops_port == 0:
        await api.serve()
        return
    sock = _bind(settings.ops_host, settings.ops_port)
    ops = _OpsServer(
        _config(
            ops_app, settings, settings.ops_host, settings.ops_port, bodies=False, lifespan="off"
        )
    )
    ops_task = asyncio.create_task(ops.serve(sockets=[sock]), name="ops-listener")
    try:
        await api.serve()
    finally:
        ops.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await ops_task
        sock.close()


def run(app: Any, ops_app: Any | None, settings: Settings) -> None:
    """Run both listeners on uvloop until the process is told to stop."""
    # A Config only for its loop factory: without log_config it leaves logging alone.
    config = uvicorn.Config(app, loop="uvloop", log_config=None)
    asyncio_run(serve(app, ops_app, settings), loop_factory=config.get_loop_factory())
