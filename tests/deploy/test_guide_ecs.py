"""docs/deploy-ecs.md: its task definition, checked and its health check run.

The ``task-definition.json`` block is what a user registers. Registering needs an
AWS account (that block is marked ``elsewhere``); here the file is checked
against ECS's own API model as botocore ships it (the shape of
RegisterTaskDefinition's input), against what the guide's prose promises, and
against the sidecar itself: its environment names real settings, the volume
sits at the image's queue path, and its health check, run exactly as the file
gives it against a real sidecar started with that environment, passes while
the sidecar is up, also behind a dead proxy, and fails once it is gone.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import botocore.session
import pytest
from botocore.validate import ParamValidator

from app.config import Settings
from tests import guides
from tests.sidecar import REPO, free_port, isolated_env, run_sidecar

GUIDE = REPO / "docs" / "deploy-ecs.md"
SIDECAR = "metering-sidecar"
APP = "app"
# On Fargate a container's stopTimeout is at most 120 s and its startTimeout 2 to 120 s
# (the ECS API reference, also in botocore's model documentation of both members).
FARGATE_MAX_TIMEOUT = 120
# Values that belong in the container's `secrets` (Secrets Manager), never in
# `environment`, which anyone allowed to describe the task definition reads.
SECRET_VARIABLES = frozenset({"METERING_AUTH_TOKEN", "METERING_QUEUE_DSN"})
DEAD_PROXY = "http://127.0.0.1:9"
NUMBER_TYPES = frozenset({"integer", "long", "float", "double"})

TaskDefinition = dict[str, Any]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key repeats (json.loads would keep the last silently)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    assert not repeated, f"task-definition.json repeats {repeated}"
    return dict(pairs)


def task_definition() -> TaskDefinition:
    block = guides.file_block(GUIDE, "task-definition.json")
    assert block.language == "json", block.where
    parsed: TaskDefinition = json.loads(block.text, object_pairs_hook=_unique_keys)
    return parsed


def register_input_shape() -> Any:
    """The input shape of ECS RegisterTaskDefinition, from botocore's service model."""
    model = botocore.session.get_session().get_service_model("ecs")
    return model.operation_model("RegisterTaskDefinition").input_shape


def shape_errors(params: Any, shape: Any) -> list[str]:
    """Where ``params`` does not fit ``shape``: botocore's own validation (unknown
    members, types, required members, minimums) plus what it leaves out."""
    report = ParamValidator().validate(params, shape)
    errors = [report.generate_report()] if report.has_errors() else []
    return errors + _enum_and_number_errors(params, shape, "task definition")


def _enum_and_number_errors(value: Any, shape: Any, where: str) -> list[str]:
    """What ParamValidator does not check: a string member's enum, and a JSON true or
    false where a number goes (to Python a bool is an int, so its type check passes)."""
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        return [
            error
            for key, item in value.items()
            if key in shape.members
            for error in _enum_and_number_errors(item, shape.members[key], f"{where}.{key}")
        ]
    if kind == "list" and isinstance(value, list):
        return [
            error
            for index, item in enumerate(value)
            for error in _enum_and_number_errors(item, shape.member, f"{where}[{index}]")
        ]
    if kind == "map" and isinstance(value, dict):
        return [
            error
            for key, item in value.items()
            for error in (
                _enum_and_number_errors(key, shape.key, f"{where} (key {key!r})")
                + _enum_and_number_errors(item, shape.value, f"{where}.{key}")
            )
        ]
    if kind == "string" and isinstance(value, str) and shape.enum and value not in shape.enum:
        return [f"{where}: {value!r} is none of {shape.enum}"]
    if kind in NUMBER_TYPES and isinstance(value, bool):
        return [f"{where}: {value!r} where a number goes"]
    return []


def container(definition: TaskDefinition, name: str) -> dict[str, Any]:
    found = [c for c in definition["containerDefinitions"] if c["name"] == name]
    assert len(found) == 1, f"{len(found)} containers named {name!r}"
    definition_of_container: dict[str, Any] = found[0]
    return definition_of_container


def environment(container_definition: Mapping[str, Any]) -> dict[str, str]:
    pairs = [(e["name"], e["value"]) for e in container_definition.get("environment", [])]
    names = [name for name, _ in pairs]
    assert len(names) == len(set(names)), f"a variable set twice: {names}"
    return dict(pairs)


def setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


def dockerfile_instruction(keyword: str) -> list[str]:
    """Every instruction ``keyword`` of the Dockerfile, its continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile").read_text())
    return re.findall(rf"^{keyword}\s+(.*?)\s*$", text, re.MULTILINE)


def image_queue_path() -> PurePosixPath:
    """The METERING_QUEUE_PATH the image's ENV sets."""
    found = [
        match.group(1)
        for env in dockerfile_instruction("ENV")
        for match in re.finditer(r"\bMETERING_QUEUE_PATH=(\S+)", env)
    ]
    assert len(found) == 1, found
    return PurePosixPath(found[0])


def image_volumes() -> list[str]:
    volumes: list[str] = []
    for instruction in dockerfile_instruction("VOLUME"):
        volumes.extend(json.loads(instruction))
    return volumes


def health_check_url(command: list[str]) -> str:
    urls = re.findall(r"'(http://[^']+)'", command[-1])
    assert len(urls) == 1, command
    url: str = urls[0]
    return url


def test_the_task_definition_fits_ecs_register_task_definition() -> None:
    assert shape_errors(task_definition(), register_input_shape()) == []


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (lambda d: d["containerDefinitions"][1].update(stopTimeot=45), "stopTimeot"),
        (lambda d: d.update(cpu=512), "Invalid type for parameter cpu"),
        (lambda d: d["containerDefinitions"][1].update(essential="true"), "essential"),
        (lambda d: d.pop("family"), '"family"'),
        (lambda d: d.update(networkMode="vpc"), "networkMode: 'vpc'"),
        (lambda d: d["containerDefinitions"][0]["dependsOn"][0].update(condition="READY"), "READY"),
        (lambda d: d["containerDefinitions"][1]["healthCheck"].update(retries=True), "retries"),
        (lambda d: d["volumes"].append({"name": "x", "host": {"path": "/x"}}), '"path"'),
    ],
    ids=[
        "unknown member",
        "string given a number",
        "boolean given a string",
        "required member missing",
        "value out of the enum",
        "dependency condition out of the enum",
        "number given a boolean",
        "unknown nested member",
    ],
)
def test_the_shape_check_finds_mistakes(mistake: Any, expected: str) -> None:
    """The check above can fail: each mistake a hand-edited file could carry is found."""
    definition = copy.deepcopy(task_definition())
    mistake(definition)
    errors = shape_errors(definition, register_input_shape())
    assert errors, "the mistake passed"
    assert expected in "\n".join(errors), errors


def test_the_task_runs_on_fargate_with_its_two_roles() -> None:
    definition = task_definition()
    assert definition["networkMode"] == "awsvpc"
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    containers = definition["containerDefinitions"]
    assert {c["name"] for c in containers} == {APP, SIDECAR}
    # Fargate needs the task's own size; the containers' shares fit in it.
    assert sum(c.get("cpu", 0) for c in containers) <= int(definition["cpu"])
    assert sum(c.get("memory", 0) for c in containers) <= int(definition["memory"])
    # The guide's literal example account and region, as the prose says.
    role = re.compile(r"arn:aws:iam::123456789012:role/[\w+=,.@-]+")
    assert role.fullmatch(definition["taskRoleArn"])
    assert role.fullmatch(definition["executionRoleArn"])
    assert definition["taskRoleArn"] != definition["executionRoleArn"]
    for c in containers:
        assert c["image"].startswith("123456789012.dkr.ecr.us-east-1.amazonaws.com/"), c["image"]
        assert c["logConfiguration"]["logDriver"] == "awslogs"
        assert c["logConfiguration"]["options"]["awslogs-region"] == "us-east-1"
    (register,) = [b for b in guides.of_kind(GUIDE, "elsewhere") if "register-task-" in b.text]
    assert "--cli-input-json file://task-definition.json" in register.text
    group = containers[0]["logConfiguration"]["options"]["awslogs-group"]
    assert f"create-log-group --log-group-name {group} " in register.text


def test_the_app_waits_for_a_healthy_essential_sidecar_and_stops_first() -> None:
    definition = task_definition()
    sidecar, app = container(definition, SIDECAR), container(definition, APP)
    assert sidecar["essential"] is True
    assert app["essential"] is True
    assert app["dependsOn"] == [{"containerName": SIDECAR, "condition": "HEALTHY"}]
    assert "dependsOn" not in sidecar
    # The sidecar's drain fits its stopTimeout, which Fargate allows.
    shutdown_timeout = setting_default("shutdown_timeout")
    assert shutdown_timeout < sidecar["stopTimeout"] <= FARGATE_MAX_TIMEOUT
    assert 2 <= sidecar["startTimeout"] <= FARGATE_MAX_TIMEOUT
    assert 0 < app["stopTimeout"] <= FARGATE_MAX_TIMEOUT
    prose = GUIDE.read_text()
    assert f"`METERING_SHUTDOWN_TIMEOUT` ({shutdown_timeout:g} seconds by default)" in " ".join(
        prose.split()
    )
    # The app reaches the sidecar's API on loopback, at the port the sidecar listens on.
    port = environment(sidecar).get("METERING_PORT", str(setting_default("port")))
    assert environment(app)["SIDECAR_METERING_URL"] == f"http://127.0.0.1:{port}"


def test_the_sidecar_is_configured_as_the_guide_says() -> None:
    sidecar = container(task_definition(), SIDECAR)
    env = environment(sidecar)
    assert env["METERING_MODE"] == "aws"
    assert env["METERING_QUEUE_MODE"] == "container"
    assert env["METERING_OPS_HOST"] == "127.0.0.1"
    assert env["METERING_PRODUCT_CODE"]
    assert "METERING_HOST" not in env  # its loopback default, as the guide says
    assert sidecar["readonlyRootFilesystem"] is True
    assert (sidecar["cpu"], sidecar["memory"]) == (64, 128)
    check = sidecar["healthCheck"]
    assert (check["interval"], check["timeout"], check["retries"], check["startPeriod"]) == (
        10,
        5,
        3,
        30,
    )
    command = check["command"]
    assert command[:4] == ["CMD", "python3", "-B", "-c"], command
    # It asks /readyz on the operations listener, at the port the sidecar opens it on,
    # and gives up before ECS's own timeout does.
    ops_port = env.get("METERING_OPS_PORT", str(setting_default("ops_port")))
    assert health_check_url(command) == f"http://127.0.0.1:{ops_port}/readyz"
    (client_timeout,) = re.findall(r"timeout=(\d+)", command[-1])
    assert int(client_timeout) < check["timeout"]


def test_every_sidecar_variable_is_a_real_setting_and_no_secret() -> None:
    names = set(environment(container(task_definition(), SIDECAR)))
    settings = {f"METERING_{name.upper()}" for name in Settings.model_fields}
    assert names <= settings, names - settings
    assert not names & SECRET_VARIABLES


def test_the_queue_volume_is_task_scoped_at_the_images_queue_directory() -> None:
    definition = task_definition()
    (mount,) = container(definition, SIDECAR)["mountPoints"]
    queue_directory = str(image_queue_path().parent)
    assert mount["containerPath"] == queue_directory
    # The image's VOLUME: ECS copies the directory (owned by the sidecar's user) into
    # the bind mount only when the paths are the same.
    assert queue_directory in image_volumes()
    assert mount.get("readOnly", False) is False
    volumes = {v["name"]: v for v in definition["volumes"]}
    # No host path, no EFS, no Docker volume: a bind mount that lives with the task.
    assert volumes[mount["sourceVolume"]] == {"name": mount["sourceVolume"]}


def run_check(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=15, check=False
    )


def test_the_health_check_passes_on_a_ready_sidecar_and_fails_without_one(
    tmp_path: Path,
) -> None:
    """The command as the file gives it, the image's python3 being this interpreter and
    the listener's port a free one: it passes while the sidecar is up (also with a dead
    HTTP_PROXY in the container's environment) and fails once the sidecar is gone."""
    sidecar_definition = container(task_definition(), SIDECAR)
    command = sidecar_definition["healthCheck"]["command"]
    api_port, ops_port = free_port(), free_port()
    env = {
        **environment(sidecar_definition),
        "METERING_MODE": "sandbox",  # no AWS here
        "METERING_PORT": str(api_port),
        "METERING_OPS_PORT": str(ops_port),
        "METERING_QUEUE_PATH": str(tmp_path / "queue.sqlite3"),
    }
    assert command[:2] == ["CMD", "python3"], command
    url = health_check_url(command)
    image_ops_port = f":{setting_default('ops_port')}/"
    script = command[-1].replace(url, url.replace(image_ops_port, f":{ops_port}/"))
    assert script != command[-1]
    argv = [sys.executable, *command[2:-1], script]
    # The container's environment: the sidecar's own, as ECS runs the check in it.
    container_env = isolated_env(env, tmp_path)
    behind_proxy = {**container_env, "HTTP_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY}
    with run_sidecar(env, port=api_port, wait_ready=True) as sidecar:
        assert sidecar.ops_url == f"http://127.0.0.1:{ops_port}"
        passed = run_check(argv, container_env)
        assert passed.returncode == 0, passed.stderr
        proxied = run_check(argv, behind_proxy)
        assert proxied.returncode == 0, proxied.stderr
        # The proxy is really in the way: a plain opener sends the check to it.
        plain = script.replace("u.build_opener(u.ProxyHandler({}))", "u.build_opener()")
        assert plain != script
        assert run_check([*argv[:-1], plain], behind_proxy).returncode != 0
        # An answer other than 2xx fails the check too.
        missing = script.replace("/readyz'", "/no-such-path'")
        assert missing != script
        assert run_check([*argv[:-1], missing], container_env).returncode != 0
        # Stopped as ECS stops it; uvicorn may re-raise the SIGTERM it handled.
        assert sidecar.stop() in (0, -signal.SIGTERM), sidecar.log()
    failed = run_check(argv, container_env)
    assert failed.returncode != 0
    assert "Connection refused" in failed.stderr, failed.stderr
