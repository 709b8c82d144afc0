"""Faults of a PostgreSQL server the tests can force: stopped processes, lost answers.

``frozen(server)`` stops every process of a ``PgServer`` (the postmaster and its
backends) with SIGSTOP and continues them with SIGCONT: the kernel still accepts
connections and acknowledges what is sent, but nothing answers, as with a database
that hangs or a host that stalls. Keepalives see nothing wrong; only the client's
own deadline ends a call.

``TcpProxy`` forwards a local port to the server. ``lose_next_commit_answer()``
arms it: on the next connection that inserts usage records, the COMMIT that follows
is forwarded, the server's answer to it is read (so the transaction has committed),
and then both sides are closed without passing the answer on: the client sees its
connection lost during COMMIT, the outcome unknown to it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.pg import PgServer


def server_pids(server: PgServer) -> list[int]:
    """The postmaster's pid (first) and its children's."""
    postmaster = int((server.data_directory / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            children.append(int(entry.name))
    return [postmaster, *children]


def freeze(server: PgServer) -> list[int]:
    """SIGSTOP every process of ``server``; the pids stopped."""
    pids = server_pids(server)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids: list[int]) -> None:
    """SIGCONT what ``freeze`` stopped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(server: PgServer) -> Iterator[None]:
    """``server`` stopped (SIGSTOP) for the block, continued after it whatever happens."""
    pids = freeze(server)
    try:
        yield
    finally:
        thaw(pids)


class _Link:
    """One proxied connection: client and server sockets, and its fault state."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.inserted = False
        self.swallow = False
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """127.0.0.1:``port`` forwarded to ``target``; see the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._armed = False
        self.answers_lost = 0
        self._stopping = False
        self.refusing = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @classmethod
    def for_dsn(cls, dsn: str) -> tuple[TcpProxy, str]:
        """A proxy to the server ``dsn`` (a postgresql:// URL) names, and the DSN through it."""
        parts = urlsplit(dsn)
        assert parts.hostname is not None, dsn
        assert parts.port is not None, dsn
        proxy = cls(parts.port, parts.hostname)
        user = f"{parts.username}@" if parts.username else ""
        return proxy, urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))

    def cut(self) -> None:
        """The database is gone: every connection cut, new ones closed at once."""
        self.refusing = True
        with self._lock:
            links, self._links = list(self._links), []
        for link in links:
            link.close()

    def restore(self) -> None:
        """The database is back."""
        self.refusing = False

    def lose_next_commit_answer(self) -> None:
        """Arm the fault (see the module docstring); it fires once."""
        with self._lock:
            self._armed = True

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._upstream, args=(link,), daemon=True).start()
            threading.Thread(target=self._downstream, args=(link,), daemon=True).start()

    def _upstream(self, link: _Link) -> None:
        """Client to server; marks the COMMIT after an insert of usage records."""
        try:
            while data := link.client.recv(65536):
                if b"INSERT INTO usage_records" in data:
                    link.inserted = True
                if link.inserted and b"COMMIT" in data:
                    with self._lock:
                        if self._armed:
                            self._armed = False
                            link.swallow = True
                    link.inserted = False
                link.server.sendall(data)
        except OSError:
            pass
        finally:
            link.close()

    def _downstream(self, link: _Link) -> None:
        """Server to client; drops the answer to a marked COMMIT, and the connection."""
        pending = b""
        try:
            while data := link.server.recv(65536):
                if link.swallow:
                    pending += data
                    # CommandComplete "COMMIT": the server has committed; its answer
                    # never reaches the client.
                    if b"COMMIT\x00" in pending:
                        self.answers_lost += 1
                        return
                    continue
                link.client.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
