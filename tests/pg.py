"""A throwaway PostgreSQL server for the tests: its own data directory, port, socket and log.

``PgServer`` runs the PostgreSQL binaries Debian installs (the highest version under
``/usr/lib/postgresql/*/bin``; ``./scripts/install-postgres`` installs them) on a fresh
data directory in a temporary folder. It listens on 127.0.0.1 only, on a port that was
free when it first started, and keeps its unix socket and its log (``server.log``) in
that folder. Authentication is ``trust``: connect as ``postgres`` without a password.

PostgreSQL refuses to run as root, and the tests run as root in CI, so when the
process is root, initdb and pg_ctl run as the ``postgres`` OS user (through
``runuser``) and the folder is handed to that user; otherwise they run as the
current user.

The data directory outlives :meth:`PgServer.stop`: a test can stop the server (even
with ``mode="immediate"``, a crash) and start it again on the same port with its data
intact. :meth:`PgServer.close` stops it and removes the folder::

    with PgServer() as pg:
        dsn = pg.create_database()
        ...

:meth:`PgServer.existing` wraps a server someone else runs (given by a DSN) behind the
same interface: databases can be created and dropped on it, but it cannot be stopped
or started.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.sidecar import free_port

POSTGRES_ROOT = Path("/usr/lib/postgresql")
# The OS user the server runs as when the tests run as root.
OS_USER = "postgres"
# The database superuser initdb creates; trusted without a password.
SUPERUSER = "postgres"
# Small and quick. Durability (fsync, synchronous_commit, full_page_writes) stays at
# PostgreSQL's defaults, so a stop or crash behaves the way it does in production.
SETTINGS = {"shared_buffers": "32MB", "max_connections": "200"}
# How much of the server log an error message quotes.
LOG_TAIL_LINES = 40

StopMode = Literal["fast", "immediate"]


class PgServerError(RuntimeError):
    """The server could not be set up, started or stopped, or cannot do that in its mode."""


def find_bindir(root: Path = POSTGRES_ROOT) -> Path:
    """The ``bin`` folder of the highest PostgreSQL version installed under ``root``."""
    found: list[tuple[tuple[int, ...], Path]] = []
    for postgres in root.glob("*/bin/postgres"):
        version = tuple(int(part) for part in re.findall(r"\d+", postgres.parent.parent.name))
        found.append((version, postgres.parent))
    if not found:
        raise PgServerError(
            f"no PostgreSQL server found as {root}/*/bin/postgres; "
            "install it with ./scripts/install-postgres"
        )
    return max(found)[1]


def new_database_name() -> str:
    """A database name no other test uses."""
    return f"test_{uuid.uuid4().hex[:16]}"


def with_database(dsn: str, database: str) -> str:
    """``dsn`` (a URL or a ``key=value`` string) naming ``database`` instead of its own."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + quote(database, safe="")))
    return make_conninfo(dsn, dbname=database)


class PgServer:
    """A PostgreSQL server of the test's own, or an existing one given by a DSN.

    Nothing happens until :meth:`start` (or ``with``): the first start creates the
    temporary folder, runs initdb and picks the port; later starts reuse both.
    """

    def __init__(self, bindir: Path | None = None, *, start_timeout: float = 60.0) -> None:
        """Prepare a server run by the binaries in ``bindir`` (default: :func:`find_bindir`).

        ``start_timeout`` bounds how long :meth:`start` waits for connections.
        """
        self._bindir = bindir
        self.start_timeout = start_timeout
        self._external_dsn: str | None = None
        self._directory: Path | None = None
        self._port: int | None = None

    @classmethod
    def existing(cls, dsn: str) -> PgServer:
        """A server someone else runs, reached through ``dsn`` as a user that may create
        databases: :meth:`create_database` and :meth:`drop_database` work through it,
        :meth:`start`, :meth:`stop` and :meth:`restart` raise :class:`PgServerError`.
        """
        server = cls()
        server._external_dsn = dsn
        return server

    # --- where things are -----------------------------------------------------------

    @property
    def is_external(self) -> bool:
        """Whether this wraps an existing server rather than running its own."""
        return self._external_dsn is not None

    @property
    def bindir(self) -> Path:
        """The folder with initdb, pg_ctl and postgres."""
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    @property
    def directory(self) -> Path:
        """The temporary folder: data directory, unix socket and log."""
        if self._directory is None:
            raise PgServerError("the server has not been started yet")
        return self._directory

    @property
    def data_directory(self) -> Path:
        """The server's data directory (PGDATA)."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.directory / "server.log"

    @property
    def port(self) -> int:
        """The TCP port on 127.0.0.1, fixed at the first start."""
        if self._port is None:
            raise PgServerError("the server has not been started yet")
        return self._port

    def dsn(self, database: str = "postgres") -> str:
        """A ``postgresql://postgres@127.0.0.1:PORT/DATABASE`` URL for ``database``.

        For an existing server: its DSN, naming ``database`` instead.
        """
        if self._external_dsn is not None:
            return with_database(self._external_dsn, database)
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{quote(database, safe='')}"

    # --- databases --------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (from template0) named ``name``, or a fresh unique
        name by default, and return its DSN."""
        name = name or new_database_name()
        self._admin(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending any session still connected to it."""
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _admin(self, statement: sql.Composed) -> None:
        """Run ``statement`` outside a transaction, connected to the maintenance database."""
        admin_dsn = self._external_dsn if self._external_dsn is not None else self.dsn()
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(statement)

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it accepts connections on its port.

        The first start creates the data directory; a later one (after :meth:`stop`)
        reuses it and the port. Raises :class:`PgServerError`, quoting the server log,
        when the server does not come up within ``start_timeout`` seconds.
        """
        self._require_own("start")
        if self.is_running():
            raise PgServerError(f"the server is already running on port {self.port}")
        if self._directory is None:
            self._initdb()
        if self._port is None:
            # Picked as late as possible: the port stays free only until someone binds it.
            self._port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.directory),
            **SETTINGS,
        }
        options = shlex.join(
            arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")
        )
        deadline = time.monotonic() + self.start_timeout
        # pg_ctl starts postgres through the shell with its output sent to the log, so
        # nothing holds on to the pipes captured here once pg_ctl exits.
        result = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "--pgdata",
                str(self.data_directory),
                "--log",
                str(self.log_path),
                "--options",
                options,
                "--wait",
                "--timeout",
                str(math.ceil(self.start_timeout)),
            ],
            timeout=self.start_timeout + 30,
        )
        if result.returncode != 0:
            raise PgServerError(self._failure("pg_ctl start failed", result))
        self._wait_for_connections(deadline)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is down; the data directory stays.

        ``fast`` ends the sessions and shuts down cleanly; ``immediate`` kills the server
        the way a crash would, so the next start replays the WAL.
        """
        self._require_own("stop")
        if not self.is_running():
            raise PgServerError("the server is not running")
        result = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "--pgdata",
                str(self.data_directory),
                "--mode",
                mode,
                "--wait",
                "--timeout",
                "60",
            ],
            timeout=90,
        )
        if result.returncode != 0:
            raise PgServerError(self._failure(f"pg_ctl stop --mode {mode} failed", result))

    def restart(self) -> None:
        """Stop the server (``fast``) and start it again on the same port."""
        self._require_own("restart")
        self.stop("fast")
        self.start()

    def is_running(self) -> bool:
        """Whether the server is up (for an existing server: whether it accepts a connection)."""
        if self._external_dsn is not None:
            try:
                with psycopg.connect(self._external_dsn, connect_timeout=5):
                    return True
            except psycopg.OperationalError:
                return False
        if self._directory is None:
            return False
        status = [str(self.bindir / "pg_ctl"), "status", "--pgdata", str(self.data_directory)]
        # 0: running; 3: not running; 4: no data directory.
        return self._run(status, timeout=30).returncode == 0

    def close(self) -> None:
        """Stop the server if it runs and remove its folder; nothing for an existing server."""
        if self._external_dsn is not None or self._directory is None:
            return
        if self.is_running():
            self.stop("fast")
        shutil.rmtree(self._directory)
        self._directory = None
        self._port = None

    def __enter__(self) -> PgServer:
        """Start the server unless it runs already (or is an existing one)."""
        if self._external_dsn is None and not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server and remove its folder."""
        self.close()

    # --- helpers ---------------------------------------------------------------------------

    def _require_own(self, action: str) -> None:
        """Refuse ``action`` on an existing server: it is not ours to stop or start."""
        if self._external_dsn is not None:
            raise PgServerError(
                f"cannot {action} an existing PostgreSQL server (METERING_TEST_POSTGRES_DSN); "
                "tests that stop or restart the database use their own server "
                "(the private_postgres fixture)"
            )

    def _initdb(self) -> None:
        """Create the temporary folder and an empty data directory in it."""
        initdb = self.bindir / "initdb"  # found before anything is created
        directory = Path(tempfile.mkdtemp(prefix="metering-pg-"))
        try:
            if os.geteuid() == 0:
                try:
                    user = pwd.getpwnam(OS_USER)
                except KeyError:
                    raise PgServerError(
                        f"running as root, but there is no {OS_USER!r} OS user to run "
                        "PostgreSQL as (PostgreSQL refuses to run as root)"
                    ) from None
                os.chown(directory, user.pw_uid, user.pw_gid)
            self._directory = directory
            result = self._run(
                [
                    str(initdb),
                    "--pgdata",
                    str(self.data_directory),
                    "--username",
                    SUPERUSER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    # C: no dependence on the locales this machine happens to have.
                    "--locale=C",
                    "--no-sync",
                ],
                timeout=120,
            )
            if result.returncode != 0:
                raise PgServerError(self._failure("initdb failed", result, log=False))
        except BaseException:
            self._directory = None
            shutil.rmtree(directory, ignore_errors=True)
            raise

    def _run(self, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the server's OS user, in the server's folder."""
        if os.geteuid() == 0:
            args = ["runuser", "-u", OS_USER, "--", *args]
        try:
            return subprocess.run(
                args,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise PgServerError(
                f"{shlex.join(args)} did not finish within {timeout:g} s\n{self._log_tail()}"
            ) from error

    def _wait_for_connections(self, deadline: float) -> None:
        """Connect over TCP until the server accepts, or raise once ``deadline`` passes."""
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=5):
                    return
            except psycopg.OperationalError as error:
                if time.monotonic() >= deadline:
                    raise PgServerError(
                        f"PostgreSQL on port {self.port} did not accept connections within "
                        f"{self.start_timeout:g} s: {error}\n{self._log_tail()}"
                    ) from error
            time.sleep(0.05)

    def _failure(
        self, message: str, result: subprocess.CompletedProcess[str], *, log: bool = True
    ) -> str:
        """An error message with the program's output and, if ``log``, the server log's end."""
        parts = [f"{message} (exit status {result.returncode}): {shlex.join(result.args)}"]
        output = (result.stdout + result.stderr).strip()
        if output:
            parts.append(output)
        if log:
            parts.append(self._log_tail())
        return "\n".join(parts)

    def _log_tail(self) -> str:
        """The last lines of the server log, introduced by its path."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, PgServerError):
            return "(no server log)"
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"--- last {LOG_TAIL_LINES} lines of {self.log_path} ---\n{tail}"
