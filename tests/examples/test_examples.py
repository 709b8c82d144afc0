"""The REST examples a seller copies (examples/rest/), each run as its README says against
real sidecars: Python (httpx), Go (net/http), Java (java.net.http, `java Example.java`)
and JavaScript (fetch).

Each queues a record in the Concurrent Agreements form with an IdempotencyKey, reads it
back, makes one BatchMeterUsage call and one call the sidecar refuses, and prints one
JSON line per answer; the tests parse those lines and look at what the sidecar and the
fake AWS got. On the sandbox; and on an aws-mode sidecar that wants a token, with AWS
throttling the direct call until the sidecar gives up, so the example's own retry is
what gets it through.

The C# example cannot be run: no .NET SDK can be installed on these machines
(scripts/install-test-tools says why). Its syntax is checked with tree-sitter's C#
grammar, and nothing more is claimed. The tools come from scripts/install-test-tools; a
missing one fails the test, never skips it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import REPO, Sidecar, isolated_env, run_sidecar

EXAMPLES = REPO / "examples" / "rest"
GO_BINARY = REPO / ".tools" / "bin" / "metering-example-rest-go"
CSHARP_SYNTAX = REPO / ".tools" / "csharp-syntax" / "bin" / "python"
INSTALL_HINT = "run scripts/install-test-tools to install the examples' toolchains"
LANGUAGES = ["python", "go", "java", "javascript"]

TOKEN = "examples-sidecar-token"
ACCOUNT = "123456789012"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
RECORD_ID = re.compile(r"ur_[0-9a-f]{28}")
HOUR = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:00:00Z")


@dataclass
class Run:
    """What one run of an example printed, and how it ended."""

    returncode: int
    lines: list[dict[str, Any]]
    stderr: str

    @property
    def actions(self) -> list[str]:
        """The action of each line, in order."""
        return [line["action"] for line in self.lines]


def _fail(message: str) -> None:
    pytest.fail(f"{message}: {INSTALL_HINT}", pytrace=False)


def _command(language: str) -> list[str]:
    if language == "python":
        return [sys.executable, str(EXAMPLES / "python" / "example.py")]
    if language == "go":
        if not GO_BINARY.exists():
            _fail(f"the Go example is not built ({GO_BINARY})")
        if (EXAMPLES / "go" / "main.go").stat().st_mtime > GO_BINARY.stat().st_mtime:
            _fail(f"{GO_BINARY} is older than examples/rest/go/main.go")
        return [str(GO_BINARY)]
    if language == "java":
        if shutil.which("java") is None:
            _fail("no java on PATH")
        return ["java", str(EXAMPLES / "java" / "Example.java")]
    assert language == "javascript"
    return ["node", str(EXAMPLES / "javascript" / "example.mjs")]


def run_example(language: str, sidecar: Sidecar, tmp_path: Path, **settings: str) -> Run:
    """Run one example against ``sidecar``, in an environment with no other METERING_
    or AWS setting, plus ``settings``."""
    env = isolated_env({"METERING_URL": sidecar.url, **settings}, tmp_path)
    completed = subprocess.run(
        _command(language), env=env, capture_output=True, text=True, timeout=90, check=False
    )
    try:
        lines = [json.loads(line) for line in completed.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        pytest.fail(f"not JSON lines:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    return Run(completed.returncode, lines, completed.stderr)


def _dimension(language: str) -> str:
    return f"example-{language}-{uuid.uuid4().hex[:8]}"


def _check_queued(run: Run, sidecar: Sidecar, dimension: str, headers: dict[str, str]) -> None:
    """The first two lines: the record queued, and read back pending; the sidecar holds
    it in the Concurrent Agreements form with the example's IdempotencyKey."""
    queued, view = run.lines[:2]
    assert queued["action"] == "QueueUsage", run.lines
    assert RECORD_ID.fullmatch(queued["id"]), queued
    assert queued["status"] == "pending"
    assert HOUR.fullmatch(queued["hour"]), queued
    assert view == {"action": "GetUsageRecord", "id": queued["id"], "status": "pending"}
    stored = sidecar.client.get(f"/v1/usage-records/{queued['id']}", headers=headers)
    assert stored.status_code == 200, stored.text
    assert stored.json()["IdempotencyKey"].startswith("example-")
    record = stored.json()["Record"]
    assert record["CustomerAWSAccountId"] == ACCOUNT
    assert record["LicenseArn"] == LICENSE
    assert record["Dimension"] == dimension
    assert record["QuantityAsDecimal"] == "1.5"
    assert "ProductCode" not in record


def _check_metered(line: dict[str, Any]) -> None:
    assert line["action"] == "BatchMeterUsage", line
    assert line["status"] == "Success", line
    assert line["metering_record_id"]
    assert line["unprocessed"] == 0


def _check_refused(line: dict[str, Any]) -> None:
    """The last line: the late record's problem, printed and not retried."""
    assert line == {
        "action": "QueueUsage",
        "problem": "ValidationError",
        "status": 422,
        "detail": line["detail"],
        "retryable": False,
    }
    assert "past AWS's submission window" in line["detail"]


@pytest.mark.parametrize("language", LANGUAGES)
def test_example_queues_meters_and_prints_a_problem_on_the_sandbox(
    language: str, sandbox: Sidecar, tmp_path: Path
) -> None:
    dimension = _dimension(language)
    run = run_example(language, sandbox, tmp_path, METERING_DIMENSION=dimension)
    assert run.returncode == 0, run
    assert run.actions == ["QueueUsage", "GetUsageRecord", "BatchMeterUsage", "QueueUsage"]
    _check_queued(run, sandbox, dimension, {})
    _check_metered(run.lines[2])
    _check_refused(run.lines[3])


def _token_sidecar(fake: FakeAws, key: IssuedKey) -> contextlib.AbstractContextManager[Sidecar]:
    """An aws-mode sidecar on the fake AWS that wants ``TOKEN`` (4 attempts per call)."""
    env = {**aws_mode_env(fake.url, key, **FAST_RETRIES), "METERING_AUTH_TOKEN": TOKEN}
    return run_sidecar(env, wait_ready=True)


@pytest.fixture(scope="module")
def token_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """One token sidecar for the tests that send nothing to AWS."""
    with _token_sidecar(fake_aws_session, static_key) as sidecar:
        yield sidecar


@pytest.mark.parametrize("language", LANGUAGES)
def test_example_sends_the_token_and_retries_what_aws_throttled(
    language: str, fake_aws: FakeAws, static_key: IssuedKey, tmp_path: Path
) -> None:
    # AWS throttles as many attempts as the sidecar makes (FAST_RETRIES: 4): the sidecar
    # answers 429 ThrottlingException, retryable, with Retry-After, and the example
    # sends the call again. A sidecar of the test's own: after throttling, a sidecar
    # slows down by itself for a while, which would change the next test's answers.
    fake_aws.metering.faults.throttle(int(FAST_RETRIES["METERING_MAX_ATTEMPTS"]), "BatchMeterUsage")
    dimension = _dimension(language)
    with _token_sidecar(fake_aws, static_key) as sidecar:
        run = run_example(
            language, sidecar, tmp_path, METERING_DIMENSION=dimension, METERING_TOKEN=TOKEN
        )
        assert run.returncode == 0, run
        _check_queued(run, sidecar, dimension, {"Authorization": f"Bearer {TOKEN}"})
    retry, metered, refused = run.lines[2:]
    assert retry == {
        "action": "BatchMeterUsage",
        "problem": "ThrottlingException",
        "status": 429,
        "detail": "Rate exceeded",
        "retryable": True,
        "retry_in": 1,  # the sidecar's Retry-After
    }
    _check_metered(metered)
    _check_refused(refused)
    # AWS billed the record once, as the example sent it: no ProductCode.
    (billed,) = fake_aws.metering.batch_records.values()
    assert (billed.customer, billed.dimension, str(billed.quantity)) == (ACCOUNT, dimension, "2.5")
    assert billed.metering_record_id == metered["metering_record_id"]
    assert "ProductCode" not in billed.usage_record
    assert billed.usage_record["LicenseArn"] == LICENSE


@pytest.mark.parametrize("language", LANGUAGES)
def test_example_without_the_token_gets_unauthorized_and_stops(
    language: str, token_sidecar: Sidecar, fake_aws: FakeAws, tmp_path: Path
) -> None:
    run = run_example(language, token_sidecar, tmp_path, METERING_DIMENSION=_dimension(language))
    assert run.returncode == 1, run
    (line,) = run.lines
    assert (line["action"], line["problem"], line["status"], line["retryable"]) == (
        "QueueUsage",
        "Unauthorized",
        401,
        False,
    )
    assert "retry_in" not in line
    assert fake_aws.metering.requests == []


def test_the_csharp_example_parses_as_csharp() -> None:
    """Not a build and not a run (no .NET SDK here): the C# grammar finds no syntax error."""
    if not CSHARP_SYNTAX.exists():
        _fail(f"tree-sitter's C# grammar is not installed ({CSHARP_SYNTAX})")
    check = """
import sys
import tree_sitter_c_sharp
from tree_sitter import Language, Parser

source = open(sys.argv[1], "rb").read()
tree = Parser(Language(tree_sitter_c_sharp.language())).parse(source)
bad = []
stack = [tree.root_node]
while stack:
    node = stack.pop()
    if node.type == "ERROR" or node.is_missing:
        text = source[node.start_byte : node.end_byte][:60]
        bad.append(f"line {node.start_point[0] + 1}: {text!r}")
    stack.extend(node.children)
print(len(list(tree.root_node.children)))
print("\\n".join(bad))
"""
    program = EXAMPLES / "csharp" / "Program.cs"
    parsed = subprocess.run(
        [str(CSHARP_SYNTAX), "-c", check, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert parsed.returncode == 0, parsed.stderr
    top_level, *errors = parsed.stdout.splitlines()
    assert int(top_level) > 10  # the whole file was read
    assert [e for e in errors if e] == []
    project = (EXAMPLES / "csharp" / "MeteringExample.csproj").read_text()
    assert "<TargetFramework>net8.0</TargetFramework>" in project
