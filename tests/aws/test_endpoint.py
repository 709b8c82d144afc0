"""The upstream comes from settings and botocore's endpoint rules, nothing else."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import botocore.session
import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.loaders import Loader

from app.aws.endpoint import SERVICE_NAME, resolve_endpoint


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    for name in (
        "AWS_USE_FIPS_ENDPOINT",
        "AWS_USE_DUALSTACK_ENDPOINT",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING",
        "AWS_PROFILE",
        "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
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


def _sent_to(region: str) -> str:
    """Where a botocore client of the service sends a call in ``region``: its request is
    answered in process (``before-send``), so nothing leaves the machine."""
    client = botocore.session.Session().create_client(
        SERVICE_NAME,
        region_name=region,
        aws_access_key_id="AKIAEXAMPLE",
        aws_secret_access_key="example-secret",
    )
    sent: list[str] = []

    class _Body:
        def stream(self, **_: object) -> Iterator[bytes]:
            yield b'{"Results": [], "UnprocessedRecords": []}'

    def answer(request: AWSPreparedRequest, **_: object) -> AWSResponse:
        sent.append(request.url)
        return AWSResponse(request.url, 200, {}, _Body())

    client.meta.events.register("before-send", answer)
    try:
        client.batch_meter_usage(UsageRecords=[], ProductCode="prod-example")
    finally:
        client.close()
    return sent[0].rstrip("/")


@pytest.mark.parametrize(
    "region",
    ["us-east-1", "eu-central-2", "ap-east-2", "cn-north-1", "us-gov-west-1", "eusc-de-east-1"],
)
def test_the_endpoint_is_where_an_sdk_client_sends(
    monkeypatch: pytest.MonkeyPatch, region: str
) -> None:
    # The rule set decides where a client's requests go (for dual-stack in several
    # regions not where a client's legacy ``meta.endpoint_url`` says).
    for fips, dual_stack in itertools.product(("false", "true"), repeat=2):
        monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", fips)
        monkeypatch.setenv("AWS_USE_DUALSTACK_ENDPOINT", dual_stack)
        assert resolve_endpoint(region, None) == _sent_to(region), (region, fips, dual_stack)


def test_configured_endpoints_as_an_sdk_client_reads_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://everything.example.internal/")
    assert resolve_endpoint("us-east-1", None) == "https://everything.example.internal"
    assert _sent_to("us-east-1") == "https://everything.example.internal"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = tmp_path / "config"
    config.write_text(
        "[default]\nservices = vpc\n\n"
        "[services vpc]\nmarketplace_metering =\n  endpoint_url = https://vpce.example.internal\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert resolve_endpoint("us-east-1", None) == "https://vpce.example.internal"
    assert _sent_to("us-east-1") == "https://vpce.example.internal"
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    assert resolve_endpoint("us-east-1", None) == _sent_to("us-east-1")
    assert resolve_endpoint("us-east-1", None).endswith(".us-east-1.amazonaws.com")


def test_a_configured_endpoint_botocore_refuses_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", "not a url")
    with pytest.raises(ValueError, match="Invalid endpoint"):
        resolve_endpoint("us-east-1", None)
    with pytest.raises(ValueError, match="Invalid endpoint"):
        _sent_to("us-east-1")


def test_no_client_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client would load endpoints.json: 1.2 MB of JSON, several MB of RSS for good.
    read: list[str] = []
    load = Loader.load_data_with_path

    def recording(self: Loader, name: str) -> object:
        read.append(name)
        return load(self, name)

    monkeypatch.setattr(Loader, "load_data_with_path", recording)
    monkeypatch.setenv("AWS_USE_DUALSTACK_ENDPOINT", "true")
    assert resolve_endpoint("eu-west-1", None) == "https://metering-marketplace.eu-west-1.api.aws"
    assert "endpoints" not in read
