"""Fixtures for the wire-protocol tests (``POST /``, raw and through real AWS clients).

The fake AWS endpoint and its keys are the root conftest's fixtures.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar

__all__ = ["AUTH_TOKEN", "WIRE_MAX_ATTEMPTS", "own_wire_sidecar", "token_sidecar", "wire_sidecar"]

# Not the default (2), so a test can tell that the setting is what counts.
WIRE_MAX_ATTEMPTS = 3
AUTH_TOKEN = "wire-test-sidecar-token"


def _aws_mode_env(fake: FakeAws, key: IssuedKey) -> dict[str, str]:
    return aws_mode_env(
        fake.url, key, METERING_WIRE_MAX_ATTEMPTS=str(WIRE_MAX_ATTEMPTS), **FAST_RETRIES
    )


@pytest.fixture(scope="session")
def wire_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """An aws-mode sidecar signing with ``static_key``, with 3 wire attempts per call."""
    with run_sidecar(_aws_mode_env(fake_aws_session, static_key), wait_ready=True) as sidecar:
        yield sidecar


@pytest.fixture
def own_wire_sidecar(fake_aws: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """Like ``wire_sidecar``, but this test's own: for a test that gets AWS to throttle
    the sidecar, which then slows down by itself for seconds (see ``own_aws_sidecar``)."""
    with run_sidecar(_aws_mode_env(fake_aws, static_key), wait_ready=True) as sidecar:
        yield sidecar


@pytest.fixture(scope="session")
def token_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """Like ``wire_sidecar``, but callers must present ``AUTH_TOKEN``."""
    env = {**_aws_mode_env(fake_aws_session, static_key), "METERING_AUTH_TOKEN": AUTH_TOKEN}
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar
