"""Settings: flags over environment over defaults, every one documented, bad ones refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("url", "secret", "says"),
    [
        ("https://AKIDEXAMPLE:s3cr3t-pa55@metering.example.com", "s3cr3t-pa55", "user or password"),
        ("https://metering.example.com/?X-Amz-Security-Token=t0k3n-val", "t0k3n-val", "query"),
        ("https://metering.example.com/#fr4gment", "fr4gment", "fragment"),
    ],
)
def test_an_endpoint_url_with_a_secret_in_it_is_refused_without_repeating_it(
    url: str, secret: str, says: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "--endpoint-url", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid setting endpoint_url" in result.stderr
    assert says in result.stderr
    assert secret not in result.stderr + result.stdout


def test_the_dsn_is_read_from_its_file(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("  postgresql://meter:pa55@db.example.com/metering\n")
    settings = Settings(queue_dsn_file=dsn_file)
    assert settings.queue_dsn is not None
    assert (
        settings.queue_dsn.get_secret_value() == "postgresql://meter:pa55@db.example.com/metering"
    )
    assert "pa55" not in repr(settings)


@pytest.mark.parametrize(
    ("content", "says"),
    [("", "is empty"), ("mysql://meter:pa55@db/metering", "postgresql://")],
)
def test_a_bad_dsn_file_is_refused_without_repeating_it(
    tmp_path: Path, content: str, says: str
) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(content)
    result = subprocess.run(
        [sys.executable, "-m", "app", "--queue-dsn-file", str(dsn_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "pa55" not in result.stderr + result.stdout


def test_the_dsn_and_its_file_are_not_both_taken(tmp_path: Path) -> None:
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://db/metering")
    with pytest.raises(ValueError, match="not both"):
        Settings(queue_dsn_file=dsn_file, queue_dsn="postgresql://other/metering")
