"""Run an ASGI fake under a real uvicorn server in a background thread.

A real server (not an in-process transport) is the point: the sidecar and
botocore must go through sockets, keep-alive and torn connections as in prod.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from .faults import InjectedDisconnect

__all__ = ["RunningServer", "serve"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


class _HideInjectedDisconnects(logging.Filter):
    """Drop uvicorn's traceback log for connections a fake aborts on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InjectedDisconnect)


def _install_log_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideInjectedDisconnects) for f in logger.filters):
        logger.addFilter(_HideInjectedDisconnects())


@dataclass(frozen=True)
class RunningServer:
    """A started server: ``url`` is ``http://127.0.0.1:PORT`` (``https://`` with TLS; no
    trailing slash)."""

    url: str
    port: int
    app: Any


def _bind(port: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR lets a test stop a fake and restart it on the same port even
    # while the previous connections sit in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port or 0))
    return sock


@contextmanager
def serve(
    app: Any,
    port: int | None = None,
    log_level: str = "warning",
    tls: tuple[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Serve ``app`` on 127.0.0.1 (``port=None``: a free port) until the block exits;
    over TLS with ``tls`` = (certificate chain file, key file)."""
    _install_log_filter()
    sock = _bind(port)
    actual_port: int = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=actual_port,
        log_level=log_level,
        lifespan="off",
        # Leave logging configuration to pytest: records propagate to the root
        # logger and show up in "Captured log" on failure.
        log_config=None,
        # A delayed request in flight must not hold shutdown hostage.
        timeout_graceful_shutdown=2,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"fake-aws-{actual_port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + _START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError(f"uvicorn failed to start on port {actual_port}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {_START_TIMEOUT}s")
        time.sleep(0.01)
    try:
        scheme = "https" if tls else "http"
        yield RunningServer(url=f"{scheme}://127.0.0.1:{actual_port}", port=actual_port, app=app)
    finally:
        server.should_exit = True
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            server.force_exit = True
            thread.join(_STOP_TIMEOUT)
        sock.close()
