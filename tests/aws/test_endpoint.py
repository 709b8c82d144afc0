"""The upstream comes from settings and botocore's endpoint rules, nothing else."""

from __future__ import annotations

import pytest

from app.aws.endpoint import resolve_endpoint


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in (
        "AWS_USE_FIPS_ENDPOINT",
        "AWS_USE_DUALSTACK_ENDPOINT",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")


def test_regional_endpoint() -> None:
    assert (
        resolve_endpoint("us-west-2", None)
        == "https://metering.marketplace.us-west-2.amazonaws.com"
    )


def test_fips_and_dual_stack_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", "true")
    assert "fips" in resolve_endpoint("us-east-1", None)
    monkeypatch.delenv("AWS_USE_FIPS_ENDPOINT")
    monkeypatch.setenv("AWS_USE_DUALSTACK_ENDPOINT", "true")
    assert resolve_endpoint("us-east-1", None).endswith(".api.aws")


def test_service_specific_endpoint_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", "https://vpce.example.internal")
    assert resolve_endpoint("us-east-1", None) == "https://vpce.example.internal"


def test_override_wins() -> None:
    assert resolve_endpoint("us-east-1", "http://127.0.0.1:9/") == "http://127.0.0.1:9"
