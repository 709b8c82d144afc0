"""Shared fixtures: a sandbox sidecar, the fake AWS endpoints and keys they trust, PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fakes import FakeMetering, IssuedKey, KeyRegistry, RunningServer, serve
from tests.pg import PgServer, new_database_name
from tests.sidecar import Sidecar, run_sidecar

PRODUCT = "prod-sidecar123"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sidecar]:
    """One sandbox-mode sidecar process for the whole session."""
    with run_sidecar({"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT}) as sidecar:
        yield sidecar


# Fast retries, short deadlines: the behaviour is the same, the suite is quick.
FAST_RETRIES = {
    "METERING_MAX_ATTEMPTS": "4",
    "METERING_RETRY_BASE_DELAY": "0.02",
    "METERING_RETRY_MAX_DELAY": "0.1",
    "METERING_REQUEST_DEADLINE": "4",
    "METERING_READ_TIMEOUT": "1",
    "METERING_CONNECT_TIMEOUT": "1",
}


@dataclass
class FakeAws:
    """The fake metering endpoint, its server and the key registry it trusts."""

    registry: KeyRegistry
    metering: FakeMetering
    server: RunningServer

    @property
    def url(self) -> str:
        """Base URL of the fake metering endpoint."""
        return self.server.url


@pytest.fixture(scope="session")
def fake_aws_session() -> Iterator[FakeAws]:
    """One fake AWS Marketplace Metering endpoint for the session."""
    registry = KeyRegistry()
    metering = FakeMetering(registry, region="us-east-1")
    with serve(metering) as server:
        yield FakeAws(registry, metering, server)


@pytest.fixture
def fake_aws(fake_aws_session: FakeAws) -> FakeAws:
    """The session's fake, reset to a clean state for this test."""
    fake_aws_session.metering.quiet()
    fake_aws_session.metering.reset()
    fake_aws_session.metering.faults.clear()
    return fake_aws_session


@pytest.fixture(scope="session")
def static_key(fake_aws_session: FakeAws) -> IssuedKey:
    """Long-term keys the fake trusts, given to the sidecar through the environment."""
    return fake_aws_session.registry.issue("arn:aws:iam::123456789012:user/sidecar", None)


def static_key_env(key: IssuedKey) -> dict[str, str]:
    """Environment variables that hand ``key`` to botocore's chain."""
    return {
        "AWS_ACCESS_KEY_ID": key.access_key_id,
        "AWS_SECRET_ACCESS_KEY": key.secret_access_key,
    }


def aws_mode_env(url: str, key: IssuedKey, **extra: str) -> dict[str, str]:
    """Environment of an aws-mode sidecar forwarding to ``url``, signing with ``key``."""
    return {
        "METERING_ENDPOINT_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "AWS_REGION": "us-east-1",
        **static_key_env(key),
        **extra,
    }


# An existing PostgreSQL server for the session's databases instead of a throwaway one,
# e.g. postgresql://postgres@db:5432/postgres (its user must be allowed to create databases).
EXTERNAL_POSTGRES = "METERING_TEST_POSTGRES_DSN"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session: a throwaway one, or the one named by
    METERING_TEST_POSTGRES_DSN (which cannot be stopped or restarted).

    A server that cannot start fails every test using it, with its log in the error.
    """
    external = os.environ.get(EXTERNAL_POSTGRES)
    if external:
        yield PgServer.existing(external)
        return
    with PgServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PgServer) -> Iterator[str]:
    """The DSN of a fresh, empty database on the session's server, dropped after the test."""
    name = new_database_name()
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.drop_database(name)


@pytest.fixture
def private_postgres() -> Iterator[PgServer]:
    """A running PostgreSQL server of this test's own, which it may stop, crash and start."""
    with PgServer() as server:
        yield server
