"""Real AWS clients against a real sidecar: boto3, the AWS CLI v1, the JavaScript SDK v3 and
the Go SDK v1 (plus curl on the REST API), each through its program in examples/.

Each program calls all four actions and two calls that must fail, and prints one
JSON line per call; the tests parse those lines. Both modes: sandbox, and aws
mode against the signature-verifying fake. The CLI, JavaScript and Go tools come
from scripts/install-test-tools; a missing one fails the test, never skips it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import PRODUCT, FakeAws
from tests.fakes import IssuedKey, isolate_aws_env
from tests.sidecar import REPO, Sidecar, isolated_env
from tests.wire.conftest import AUTH_TOKEN

EXAMPLES = REPO / "examples"
AWS_CLI = REPO / ".tools" / "awscli" / "bin" / "aws"
GO_EXAMPLE = REPO / ".tools" / "bin" / "metering-example-go"
JS_SDK = EXAMPLES / "javascript" / "node_modules" / "@aws-sdk" / "client-marketplace-metering"
INSTALL_HINT = "run scripts/install-test-tools to install the AWS clients the tests use"

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
ACCOUNT = "123456789012"
REGISTRATION_TOKEN = "reg-token-sdk-clients"
# What the fake answers for REGISTRATION_TOKEN in aws mode.
CUSTOMER = {
    "CustomerIdentifier": "",
    "CustomerAWSAccountId": ACCOUNT,
    "ProductCode": PRODUCT,
    "LicenseArn": LICENSE,
    "Metadata": {"AgreementId": "agmt-sdk-clients"},
}

SUCCESSES = ["MeterUsage", "BatchMeterUsage", "ResolveCustomer", "RegisterUsage"]
# The error each program provokes, in order, and the codes it must see.
ERRORS = [("ResolveCustomer", "InvalidTokenException"), ("MeterUsage", "ValidationException")]


@dataclass(frozen=True)
class Client:
    """How a program reports the two errors: its own error class names, per error."""

    name: str
    error_types: tuple[str, str]
    validation_code: str = "ValidationException"


CLIENTS = {
    "boto3": Client("boto3", ("InvalidTokenException", "ClientError")),
    "aws-cli": Client("aws-cli", ("ClientError", "ClientError")),
    "javascript": Client(
        "javascript", ("InvalidTokenException", "MarketplaceMeteringServiceException")
    ),
    "go": Client("go", ("*marketplacemetering.InvalidTokenException", "*awserr.requestError")),
    # The REST API's problem documents: AWS's code, or the sidecar's own for validation.
    "curl": Client("curl", ("", ""), validation_code="ValidationError"),
}


@dataclass
class Target:
    """A sidecar to run a client against; ``fake`` is set in aws mode."""

    sidecar: Sidecar
    fake: FakeAws | None
    key: IssuedKey | None


@pytest.fixture(params=["sandbox", "aws"])
def target(request: pytest.FixtureRequest) -> Target:
    """The sandbox sidecar, or the aws-mode sidecar with a freshly reset fake."""
    if request.param == "sandbox":
        return Target(request.getfixturevalue("sandbox"), None, None)
    fake: FakeAws = request.getfixturevalue("fake_aws")
    fake.metering.registration_tokens[REGISTRATION_TOKEN] = dict(CUSTOMER)
    return Target(
        request.getfixturevalue("wire_sidecar"), fake, request.getfixturevalue("static_key")
    )


def _settings(url: str, dimension: str) -> dict[str, str]:
    return {
        "METERING_URL": url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_DIMENSION": dimension,
        "METERING_REGISTRATION_TOKEN": REGISTRATION_TOKEN,
    }


def _require(path: Path, what: str) -> None:
    if not path.exists():
        pytest.fail(f"{what} is missing ({path}): {INSTALL_HINT}", pytrace=False)


def _run_program(command: list[str], env: dict[str, str]) -> list[dict[str, Any]]:
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, (
        f"{command} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    return [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]


def _program_env(tmp_path: Path, settings: dict[str, str]) -> dict[str, str]:
    """The test's environment less any AWS or METERING setting, HOME empty, plus ``settings``."""
    env = isolated_env(settings, tmp_path)
    env["PATH"] = f"{AWS_CLI.parent}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def _load_boto3_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "metering_example_boto3", EXAMPLES / "python_boto3.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_boto3(settings: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    isolate_aws_env(monkeypatch, tmp_path)
    example = _load_boto3_example()
    return example.run(
        settings["METERING_URL"],
        settings["METERING_PRODUCT_CODE"],
        dimension=settings["METERING_DIMENSION"],
        registration_token=settings["METERING_REGISTRATION_TOKEN"],
        access_key_id=settings.get("METERING_AUTH_TOKEN", "placeholder"),
    )


def _run_client(
    name: str, settings: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> list[dict[str, Any]]:
    """Run client ``name``'s example program with ``settings``; its JSON lines."""
    if name == "boto3":
        lines: list[dict[str, Any]] = _run_boto3(settings, monkeypatch, tmp_path)
        return lines
    env = _program_env(tmp_path, settings)
    if name == "aws-cli":
        _require(AWS_CLI, "The AWS CLI")
        return _run_program(["bash", str(EXAMPLES / "aws_cli.sh")], env)
    if name == "javascript":
        _require(JS_SDK, "The AWS SDK for JavaScript")
        return _run_program(["node", str(EXAMPLES / "javascript" / "index.mjs")], env)
    if name == "go":
        _require(GO_EXAMPLE, "The Go example (AWS SDK for Go)")
        source = EXAMPLES / "go" / "main.go"
        if source.stat().st_mtime > GO_EXAMPLE.stat().st_mtime:
            pytest.fail(f"{GO_EXAMPLE} is older than {source}: {INSTALL_HINT}", pytrace=False)
        return _run_program([str(GO_EXAMPLE)], env)
    assert name == "curl"
    return _run_program(["bash", str(EXAMPLES / "curl.sh")], env)


def _check_successes(lines: list[dict[str, Any]], target: Target) -> None:
    actions = [line["action"] for line in lines]
    assert actions == SUCCESSES + [action for action, _ in ERRORS], lines
    meter, batch, customer, registered = (line["result"] for line in lines[:4])
    assert meter["MeteringRecordId"]
    (record,) = batch["Results"]
    assert record["Status"] == "Success", batch
    assert record["MeteringRecordId"]
    assert batch["UnprocessedRecords"] == []
    assert customer["CustomerAWSAccountId"]
    if target.fake is not None:
        assert customer["CustomerAWSAccountId"] == ACCOUNT
        assert customer["ProductCode"] == PRODUCT
    assert registered["Signature"].count(".") == 2
    assert registered["PublicKeyRotationTimestamp"]


def _check_errors(lines: list[dict[str, Any]], client: Client) -> None:
    invalid_token, validation = lines[4:]
    assert invalid_token["error"] == "InvalidTokenException", invalid_token
    assert validation["error"] == client.validation_code, validation
    assert "UsageAllocations" in validation["message"], validation
    if client.name == "curl":
        assert (invalid_token["status"], validation["status"]) == (400, 422)
    else:
        assert (invalid_token["error_type"], validation["error_type"]) == client.error_types


def _check_forwarded(target: Target, placeholder: str = "placeholder") -> None:
    """In aws mode: the fake saw the calls signed with the sidecar's real key only."""
    if target.fake is None:
        return
    assert target.key is not None
    requests = target.fake.metering.requests
    # The validation failure never left the sidecar.
    assert [r.action for r in requests] == [*SUCCESSES, "ResolveCustomer"]
    for request in requests:
        assert request.signature_valid, request
        assert request.access_key_id == target.key.access_key_id
        assert placeholder not in json.dumps(request.headers)


@pytest.mark.parametrize("name", list(CLIENTS))
def test_client_calls_every_action_and_gets_typed_errors(
    name: str, target: Target, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dimension = f"{name}-{uuid.uuid4().hex[:12]}"
    lines = _run_client(name, _settings(target.sidecar.url, dimension), monkeypatch, tmp_path)
    _check_successes(lines, target)
    _check_errors(lines, CLIENTS[name])
    _check_forwarded(target)


def test_boto3_with_the_auth_token_as_access_key_id(
    token_sidecar: Sidecar,
    fake_aws: FakeAws,
    static_key: IssuedKey,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    fake_aws.metering.registration_tokens[REGISTRATION_TOKEN] = dict(CUSTOMER)
    settings = {
        **_settings(token_sidecar.url, f"boto3-{uuid.uuid4().hex[:12]}"),
        "METERING_AUTH_TOKEN": AUTH_TOKEN,
    }
    lines = _run_client("boto3", settings, monkeypatch, tmp_path)
    target = Target(token_sidecar, fake_aws, static_key)
    _check_successes(lines, target)
    _check_forwarded(target, placeholder=AUTH_TOKEN)


def test_boto3_with_a_wrong_auth_token_gets_unrecognized_client(
    token_sidecar: Sidecar, fake_aws: FakeAws, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = {
        **_settings(token_sidecar.url, f"boto3-{uuid.uuid4().hex[:12]}"),
        "METERING_AUTH_TOKEN": "not-the-token",
    }
    with pytest.raises(ClientError) as caught:
        _run_client("boto3", settings, monkeypatch, tmp_path)
    assert caught.value.response["Error"]["Code"] == "UnrecognizedClientException"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert fake_aws.metering.requests == []
