"""RDS IAM authentication for the shared store: the DSN carries no password and asks for
TLS, and every new connection of the pool is opened with a fresh token as its password."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import pwd
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import botocore.auth
import botocore.session
import httpx
import psycopg
import pytest
from botocore.credentials import ReadOnlyCredentials
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from psycopg import sql
from pydantic import ValidationError

from app.aws.credentials import CredentialProvider, ResolvedCredentials
from app.aws.rds_auth import RdsDatabase, region_of_host
from app.config import Settings
from app.main import create_app, rds_tokens
from app.queue.postgres import PostgresStore
from app.queue.store import GrainPolicy
from app.runtime.redaction import redact
from tests.pg import OS_USER, PgServer

POLICY = GrainPolicy(grace=dt.timedelta(minutes=5))
USER = "iam_user"
RDS_HOST = "metering.abcdefghijkl.eu-west-1.rds.amazonaws.com"


def test_the_settings_refuse_a_dsn_that_would_not_do() -> None:
    good = f"postgresql://{USER}@{RDS_HOST}:5432/metering?sslmode=verify-full"
    assert Settings(queue_dsn=good, queue_iam_auth=True).queue_iam_auth
    refusals = {
        f"postgresql://{USER}:secret@{RDS_HOST}/metering?sslmode=require": "carry no password",
        f"postgresql://{USER}@{RDS_HOST}/metering?password=secret&sslmode=require": (
            "carry no password"
        ),
        f"postgresql://{USER}@{RDS_HOST}/metering": "sslmode=require",
        f"postgresql://{USER}@{RDS_HOST}/metering?sslmode=prefer": "sslmode=require",
        f"postgresql://{USER}@{RDS_HOST}/metering?sslmode=disable": "sslmode=require",
        f"postgresql://{RDS_HOST}/metering?sslmode=require": "name the database user",
        f"postgresql://{USER}@/metering?host=/run/postgresql&sslmode=require": "one host",
    }
    for dsn, message in refusals.items():
        with pytest.raises(ValidationError, match=message) as refused:
            Settings(queue_dsn=dsn, queue_iam_auth=True)
        assert "secret" not in str(refused.value)
    with pytest.raises(ValidationError, match="needs the shared store"):
        Settings(queue_iam_auth=True)


def test_the_region_comes_from_the_endpoint_or_the_settings() -> None:
    assert region_of_host(RDS_HOST) == "eu-west-1"
    assert region_of_host("db.cluster-ro-abc.us-gov-west-1.rds.amazonaws.com") == "us-gov-west-1"
    assert region_of_host("proxy.proxy-abc.cn-north-1.rds.amazonaws.com.cn") == "cn-north-1"
    assert region_of_host("db.internal.example.com") is None
    dsn = f"postgresql://{USER}@db.internal.example.com/metering?sslmode=require"
    settings = Settings(queue_dsn=dsn, queue_iam_auth=True, region="ap-south-1")
    assert rds_tokens(settings, _provider()).database.region == "ap-south-1"
    pinned = Settings(queue_dsn=dsn, queue_iam_auth=True, queue_iam_region="us-west-2")
    assert rds_tokens(pinned, _provider()).database.region == "us-west-2"


def _provider() -> CredentialProvider:
    credentials = ReadOnlyCredentials("AKIDEXAMPLE", "secret-key", "session-token")
    return CredentialProvider(
        lambda: ResolvedCredentials(credentials, None, "test", dt.datetime.now(dt.UTC)),
        refresh_margin=900,
        retry_interval=5,
    )


async def test_a_token_is_what_botocores_rds_client_makes_with_the_sidecars_credentials(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frozen = dt.datetime(2026, 12, 7, 12, 0, 0)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: frozen)
    settings = Settings(
        queue_dsn=f"postgresql://{USER}@{RDS_HOST}:6432/metering?sslmode=verify-full",
        queue_iam_auth=True,
    )
    provider = _provider()
    await provider.start()
    try:
        tokens = rds_tokens(settings, provider)
        token = tokens()
    finally:
        await provider.close()
    assert tokens.database == RdsDatabase(RDS_HOST, 6432, USER, "eu-west-1")
    session = botocore.session.Session()
    session.set_credentials("AKIDEXAMPLE", "secret-key", "session-token")
    rds = session.create_client("rds", region_name="eu-west-1")
    expected = rds.generate_db_auth_token(RDS_HOST, 6432, USER)
    assert token == expected
    host, query = token.split("/?", 1)
    assert host == f"{RDS_HOST}:6432"
    fields = parse_qs(query)
    assert fields["Action"] == ["connect"]
    assert fields["DBUser"] == [USER]
    assert fields["X-Amz-Credential"][0].startswith("AKIDEXAMPLE/20261207/eu-west-1/rds-db/")
    # A credential while it lives: never in a log line.
    masked = redact(f"connection failed with {token}")
    assert "session-token" not in masked
    assert fields["X-Amz-Signature"][0] not in masked


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    if os.geteuid() == 0:
        user = pwd.getpwnam(OS_USER)
        for path in (cert_path, key_path):
            os.chown(path, user.pw_uid, user.pw_gid)
    return cert_path, key_path


@pytest.fixture
def tls_postgres(private_postgres: PgServer) -> tuple[PgServer, str]:
    """A server that takes ``USER`` only over TLS with a password (as RDS takes a token),
    and the DSN of its database for that user: no password in it, TLS required."""
    server = private_postgres
    cert, key = _self_signed(server.directory)
    hba = server.data_directory / "pg_hba.conf"
    hba.write_text(
        f"hostssl all {USER} 127.0.0.1/32 scram-sha-256\nhost all {USER} all reject\n"
        + hba.read_text()
    )
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SYSTEM SET ssl_cert_file = {}").format(sql.Literal(str(cert))))
        conn.execute(sql.SQL("ALTER SYSTEM SET ssl_key_file = {}").format(sql.Literal(str(key))))
        conn.execute("ALTER SYSTEM SET ssl = on")
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(USER)))
        conn.execute(sql.SQL("CREATE DATABASE fleet OWNER {}").format(sql.Identifier(USER)))
        conn.execute("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while True:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            row = conn.execute("SHOW ssl").fetchone()
        if row == ("on",):
            break
        assert time.monotonic() < deadline, "the server did not turn TLS on"
        time.sleep(0.1)
    return server, f"postgresql://{USER}@127.0.0.1:{server.port}/fleet?sslmode=require"


class RotatingTokens:
    """Stands in for RDS: each token issued becomes the user's only valid password, so a
    connection opened with an earlier one is refused, as an expired token would be."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.issued: list[str] = []

    def __call__(self) -> str:
        token = f"token-{len(self.issued) + 1}-{uuid.uuid4().hex}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(USER), sql.Literal(token)
                )
            )
        self.issued.append(token)
        return token


async def test_every_new_connection_gets_a_fresh_token_over_tls(
    tls_postgres: tuple[PgServer, str],
) -> None:
    server, dsn = tls_postgres
    # The DSN as the settings take it with IAM authentication: no password, TLS.
    assert Settings(queue_dsn=dsn, queue_iam_auth=True).queue_dsn is not None
    assert ":" not in dsn.split("@")[0].removeprefix("postgresql://")
    # Without a token the user gets nowhere.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5).close()
    tokens = RotatingTokens(server.dsn())
    store = PostgresStore(
        dsn, POLICY, pool_size=2, statement_timeout=5, claim_lease=30, password=tokens
    )
    await store.open()
    try:
        assert len(tokens.issued) == 1

        async def session(conn: Any) -> tuple[bool, str]:
            await conn.execute("SELECT pg_sleep(0.5)")
            cursor = await conn.execute(
                "SELECT ssl, current_user FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            row = await cursor.fetchone()
            return bool(row[0]), str(row[1])

        # Two calls at once: the pool opens a second connection, with a new token (the
        # first one is no longer valid, so the old one would have been refused).
        both = await asyncio.gather(store.run_fleet(session), store.run_fleet(session))
        assert list(both) == [(True, USER), (True, USER)]
        assert len(tokens.issued) == 2
        assert len(set(tokens.issued)) == 2
    finally:
        await store.close()


async def test_the_sidecar_opens_its_shared_store_with_tokens(
    tls_postgres: tuple[PgServer, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server, dsn = tls_postgres
    tokens = RotatingTokens(server.dsn())
    made: list[tuple[Settings, CredentialProvider]] = []

    def fake_rds_tokens(settings: Settings, credentials: CredentialProvider) -> RotatingTokens:
        made.append((settings, credentials))
        return tokens

    monkeypatch.setattr("app.main.rds_tokens", fake_rds_tokens)
    # The sandbox sends nothing to AWS, but signs tokens with the sidecar's credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-key")
    settings = Settings(
        mode="sandbox",
        queue_dsn=dsn,
        queue_iam_auth=True,
        queue_path=tmp_path / "spool.sqlite3",
        product_code="prod-iam",
        access_log=False,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sidecar") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
    ((seen, credentials),) = made
    assert seen is settings
    assert credentials.status()[0]
    assert tokens.issued
