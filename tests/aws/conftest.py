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


@pytest.fixture
def own_aws_sidecar(fake_aws: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """Like ``aws_sidecar``, but this test's own: for a test that gets AWS to throttle
    the sidecar. A throttled replica slows down by itself for seconds
    (``app.aws.quota.AdaptiveRate``), which on the shared sidecar would carry into
    whichever test runs next (on two workers, which one that is changes from run to run)."""
    env = aws_mode_env(fake_aws.url, static_key, **FAST_RETRIES)
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar
