"""The PostgreSQL fixtures: a fresh database per test, and a server a test may stop."""

from __future__ import annotations

import psycopg
import pytest

from tests.pg import PgServer, PgServerError, new_database_name


def test_postgres_dsn_runs_queries(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT current_database(), 1 + 1").fetchone()
    assert row is not None
    assert row[0].startswith("test_")
    assert row[1] == 2


def test_each_database_is_fresh_and_separate(postgres_server: PgServer, postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE usage (quantity int)")
        conn.execute("INSERT INTO usage VALUES (7)")
    other = new_database_name()
    other_dsn = postgres_server.create_database(other)
    try:
        assert other_dsn != postgres_dsn
        with psycopg.connect(other_dsn) as conn:
            row = conn.execute("SELECT to_regclass('usage') IS NULL").fetchone()
        assert row == (True,)
    finally:
        postgres_server.drop_database(other)


def test_private_server_stops_and_starts_with_its_data(private_postgres: PgServer) -> None:
    dsn = private_postgres.create_database()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE usage (quantity int)")
        conn.execute("INSERT INTO usage VALUES (1)")

    private_postgres.stop()
    assert not private_postgres.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)

    private_postgres.start()
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO usage VALUES (2)")

    # A crash: committed rows come back through WAL replay.
    private_postgres.stop("immediate")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
    private_postgres.start()
    private_postgres.restart()
    assert (
        private_postgres.dsn()
        == f"postgresql://postgres@127.0.0.1:{private_postgres.port}/postgres"
    )
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT quantity FROM usage ORDER BY quantity").fetchall()
    assert rows == [(1,), (2,)]


def test_an_existing_server_cannot_be_stopped(postgres_server: PgServer) -> None:
    existing = PgServer.existing(postgres_server.dsn())
    assert existing.is_running()
    for action in (existing.stop, existing.start, existing.restart):
        with pytest.raises(PgServerError, match="existing PostgreSQL server"):
            action()
