"""docs/deploy-eks.md, followed as a new user types it, as far as this machine allows.

Its ``run`` blocks run (the variables exported, ``envsubst`` on the trust
policy, the database user's SQL on a throwaway PostgreSQL), its files are
saved and checked (the IAM documents as JSON with the ARNs they must carry, the
values files through the real ``helm template`` as the install step gives it),
and its checks from the app's container run against sandbox sidecars
configured as the values files configure them. What needs AWS or a cluster is
marked ``elsewhere`` (``tests/test_guides.py`` checks those blocks parse and
read only what the guide sets).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import botocore.session
import httpx
import pytest
import yaml

from tests import guides
from tests.deploy.test_chart import (
    CHART,
    HELM,
    SIDECAR,
    app_container,
    pod_spec,
    sidecar_container,
    workload,
)
from tests.pg import PgServer
from tests.sidecar import REPO, isolated_env, run_sidecar

GUIDE = REPO / "docs" / "deploy-eks.md"
# What step 2 gives: the issuer without https:// (the guide names this example).
OIDC_ISSUER = "oidc.eks.us-east-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
# Settings the test sets itself: each sidecar gets free loopback ports.
LISTENER_SETTINGS = ("METERING_HOST", "METERING_PORT", "METERING_OPS_HOST", "METERING_OPS_PORT")

Manifest = dict[str, Any]


def guide_exports() -> dict[str, str]:
    """The variables the guide's first block exports."""
    first = guides.of_kind(GUIDE, "run")[0]
    assert first.text.startswith("export "), first.text
    words = shlex.split(first.text.removeprefix("export "))
    return dict(word.split("=", 1) for word in words)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's files, saved where the user saves them; ./helm as in the repository."""
    directory = tmp_path_factory.mktemp("eks-guide")
    for block in guides.of_kind(GUIDE, "file"):
        (directory / block.argument).write_text(block.text)
    (directory / "helm").symlink_to(REPO / "helm")
    return directory


def bash(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A guide's shell block, run as a user's shell would stop on its first failure."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def helm(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    home = workdir / ".helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(HELM), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=60
    )


def install_command(values: tuple[str, ...] | None = None) -> list[str]:
    """The install step's command, variables filled in, as ``helm template`` takes it;
    its ``-f`` files replaced by ``values`` if given."""
    (block,) = [b for b in guides.of_kind(GUIDE, "elsewhere") if "helm upgrade --install" in b.text]
    text = re.sub(r"#.*", "", block.text).replace("\\\n", " ")
    for name, value in guide_exports().items():
        text = text.replace(f"${name}", value)
    words = shlex.split(text)
    assert words[:3] == ["helm", "upgrade", "--install"], words
    words.remove("--create-namespace")
    command = ["template", *words[3:]]
    if values is not None:
        while "-f" in command:
            at = command.index("-f")
            del command[at : at + 2]
        for name in values:
            command += ["-f", name]
    return command


def render(workdir: Path, *extra: str, values: tuple[str, ...] | None = None) -> list[Manifest]:
    """The install command rendered, its ``-f`` files replaced by ``values`` if given."""
    result = helm(workdir, *install_command(values), *extra)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def service_account(manifests: list[Manifest]) -> Manifest:
    (found,) = [m for m in manifests if m["kind"] == "ServiceAccount"]
    return found


# --- IAM ---------------------------------------------------------------------------


def test_trust_policy_rendered_with_every_arn(workdir: Path) -> None:
    """The guide's own commands: export, then envsubst (which sees exported variables only)."""
    script = "\n".join(b.text for b in guides.of_kind(GUIDE, "run") if b.language == "sh")
    assert "envsubst" in script
    result = bash(script, workdir, isolated_env({"OIDC_ISSUER": OIDC_ISSUER}, workdir))
    assert result.returncode == 0, result.stderr
    assert OIDC_ISSUER in GUIDE.read_text()
    exports = guide_exports()
    policy = json.loads((workdir / "trust.rendered.json").read_text())
    (statement,) = policy["Statement"]
    assert statement["Principal"] == {
        "Federated": f"arn:aws:iam::{exports['ACCOUNT_ID']}:oidc-provider/{OIDC_ISSUER}"
    }
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    # The ServiceAccount the trust names is the one the chart creates.
    account = service_account(render(workdir))
    assert account["metadata"]["namespace"] == exports["NAMESPACE"]
    subject = f"system:serviceaccount:{exports['NAMESPACE']}:{account['metadata']['name']}"
    assert statement["Condition"]["StringEquals"] == {
        f"{OIDC_ISSUER}:sub": subject,
        f"{OIDC_ISSUER}:aud": "sts.amazonaws.com",
    }
    assert "$" not in json.dumps(policy)


def test_permissions_are_the_metering_actions() -> None:
    policy = json.loads(guides.file_block(GUIDE, "metering-policy.json").text)
    (statement,) = policy["Statement"]
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    assert model.signing_name == "aws-marketplace"
    assert set(statement["Action"]) == {
        f"{model.signing_name}:{name}" for name in model.operation_names
    }
    assert statement["Effect"] == "Allow"


def test_values_name_the_role_the_guide_creates(workdir: Path) -> None:
    (create,) = [b for b in guides.of_kind(GUIDE, "elsewhere") if "create-role" in b.text]
    role = re.search(r"--role-name (\S+)", create.text)
    assert role is not None
    arn = f"arn:aws:iam::{guide_exports()['ACCOUNT_ID']}:role/{role.group(1)}"
    assert f"`{arn.replace(guide_exports()['ACCOUNT_ID'], '$ACCOUNT_ID')}`" in GUIDE.read_text()
    annotations = service_account(render(workdir))["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"] == arn


# --- Helm ----------------------------------------------------------------------------


def test_install_step_renders_saas(workdir: Path) -> None:
    manifests = render(workdir)
    deployment = workload(manifests)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert any(m["kind"] == "PersistentVolumeClaim" for m in manifests)
    spec = pod_spec(manifests)
    app = app_container(spec)
    # Your app as it is: its image, its ports, no command or limits of the chart's.
    assert app["image"].endswith("/my-app:1.0.0")
    assert "command" not in app
    assert "resources" not in app
    assert "securityContext" not in app
    assert app["ports"] == [{"name": "http", "containerPort": 8000}]


@pytest.mark.parametrize(
    "values",
    [
        ("values-common.yaml", "values-saas-shared.yaml"),
        ("values-common.yaml", "values-container.yaml"),
        ("values-common.yaml", "values-container.yaml", "values-register-usage.yaml"),
        ("values-common.yaml", "values-saas.yaml", "values-monitoring.yaml"),
        ("values-common.yaml", "values-saas.yaml", "values-networkpolicy.yaml"),
        ("values-common.yaml", "values-saas.yaml", "values-token.yaml"),
    ],
    ids=lambda values: "+".join(
        name.removeprefix("values-").removesuffix(".yaml") for name in values
    ),
)
def test_every_values_file_renders(workdir: Path, values: tuple[str, ...]) -> None:
    for sandbox in ((), ("--set", "sidecar.config.METERING_MODE=sandbox")):
        manifests = render(workdir, *sandbox, values=values)
        sidecar = sidecar_container(pod_spec(manifests))
        assert sidecar["name"] == SIDECAR


def test_shared_store_as_the_guide_says(workdir: Path) -> None:
    manifests = render(workdir, values=("values-common.yaml", "values-saas-shared.yaml"))
    deployment = workload(manifests)
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    sidecar = sidecar_container(pod_spec(manifests))
    env = {variable["name"]: variable.get("value") for variable in sidecar["env"]}
    assert env["METERING_QUEUE_DSN_FILE"] == "/var/run/secrets/metering-sidecar-queue/dsn"
    assert "METERING_QUEUE_DSN" not in env
    mounts = {mount["mountPath"] for mount in sidecar["volumeMounts"]}
    assert "/etc/rds" in mounts
    assert not any(m["kind"] == "PersistentVolumeClaim" for m in manifests)


def test_register_usage_holds_the_app(workdir: Path) -> None:
    values = ("values-common.yaml", "values-container.yaml", "values-register-usage.yaml")
    spec = pod_spec(render(workdir, values=values))
    sidecar = sidecar_container(spec)
    assert sidecar in spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    env = {variable["name"]: variable.get("value") for variable in sidecar["env"]}
    assert env["METERING_REGISTER_USAGE"] == "true"


def test_grace_period_refusal_is_what_the_guide_says(workdir: Path) -> None:
    """The guide: the chart refuses a grace period that does not exceed the shutdown timeout."""
    command = install_command(("values-common.yaml", "values-container.yaml"))
    shutdown = yaml.safe_load(guides.file_block(GUIDE, "values-container.yaml").text)["sidecar"][
        "config"
    ]["METERING_SHUTDOWN_TIMEOUT"]
    refused = helm(workdir, *command, "--set", f"terminationGracePeriodSeconds={shutdown}")
    assert refused.returncode != 0
    assert "terminationGracePeriodSeconds" in refused.stderr
    taken = helm(workdir, *command, "--set", f"terminationGracePeriodSeconds={shutdown + 1}")
    assert taken.returncode == 0, taken.stderr
    assert "does not exceed `METERING_SHUTDOWN_TIMEOUT`" in GUIDE.read_text()


# --- The database user ----------------------------------------------------------------


def test_database_user_sql_is_enough_for_the_sidecar(private_postgres: PgServer) -> None:
    """The master user's SQL as the guide gives it, then a sidecar as that user."""
    (sql,) = [b for b in guides.of_kind(GUIDE, "run") if b.language == "sql"]
    psql = private_postgres.bindir / "psql"
    result = subprocess.run(
        [str(psql), "-v", "ON_ERROR_STOP=1", "-X", "-q", private_postgres.dsn()],
        input=sql.text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    password = re.search(r"PASSWORD '([^']+)'", sql.text)
    assert password is not None
    # As the guide's DSN: the metering user and its password (the throwaway server
    # trusts local connections, so the password is not what is tested here).
    dsn = f"postgresql://metering:{password.group(1)}@127.0.0.1:{private_postgres.port}/metering"
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": "prod-abc123",
        "METERING_QUEUE_MODE": "saas",
        "METERING_QUEUE_DSN": dsn,
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        ready = sidecar.client.get("/readyz").json()
        assert ready["status"] == "ready", ready
        answer = sidecar.client.post("/v1/usage-records", json={"UsageRecords": [SAAS_RECORD]})
        assert answer.status_code == 202, answer.text
    # The tables are the metering user's own (it created them).
    owners = subprocess.run(
        [
            str(psql),
            "-X",
            "-At",
            private_postgres.dsn("metering"),
            "-c",
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    assert owners == ["metering"]


SAAS_RECORD = {
    "CustomerAWSAccountId": "111122223333",
    "LicenseArn": "arn:aws:license-manager::111122223333:license:l-0123456789abcdef",
    "Dimension": "users",
    "Quantity": 0,
}


# --- From the app's container ----------------------------------------------------------


def sidecar_config(values: list[str]) -> dict[str, str]:
    """The sidecar's settings as the chart's defaults and these values files set them."""
    config: dict[str, Any] = dict(
        yaml.safe_load((CHART / "values.yaml").read_text())["sidecar"]["config"]
    )
    for name in values:
        document = yaml.safe_load(guides.file_block(GUIDE, name).text) or {}
        config.update(document.get("sidecar", {}).get("config", {}))
    rendered = {
        key: (str(value).lower() if isinstance(value, bool) else str(value))
        for key, value in config.items()
        if key not in LISTENER_SETTINGS and value not in (None, "")
    }
    rendered["METERING_MODE"] = "sandbox"
    return rendered


@pytest.mark.parametrize(
    "block",
    guides.of_kind(GUIDE, "pod"),
    ids=lambda block: block.argument.split()[-1].removesuffix(".yaml"),
)
def test_checks_from_the_app_container(block: guides.Block, tmp_path: Path) -> None:
    with run_sidecar(sidecar_config(block.argument.split()), wait_ready=True) as sidecar:
        address = sidecar.url.removeprefix("http://")
        assert "127.0.0.1:8080" in block.text
        script = block.text.replace("127.0.0.1:8080", address)
        result = bash(script, tmp_path, isolated_env({}, tmp_path))
        assert result.returncode == 0, result.stdout + result.stderr
        ready, accepted = result.stdout.strip().split("\n")
        assert json.loads(ready)["status"] == "ready"
        answer = json.loads(accepted)
        assert answer["Rejected"] == []
        assert [record["Status"] for record in answer["Accepted"]] == ["pending"]
        # Quantity 0 bills nothing: the grain holds 0.
        record = httpx.get(f"{sidecar.url}/v1/usage-records/{answer['Accepted'][0]['Id']}").json()
        assert float(record["Grain"]["Quantity"]) == 0
