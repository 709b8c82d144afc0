"""Settings: flags over environment over defaults, every one documented, bad ones refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.__main__ import load_settings
from app.config import Settings
from tests.sidecar import REPO


def test_defaults_match_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings([])
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.region == "us-east-1"
    assert settings.endpoint_url is None
    assert settings.product_code is None
    assert settings.mode == "aws"
    assert str(settings.queue_path) == "metering-queue.sqlite3"
    assert settings.queue_mode == "saas"
    assert settings.auth_token is None


def test_region_falls_back_to_aws_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert load_settings([]).region == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    assert load_settings([]).region == "eu-central-1"
    monkeypatch.setenv("METERING_REGION", "ap-southeast-2")
    assert load_settings([]).region == "ap-southeast-2"
    assert load_settings(["--region", "us-west-2"]).region == "us-west-2"


def test_a_bare_region_variable_moves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "METERING_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REGION", "eu-west-3")
    monkeypatch.setenv("region", "eu-west-3")
    assert Settings().region == "us-east-1"


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERING_PORT", "9000")
    monkeypatch.setenv("METERING_MODE", "sandbox")
    monkeypatch.setenv("METERING_ACCESS_LOG", "false")
    settings = load_settings(["--port", "9100"])
    assert settings.port == 9100
    assert settings.mode == "sandbox"
    assert settings.access_log is False
    assert load_settings(["--access-log"]).access_log is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "70000"],
        ["--mode", "production"],
        ["--product-code", "has spaces"],
        ["--endpoint-url", "ftp://example.com"],
        ["--region", "mars"],
        ["--max-attempts", "0"],
        ["--retry-base-delay", "10", "--retry-max-delay", "1"],
    ],
)
def test_bad_settings_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv)
    assert exit_info.value.code == 2


def test_help_lists_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout, name
        assert f"METERING_{name.upper()}" in result.stdout, name
    assert "AWS_DEFAULT_REGION" in result.stdout
