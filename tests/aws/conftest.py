"""Fixtures for aws mode: a sidecar pointed at the fake AWS endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws, static_key_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar


@pytest.fixture(scope="session")
def aws_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """A sidecar in aws mode, signing with ``static_key``, forwarding to the fake."""
    env = {
        "METERING_ENDPOINT_URL": fake_aws_session.url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "AWS_REGION": "us-east-1",
        **FAST_RETRIES,
        **static_key_env(static_key),
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar
