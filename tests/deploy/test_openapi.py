"""The committed OpenAPI document: current, exemplified, errors documented, and fuzzed.

``openapi/openapi.json`` is what the sidecar serves at ``/openapi.json``,
written by ``scripts/gen-openapi``. Schemathesis then runs every check it has
against a live sandbox sidecar (``openapi/schemathesis.toml`` lists the few
places where AWS, not the schema, decides).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sidecar import REPO, Sidecar, run_sidecar

DOCUMENT = REPO / "openapi" / "openapi.json"
SCHEMATHESIS_CONFIG = REPO / "openapi" / "schemathesis.toml"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
METHODS = ("get", "put", "post", "delete", "patch", "options", "head")
# Operations that may answer nothing but success (liveness, metrics).
NO_ERRORS = {("get", "/healthz"), ("get", "/metrics")}
# What every /v1 operation can meet whatever it does: the token, the body
# limit, its own validation.
V1_ERRORS = {"401", "413", "422"}
# The AWS wire protocol: AWS's own statuses, AWS-shaped bodies.
WIRE_ERRORS = {"400", "403", "413", "429", "500", "502", "503", "504"}

Operation = dict[str, Any]


@pytest.fixture(scope="module")
def sidecar() -> Iterator[Sidecar]:
    """A live sidecar in sandbox mode."""
    with run_sidecar({"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": "prod-abc"}) as s:
        yield s


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    """The committed document."""
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, Operation]]:
    """(method, path, operation) for every operation."""
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref."""
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def has_example(document: dict[str, Any], node: dict[str, Any]) -> bool:
    """A media type, parameter or schema with an example of its own or of its schema."""
    if node.get("example") is not None or node.get("examples"):
        return True
    schema = node.get("schema")
    if schema is None:
        return False
    resolved = resolve(document, schema)
    return resolved.get("example") is not None or bool(resolved.get("examples"))


def test_committed_document_is_what_the_app_serves(sidecar: Sidecar) -> None:
    served = sidecar.client.get("/openapi.json")
    assert served.status_code == 200
    expected = json.dumps(served.json(), sort_keys=True, indent=2) + "\n"
    committed = DOCUMENT.read_text() if DOCUMENT.exists() else ""
    assert committed == expected, (
        "openapi/openapi.json differs from what the app serves: run ./scripts/gen-openapi "
        "and commit the result"
    )


def test_every_operation_has_a_request_example(document: dict[str, Any]) -> None:
    missing: list[str] = []
    for method, path, operation in operations(document):
        where = f"{method.upper()} {path}"
        if method in ("post", "put", "patch") and "requestBody" not in operation:
            missing.append(f"{where}: takes a body but documents none")
            continue
        if "requestBody" in operation:
            content = resolve(document, operation["requestBody"])["content"]
            missing.extend(
                f"{where}: no example of its {media_type} body"
                for media_type, media in content.items()
                if not has_example(document, media)
            )
        for parameter in operation.get("parameters", []):
            parameter = resolve(document, parameter)
            if parameter.get("required") and not has_example(document, parameter):
                missing.append(f"{where}: no example of required {parameter['name']}")
    assert not missing, "\n".join(missing)


def test_every_operation_documents_its_errors(document: dict[str, Any]) -> None:
    problems: list[str] = []
    for method, path, operation in operations(document):
        where = f"{method.upper()} {path}"
        responses: dict[str, Any] = operation["responses"]
        errors = {code: resolve(document, r) for code, r in responses.items() if code[0] in "45"}
        if (method, path) in NO_ERRORS:
            continue
        if not errors:
            problems.append(f"{where}: documents no error response")
        if path.startswith("/v1/"):
            absent = V1_ERRORS - set(errors)
            if "{" in path:
                absent |= {"404"} - set(errors)
        elif path == "/":
            absent = WIRE_ERRORS - set(errors)
        else:
            absent = set()
        if absent:
            problems.append(f"{where}: no documented {sorted(absent)}")
        for code, response in errors.items():
            if not response.get("description"):
                problems.append(f"{where} {code}: no description")
            content = response.get("content") or {}
            if not content:
                problems.append(f"{where} {code}: no body documented")
            for media_type, media in content.items():
                if "schema" not in media:
                    problems.append(f"{where} {code}: {media_type} without a schema")
                if path.startswith("/v1/"):
                    if media_type != "application/problem+json":
                        problems.append(f"{where} {code}: {media_type}, not problem+json")
                    example = media.get("example")
                    if not example:
                        problems.append(f"{where} {code}: no example problem")
                    elif str(example.get("status")) != code:
                        problems.append(f"{where} {code}: example says {example.get('status')}")
    assert not problems, "\n".join(problems)


def test_schemathesis_finds_nothing(sidecar: Sidecar, tmp_path: Path) -> None:
    if not SCHEMATHESIS.is_file():
        pytest.fail(f"no {SCHEMATHESIS}: schemathesis must be in the test extra")
    env = {
        **os.environ,
        # Moves usage Timestamps of schema-valid cases into AWS's window.
        "SCHEMATHESIS_HOOKS": "tests.deploy.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(SCHEMATHESIS_CONFIG),
        "--no-color",
        "run",
        f"{sidecar.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "30",
        "--seed",
        "20261126",
        "--generation-database",
        "none",
        # One worker: hypothesis describes filters by parsing lambdas with ast, and
        # CPython 3.11.7's ast.parse is not safe across threads ("AST constructor
        # recursion depth mismatch", a SystemError inside schemathesis itself).
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--continue-on-failure",
        # Reproductions need the real values (a ClientToken is no secret).
        "--output-sanitize",
        "false",
    ]
    for _ in range(2):
        result = subprocess.run(
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=420,
            check=False,
        )
        output = result.stdout[-20000:] + result.stderr[-5000:]
        # That CPython fault is the tool crashing, not a finding: run it once more.
        if "AST constructor recursion depth mismatch" not in output:
            break
    assert result.returncode == 0, (
        f"schemathesis found problems:\n{output}\n{sidecar.log()[-5000:]}"
    )
