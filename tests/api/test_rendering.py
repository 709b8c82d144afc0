"""One JSON rendering for every answer (``app.api.rendering``): absent members left out."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tests.sidecar import REPO, Sidecar

API = REPO / "app" / "api"
# What renders JSON by itself: only app.api.rendering may call these (``encode`` is
# app.metering.protocol's, called by name; ``str.encode`` is an attribute call).
_RENDERERS = {"model_dump_json", "dumps", "encode", "JSONResponse"}


def _calls(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr != "encode":
                names.add(func.attr)
            elif isinstance(func, ast.Name):
                names.add(func.id)
    return names


def test_only_the_rendering_module_renders_json() -> None:
    for path in sorted(API.glob("*.py")):
        if path.name == "rendering.py":
            continue
        found = _calls(path) & _RENDERERS
        assert not found, f"{path.relative_to(REPO)} renders JSON itself: {sorted(found)}"


def _nulls(value: Any, where: str = "$") -> list[str]:
    if value is None:
        return [where]
    if isinstance(value, dict):
        return [n for key, item in value.items() for n in _nulls(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [n for index, item in enumerate(value) for n in _nulls(item, f"{where}[{index}]")]
    return []


def test_no_answer_carries_a_null(sandbox: Sidecar) -> None:
    client = sandbox.client
    queued = client.post(
        "/v1/usage-records",
        json={"UsageRecords": [{"CustomerAWSAccountId": "123456789012", "Dimension": "users"}]},
    )
    assert queued.status_code == 202, queued.text
    record_id = queued.json()["Accepted"][0]["Id"]
    answers = {
        "queue receipt": queued,
        "pending record": client.get(f"/v1/usage-records/{record_id}"),
        "record listing": client.get("/v1/usage-records"),
        "grain listing": client.get("/v1/usage-grains"),
        "resolve customer": client.post("/v1/resolve-customer", json={"RegistrationToken": "t"}),
        "meter usage": client.post("/v1/meter-usage", json={"UsageDimension": "users"}),
        "readiness": client.get("/readyz"),
        "entitlement": client.get("/v1/entitlement"),
        "problem": client.post("/v1/meter-usage", json={}),
    }
    for name, answer in answers.items():
        assert answer.status_code < 500, (name, answer.text)
        assert _nulls(answer.json()) == [], (name, answer.text)
    pending = answers["pending record"].json()
    assert pending["Status"] == "pending"
    assert "MeteringRecordId" not in pending


def test_the_wire_protocol_leaves_absent_members_out(sandbox: Sidecar) -> None:
    answer = sandbox.client.post(
        "/",
        headers={
            "X-Amz-Target": "AWSMPMeteringService.ResolveCustomer",
            "Content-Type": "application/x-amz-json-1.1",
        },
        content=b'{"RegistrationToken": "t"}',
    )
    assert answer.status_code == 200, answer.text
    assert _nulls(answer.json()) == []
