"""Shared fixtures: a sandbox sidecar, and (in tests/aws) the fake AWS endpoints."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sidecar import Sidecar, run_sidecar

PRODUCT = "prod-sidecar123"


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sidecar]:
    """One sandbox-mode sidecar process for the whole session."""
    with run_sidecar({"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT}) as sidecar:
        yield sidecar
