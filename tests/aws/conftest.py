"""Fixtures for aws mode: a sidecar pointed at the fake AWS endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar


@pytest.fixture(scope="session")
def aws_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """A sidecar in aws mode, signing with ``static_key``, forwarding to the fake."""
    env = aws_mode_env(fake_aws_session.url, static_key, **FAST_RETRIES)
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar
