"""The Helm chart, rendered by the real ``helm`` and checked on the parsed YAML.

``scripts/check-chart`` fetches Helm into ``.tools`` and lints, renders and
schema-validates every scenario; these tests check what a schema cannot:
that probes reach real routes on the operations listener, settings are real
settings, the pod is hardened, the token stays out of the environment, and
the sidecar has the shape its lifecycle needs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.api.ops_listener import create_ops_app
from app.config import Settings
from app.main import create_app
from app.runtime.metrics import Metrics
from tests.sidecar import REPO, Sidecar, run_sidecar

HELM = REPO / ".tools" / "helm-3.17.2" / "helm"
CHART = REPO / "helm" / "metering-sidecar"
SCENARIOS = sorted(
    path.name.removesuffix("-values.yaml") for path in CHART.glob("ci/*-values.yaml")
)
SIDECAR = "metering-sidecar"
QUEUE_MOUNT = "/var/lib/metering-sidecar"
TOKEN_FILE = "/var/run/secrets/metering-sidecar/token"
DSN_FILE = "/var/run/secrets/metering-sidecar-queue/dsn"
# The secrets themselves: never a value or a secretKeyRef in the sidecar's environment.
SECRET_VARIABLES = frozenset({"METERING_AUTH_TOKEN", "METERING_QUEUE_DSN"})
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Helm's cache, config and data folders, away from the user's own."""
    if not HELM.is_file():
        pytest.fail(f"{HELM.relative_to(REPO)} is missing: run ./scripts/check-chart first")
    return tmp_path_factory.mktemp("helm-home")


def helm_template(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``helm template`` of the chart as release ``metering`` in namespace ``metering``."""
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    return subprocess.run(
        [str(HELM), "template", "metering", str(CHART), "--namespace", "metering", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def render(home: Path, *args: str) -> list[Manifest]:
    """The chart's objects for these ``helm template`` arguments."""
    result = helm_template(home, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_scenario(home: Path, scenario: str, *args: str) -> list[Manifest]:
    """The objects of ``ci/<scenario>-values.yaml``."""
    return render(home, "--values", str(CHART / "ci" / f"{scenario}-values.yaml"), *args)


def only(manifests: list[Manifest], kind: str) -> Manifest:
    """The one object of this kind."""
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def workload(manifests: list[Manifest]) -> Manifest:
    """The Deployment or StatefulSet."""
    found = [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [m["kind"] for m in manifests]
    return found[0]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    """The workload's pod spec."""
    spec: Manifest = workload(manifests)["spec"]["template"]["spec"]
    return spec


def all_containers(spec: Manifest) -> Iterator[Manifest]:
    """Init containers, then containers."""
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def sidecar_container(spec: Manifest) -> Manifest:
    """The metering sidecar, wherever it sits."""
    (found,) = [c for c in all_containers(spec) if c["name"] == SIDECAR]
    return found


def probe_path(probe: Manifest) -> str:
    """The route an httpGet probe asks for; it must be on the operations port."""
    assert set(probe) - {"httpGet"} <= {
        "initialDelaySeconds",
        "periodSeconds",
        "timeoutSeconds",
        "successThreshold",
        "failureThreshold",
        "terminationGracePeriodSeconds",
    }, probe
    get = probe["httpGet"]
    assert get["port"] == "ops", get
    assert get.get("scheme", "HTTP") == "HTTP"
    assert "host" not in get  # the pod IP, where the operations listener is
    path: str = get["path"]
    return path


def container_ports(container: Manifest) -> dict[str, int]:
    """A container's ports by name."""
    return {port["name"]: port["containerPort"] for port in container.get("ports", [])}


def env_of(container: Manifest) -> dict[str, Manifest]:
    """A container's environment entries by name."""
    return {e["name"]: e for e in container["env"]}


def get_routes() -> set[str]:
    """The GET routes the sidecar declares, from its own route table."""
    app = create_app(Settings(mode="sandbox"))
    return {path for path, item in app.openapi()["paths"].items() if "get" in item}


def ops_routes() -> set[str]:
    """The GET routes of the operations listener, from its own app."""
    app = create_ops_app(create_app(Settings(mode="sandbox")))
    return {path for path, item in app.openapi()["paths"].items() if "get" in item}


def setting_names() -> set[str]:
    """Every METERING_* variable the sidecar reads."""
    return {f"METERING_{name.upper()}" for name in Settings.model_fields}


def exported_metrics() -> set[str]:
    """Every series name the sidecar's registry exposes (counters with _total)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def metric_names(text: str) -> set[str]:
    """metering_* names in PromQL, histogram suffixes removed."""
    return {
        re.sub(r"_(bucket|sum|count)$", "", name)
        for name in re.findall(r"\bmetering_[a-z_]+[a-z]", text)
    }


def readme_metrics() -> str:
    """The README's Metrics section."""
    readme = (REPO / "README.md").read_text()
    return readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]


def test_scenarios_exist() -> None:
    assert {
        "default",
        "classic-container",
        "saas-pvc",
        "container-emptydir",
        "postgres-none",
        "postgres-spool-pvc",
        "monitoring",
        "irsa",
        "api-token",
        "container-entitlement",
        "networkpolicy",
        "networkpolicy-strict",
    } <= set(SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_container_of_the_chart_is_hardened(helm_home: Path, scenario: str) -> None:
    """The sidecar and the placeholder app; a seller's app is run as it is (below)."""
    values = yaml.safe_load((CHART / "ci" / f"{scenario}-values.yaml").read_text()) or {}
    own_app = bool(values.get("app", {}).get("image", {}).get("repository"))
    spec = pod_spec(render_scenario(helm_home, scenario))
    # The pod's context reaches the app too: only what the sidecar's files need.
    assert set(spec["securityContext"]) <= {"fsGroup", "fsGroupChangePolicy"}
    for container in all_containers(spec):
        if own_app and container["name"] == "app":
            continue
        context = container["securityContext"]
        where = f"{scenario}: {container['name']}"
        assert context["runAsNonRoot"] is True, where
        assert isinstance(context["runAsUser"], int), where
        assert context["runAsUser"] > 0, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["allowPrivilegeEscalation"] is False, where
        assert context.get("privileged", False) is False, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert "add" not in context["capabilities"], where
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert container["resources"]["requests"], where
        assert container["resources"]["limits"]["memory"], where


def chart_readme_quick_install() -> list[str]:
    """The ``--set`` arguments of the chart README's first ``helm install``."""
    readme = (CHART / "README.md").read_text()
    block = readme.split("```sh\n", 1)[1].split("```", 1)[0]
    command = shlex.split(block.replace("\\\n", " "))
    assert command[:4] == ["helm", "install", "metering", "./helm/metering-sidecar"], command
    return command[4:]


def app_container(spec: Manifest) -> Manifest:
    """The app's container."""
    found: list[Manifest] = [c for c in spec["containers"] if c["name"] == "app"]
    assert len(found) == 1, spec["containers"]
    return found[0]


def test_quick_install_runs_your_app_as_it_is(helm_home: Path) -> None:
    """The chart README's quick install: the image's own entrypoint, nothing inherited."""
    args = chart_readme_quick_install()
    assert "app.image.repository=my-registry/my-app" in args
    spec = pod_spec(render(helm_home, *args))
    app = app_container(spec)
    assert app["image"] == "my-registry/my-app:1.0.0"
    # Only what the chart must give: the sidecar's address. No command (the
    # image's ENTRYPOINT/CMD runs), no limits, no user, no read-only root.
    assert set(app) == {"name", "image", "imagePullPolicy", "env"}, app
    assert [variable["name"] for variable in app["env"]] == ["SIDECAR_METERING_URL"]
    assert set(spec["securityContext"]) == {"fsGroup", "fsGroupChangePolicy"}
    # The sidecar keeps its own hardening.
    sidecar = sidecar_container(spec)
    assert sidecar["securityContext"]["runAsNonRoot"] is True
    assert sidecar["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_your_apps_settings_pass_through(helm_home: Path) -> None:
    spec = pod_spec(
        render(
            helm_home,
            "--set",
            "app.image.repository=registry.example.com/app",
            "--set",
            "app.image.digest=sha256:" + "a" * 64,
            "--set",
            "app.command={/bin/server}",
            "--set-string",
            "app.args={--port,8000}",
            "--set",
            "app.resources.limits.memory=2Gi",
            "--set",
            "app.securityContext.runAsUser=0",
        )
    )
    app = app_container(spec)
    assert app["image"] == "registry.example.com/app@sha256:" + "a" * 64
    assert app["command"] == ["/bin/server"]
    assert app["args"] == ["--port", "8000"]
    assert app["resources"] == {"limits": {"memory": "2Gi"}}
    assert app["securityContext"] == {"runAsUser": 0}


def test_placeholder_only_without_an_image(helm_home: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    placeholder = values["appPlaceholder"]
    assert values["app"]["image"]["repository"] == ""
    app = app_container(pod_spec(render(helm_home)))
    image = placeholder["image"]
    assert app["image"] == f"{image['repository']}:{image['tag']}"
    assert app["command"] == placeholder["command"]
    assert app["resources"] == placeholder["resources"]
    assert app["securityContext"] == placeholder["securityContext"]


def test_sidecar_user_is_the_images_user(helm_home: Path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None
    sidecar = sidecar_container(pod_spec(render_scenario(helm_home, "default")))
    context = sidecar["securityContext"]
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user.groups()
    assert f"METERING_QUEUE_PATH={QUEUE_MOUNT}/queue.sqlite3" in dockerfile
    assert f'VOLUME ["{QUEUE_MOUNT}"]' in dockerfile


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_ask_real_routes(helm_home: Path, scenario: str) -> None:
    routes = ops_routes()
    assert routes == {"/healthz", "/readyz", "/metrics"}
    sidecar = sidecar_container(pod_spec(render_scenario(helm_home, scenario)))
    # httpGet on the operations listener's named port, for native and classic alike.
    assert probe_path(sidecar["livenessProbe"]) == "/healthz"
    assert probe_path(sidecar["readinessProbe"]) == "/readyz"
    assert probe_path(sidecar["startupProbe"]) == "/readyz"
    for name in PROBES:
        assert "exec" not in sidecar[name]
        assert probe_path(sidecar[name]) in routes
    env = {name: e.get("value") for name, e in env_of(sidecar).items()}
    assert container_ports(sidecar)["ops"] == int(env.get("METERING_OPS_PORT") or 8081)
    assert container_ports(sidecar)["metering"] == int(env.get("METERING_PORT") or 8080)
    assert env.get("METERING_OPS_HOST", "0.0.0.0") == "0.0.0.0"  # the kubelet comes via the pod IP
    post_start = sidecar.get("lifecycle", {}).get("postStart")
    if post_start:
        assert "/readyz" in post_start["exec"]["command"][-1]
        assert "METERING_OPS_PORT" in post_start["exec"]["command"][-1]


@pytest.mark.parametrize("scenario", ["default", "classic-container"])
def test_probes_are_http_gets_on_the_ops_port(helm_home: Path, scenario: str) -> None:
    spec = pod_spec(render_scenario(helm_home, scenario))
    sidecar = sidecar_container(spec)
    assert (sidecar in spec.get("initContainers", [])) is (scenario == "default")
    assert container_ports(sidecar) == {"metering": 8080, "ops": 8081}
    for name in PROBES:
        assert sidecar[name]["httpGet"] == {
            "path": "/healthz" if name == "livenessProbe" else "/readyz",
            "port": "ops",
            "scheme": "HTTP",
        }


def test_ops_port_follows_the_setting(helm_home: Path) -> None:
    args = ("--set", "sidecar.config.METERING_OPS_PORT=9191", "--set", "service.enabled=true")
    manifests = render(helm_home, *args)
    sidecar = sidecar_container(pod_spec(manifests))
    assert container_ports(sidecar)["ops"] == 9191
    assert env_of(sidecar)["METERING_OPS_PORT"]["value"] == "9191"
    assert sidecar["startupProbe"]["httpGet"]["port"] == "ops"
    (port,) = only(manifests, "Service")["spec"]["ports"]
    assert (port["name"], port["targetPort"]) == ("ops", 9191)


def test_ops_port_off_without_probes(helm_home: Path) -> None:
    # Everything that needs the operations listener turned off: the chart renders
    # no ops port and no probes at all, rather than exec probes.
    off = ["--set", "sidecar.config.METERING_OPS_PORT=0"]
    for name in PROBES:
        off += ["--set", f"sidecar.{name}.enabled=false"]
    for native in ("true", "false"):
        args = [
            *off,
            "--set",
            f"sidecar.native={native}",
            "--set",
            "sidecar.classic.waitForReady=false",
        ]
        sidecar = sidecar_container(pod_spec(render(helm_home, *args)))
        assert "ops" not in container_ports(sidecar)
        assert not set(PROBES) & set(sidecar)
        assert "postStart" not in sidecar.get("lifecycle", {})


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set", "sidecar.config.METERING_OPS_PORT=0"), "METERING_OPS_PORT is 0"),
        (("--set", "sidecar.config.METERING_OPS_PORT=0"), "sidecar.startupProbe"),
        (
            (
                "--set",
                "sidecar.config.METERING_OPS_PORT=0",
                "--set",
                "sidecar.livenessProbe.enabled=false",
                "--set",
                "sidecar.readinessProbe.enabled=false",
                "--set",
                "sidecar.startupProbe.enabled=false",
                "--set",
                "serviceMonitor.enabled=true",
            ),
            "serviceMonitor.enabled",
        ),
        (
            (
                "--set",
                "sidecar.config.METERING_OPS_PORT=0",
                "--set",
                "sidecar.livenessProbe.enabled=false",
                "--set",
                "sidecar.readinessProbe.enabled=false",
                "--set",
                "sidecar.startupProbe.enabled=false",
                "--set",
                "sidecar.native=false",
            ),
            "sidecar.classic.waitForReady",
        ),
        (("--set", "sidecar.config.METERING_OPS_HOST=127.0.0.1"), "METERING_OPS_HOST is loopback"),
        (("--set", "sidecar.config.METERING_OPS_PORT=8080"), "port of its own"),
    ],
    ids=[
        "off-probes",
        "off-names-probe",
        "off-scrape",
        "off-classic-wait",
        "loopback",
        "same-port",
    ],
)
def test_ops_port_refusals(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    result = helm_template(helm_home, *args)
    assert result.returncode != 0, args
    assert complaint in result.stderr, result.stderr


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    """A live sandbox sidecar whose token comes from a file, as the chart mounts it."""
    token = tmp_path_factory.mktemp("secret") / "token"
    token.write_text("s3cret-token\n")
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": "prod-abc",
        "METERING_AUTH_TOKEN_FILE": str(token),
    }
    with run_sidecar(env, wait_ready=True) as s:
        yield s


def ops_address(sidecar: Sidecar) -> tuple[str, str]:
    """The live sidecar's operations listener, as (host, port)."""
    assert sidecar.ops_url is not None
    host, port = sidecar.ops_url.removeprefix("http://").rsplit(":", 1)
    return host, port


def run_in_pod(
    command: list[str], env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """A hook command as the kubelet runs it in the sidecar container."""
    assert command[0] == "python3"
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_probes_pass_against_a_live_sidecar(helm_home: Path, sidecar: Sidecar) -> None:
    # What the kubelet does: GET the probe's path on the container's `ops` port.
    host, port = ops_address(sidecar)
    for scenario in ("default", "classic-container"):
        container = sidecar_container(pod_spec(render_scenario(helm_home, scenario)))
        for name in PROBES:
            path = probe_path(container[name])
            answer = httpx.get(f"http://{host}:{port}{path}", timeout=5)
            assert answer.status_code == 200, (scenario, name, answer.text)
    # And a route that is not there fails, so passing means something.
    assert httpx.get(f"http://{host}:{port}/no-such-route", timeout=5).status_code == 404


def test_scraping_needs_no_token_on_the_ops_port(sidecar: Sidecar) -> None:
    host, port = ops_address(sidecar)
    scraped = httpx.get(f"http://{host}:{port}/metrics", timeout=5)
    assert scraped.status_code == 200
    assert "metering_" in scraped.text
    # The same token, read from the file, guards /metrics on the API port.
    assert sidecar.client.get("/metrics").status_code == 401
    authorized = {"Authorization": "Bearer s3cret-token"}
    assert sidecar.client.get("/metrics", headers=authorized).status_code == 200


def test_post_start_hook_waits_for_a_live_sidecar(helm_home: Path, sidecar: Sidecar) -> None:
    classic = sidecar_container(pod_spec(render_scenario(helm_home, "classic-container")))
    command = classic["lifecycle"]["postStart"]["exec"]["command"]
    host, port = ops_address(sidecar)
    result = run_in_pod(command, {"METERING_OPS_HOST": host, "METERING_OPS_PORT": port})
    assert result.returncode == 0, result.stderr
    # The hook defaults to the operations listener's defaults, and 0.0.0.0 means loopback.
    result = run_in_pod(command, {"METERING_OPS_HOST": "0.0.0.0", "METERING_OPS_PORT": port})
    assert result.returncode == 0, result.stderr
    # Nothing listening: the hook fails once its time is up, so passing means something.
    quick = render_scenario(
        helm_home, "classic-container", "--set", "sidecar.classic.waitTimeoutSeconds=1"
    )
    command = sidecar_container(pod_spec(quick))["lifecycle"]["postStart"]["exec"]["command"]
    result = run_in_pod(command, {"METERING_OPS_HOST": host, "METERING_OPS_PORT": "1"})
    assert result.returncode != 0
    assert "not ready in time" in result.stderr


# An HTTP proxy where nothing listens (port 9, discard), in both spellings: sellers
# behind an egress proxy set these in the sidecar's environment for its AWS calls.
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
)
DEAD_PROXY = dict.fromkeys(PROXY_VARIABLES, "http://127.0.0.1:9") | {"NO_PROXY": "", "no_proxy": ""}


def test_post_start_hook_never_goes_through_a_proxy(helm_home: Path, sidecar: Sidecar) -> None:
    quick = render_scenario(
        helm_home, "classic-container", "--set", "sidecar.classic.waitTimeoutSeconds=3"
    )
    command = sidecar_container(pod_spec(quick))["lifecycle"]["postStart"]["exec"]["command"]
    host, port = ops_address(sidecar)
    env = {**DEAD_PROXY, "METERING_OPS_HOST": host, "METERING_OPS_PORT": port}
    result = run_in_pod(command, env)
    assert result.returncode == 0, result.stderr
    # The same hook with plain urlopen fails in that environment: urllib sends
    # 127.0.0.1 to the dead proxy, so passing above means the proxy was bypassed.
    script = command[-1]
    assert script.count("direct.open(url, timeout=2)") == 1, script
    plain = script.replace("direct.open(url, timeout=2)", "urllib.request.urlopen(url, timeout=2)")
    result = run_in_pod([*command[:-1], plain], env)
    assert result.returncode != 0
    assert "not ready in time" in result.stderr


def test_native_sidecar_by_default(helm_home: Path) -> None:
    spec = pod_spec(render_scenario(helm_home, "default"))
    (sidecar,) = spec["initContainers"]
    assert sidecar["name"] == SIDECAR
    assert sidecar["restartPolicy"] == "Always"
    # The kubelet starts the app only once this probe has passed.
    assert probe_path(sidecar["startupProbe"]) == "/readyz"
    assert container_ports(sidecar)["ops"] == 8081
    assert "lifecycle" not in sidecar
    assert [c["name"] for c in spec["containers"]] == ["app"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["SIDECAR_METERING_URL"] == "http://127.0.0.1:8080"


def test_classic_container_option(helm_home: Path) -> None:
    spec = pod_spec(render_scenario(helm_home, "classic-container"))
    assert "initContainers" not in spec
    sidecar, app = spec["containers"]
    # First, so that its postStart hook holds the app's start.
    assert (sidecar["name"], app["name"]) == (SIDECAR, "app")
    assert "restartPolicy" not in sidecar
    # exec: a lifecycle httpGet is sent once and its status ignored, so it cannot wait.
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert "/readyz" in hook
    assert 'os.environ.get("METERING_OPS_PORT") or "8081"' in hook
    assert "METERING_PORT" not in hook.replace("METERING_OPS_PORT", "")
    assert probe_path(sidecar["startupProbe"]) == "/readyz"
    assert "time.sleep(15)" in sidecar["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert spec["terminationGracePeriodSeconds"] > 15 + 25


def test_grace_period_covers_the_flush(helm_home: Path) -> None:
    for scenario in SCENARIOS:
        spec = pod_spec(render_scenario(helm_home, scenario))
        env = {e["name"]: e.get("value") for e in sidecar_container(spec)["env"]}
        shutdown = float(env.get("METERING_SHUTDOWN_TIMEOUT", "25"))
        assert spec["terminationGracePeriodSeconds"] > shutdown, scenario
    result = helm_template(helm_home, "--set", "terminationGracePeriodSeconds=20")
    assert result.returncode != 0
    assert "terminationGracePeriodSeconds" in result.stderr


def test_irsa_annotation(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "irsa")
    account = only(manifests, "ServiceAccount")
    annotations = account["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/role-arn"] == (
        "arn:aws:iam::123456789012:role/metering-sidecar"
    )
    assert annotations["eks.amazonaws.com/sts-regional-endpoints"] == "true"
    assert annotations["eks.amazonaws.com/token-expiration"] == "86400"
    assert pod_spec(manifests)["serviceAccountName"] == account["metadata"]["name"] == "metering"


def test_no_role_no_annotation(helm_home: Path) -> None:
    account = only(render_scenario(helm_home, "default"), "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" not in account["metadata"].get("annotations", {})


def test_persistent_queue_has_one_owner(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "saas-pvc", "--set", "strategy.type=Recreate")
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    claim = only(manifests, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
    assert volumes["metering-queue"]["persistentVolumeClaim"] == {
        "claimName": claim["metadata"]["name"]
    }
    mounts = {
        m["name"]: m["mountPath"] for m in sidecar_container(pod_spec(manifests))["volumeMounts"]
    }
    assert mounts["metering-queue"] == QUEUE_MOUNT


@pytest.mark.parametrize(
    "args",
    [("--set", "replicas=2"), ("--set", "strategy.type=RollingUpdate")],
    ids=["two-replicas", "rolling-update"],
)
def test_persistent_queue_refuses_two_owners(helm_home: Path, args: tuple[str, ...]) -> None:
    result = helm_template(helm_home, "--values", str(CHART / "ci" / "saas-pvc-values.yaml"), *args)
    assert result.returncode != 0
    assert "queue" in result.stderr


def test_statefulset_option(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "saas-statefulset")
    statefulset = only(manifests, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "metering-queue"
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"] for v in pod_spec(manifests)["volumes"]}
    assert "metering-queue" not in volumes  # it comes from the claim template
    service = only(manifests, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]


def test_emptydir_queue(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "container-emptydir")
    spec = pod_spec(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["metering-queue"] == {
        "name": "metering-queue",
        "emptyDir": {"sizeLimit": "128Mi"},
    }
    assert workload(manifests)["spec"]["replicas"] == 3
    env = {e["name"]: e.get("value") for e in sidecar_container(spec)["env"]}
    assert env["METERING_QUEUE_MODE"] == "container"
    assert env["METERING_QUEUE_PATH"] == f"{QUEUE_MOUNT}/queue.sqlite3"


def test_shared_store_spools_on_an_emptydir(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "postgres-none")
    spec = pod_spec(manifests)
    sidecar = sidecar_container(spec)
    env = {e["name"]: e for e in sidecar["env"]}
    assert env["METERING_QUEUE_DSN_FILE"] == {"name": "METERING_QUEUE_DSN_FILE", "value": DSN_FILE}
    assert env["METERING_QUEUE_MODE"]["value"] == "saas"
    # No queue of its own, but the local spool: where usage waits while the store is down.
    assert env["METERING_QUEUE_PATH"]["value"] == f"{QUEUE_MOUNT}/queue.sqlite3"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["metering-queue"] == {
        "name": "metering-queue",
        "emptyDir": {"sizeLimit": "256Mi"},
    }
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["metering-queue"] == {"name": "metering-queue", "mountPath": QUEUE_MOUNT}
    assert workload(manifests)["spec"]["replicas"] == 3
    sized = pod_spec(
        render_scenario(helm_home, "postgres-none", "--set", "queue.spool.emptyDir.sizeLimit=1Gi")
    )
    assert {v["name"]: v for v in sized["volumes"]}["metering-queue"]["emptyDir"] == {
        "sizeLimit": "1Gi"
    }


def test_shared_store_spool_on_a_claim_per_pod(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "postgres-spool-pvc")
    statefulset = only(manifests, "StatefulSet")
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    assert template["metadata"]["name"] == "metering-queue"
    assert template["spec"]["resources"]["requests"]["storage"] == "512Mi"
    assert statefulset["spec"]["replicas"] == 3
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    spec = pod_spec(manifests)
    assert "metering-queue" not in {v["name"] for v in spec["volumes"]}
    mounts = {m["name"]: m for m in sidecar_container(spec)["volumeMounts"]}
    assert mounts["metering-queue"]["mountPath"] == QUEUE_MOUNT
    # A Deployment's pods cannot each have a claim; the spool is the shared store's only.
    spool_pvc = ("--values", str(CHART / "ci" / "postgres-spool-pvc-values.yaml"))
    refused = helm_template(helm_home, *spool_pvc, "--set", "workload.kind=Deployment")
    assert refused.returncode != 0
    assert "set workload.kind StatefulSet" in refused.stderr
    refused = helm_template(
        helm_home,
        "--set",
        "queue.spool.storage=persistentVolumeClaim",
        "--set",
        "sidecar.config.METERING_QUEUE_MODE=container",
    )
    assert refused.returncode != 0
    assert "the spool is for queue.storage none only" in refused.stderr
    # Your own pods bring the claim template: the volumes list leaves it out.
    own = render_scenario(helm_home, "postgres-spool-pvc", "--set", "workload.enabled=false")
    assert not [m for m in own if m["kind"] in ("StatefulSet", "Deployment")]


@pytest.mark.parametrize("replicas", [2, 5])
def test_shared_store_scales_out_with_rolling_updates(helm_home: Path, replicas: int) -> None:
    manifests = render_scenario(helm_home, "postgres-none", "--set", f"replicas={replicas}")
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == replicas
    # A shared store lets old and new pods overlap.
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    spec = pod_spec(manifests)
    # Each pod's spool is its own scratch volume: nothing a rollout must hand over.
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["metering-queue"]
    assert queue_dsn_volume(spec)["secret"]["secretName"] == "metering-queue-dsn"
    assert env_of(sidecar_container(spec))["METERING_QUEUE_DSN_FILE"]["value"] == DSN_FILE


def queue_dsn_volume(spec: Manifest) -> Manifest:
    """The pod's volume of the shared store's DSN Secret."""
    found: list[Manifest] = [v for v in spec["volumes"] if v["name"] == "metering-queue-dsn"]
    (volume,) = found
    assert "secret" in volume, volume
    return volume


@pytest.mark.parametrize("native", ["true", "false"])
def test_shared_store_dsn_mounted_as_a_file(helm_home: Path, native: str) -> None:
    args = ("--set", f"sidecar.native={native}", "--set", "queue.postgres.key=queue-url")
    spec = pod_spec(render_scenario(helm_home, "postgres-none", *args))
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["METERING_QUEUE_DSN_FILE"] == {"name": "METERING_QUEUE_DSN_FILE", "value": DSN_FILE}
    # The DSN, password and all, never enters the sidecar's environment, nor any other
    # container's: no variable of any container takes it from a Secret.
    assert "METERING_QUEUE_DSN" not in env
    for container in all_containers(spec):
        refs = [e for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
        assert not refs, (container["name"], refs)
    # The one key of the right Secret, as the file `dsn`, readable through fsGroup only.
    assert queue_dsn_volume(spec) == {
        "name": "metering-queue-dsn",
        "secret": {
            "secretName": "metering-queue-dsn",
            "items": [{"key": "queue-url", "path": "dsn"}],
            "defaultMode": 0o440,
        },
    }
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["metering-queue-dsn"] == {
        "name": "metering-queue-dsn",
        "mountPath": str(Path(DSN_FILE).parent),
        "readOnly": True,
    }
    # A directory of its own: two Secret volumes cannot share a mount path.
    paths = [m["mountPath"] for m in sidecar["volumeMounts"]]
    assert len(paths) == len(set(paths)), paths
    # Mounted in the sidecar only.
    for container in all_containers(spec):
        if container["name"] != SIDECAR:
            names = {m["name"] for m in container.get("volumeMounts", [])}
            assert "metering-queue-dsn" not in names, container["name"]


def test_shared_store_dsn_and_token_side_by_side(helm_home: Path) -> None:
    spec = pod_spec(
        render_scenario(
            helm_home,
            "postgres-none",
            "--set",
            "sidecar.authToken.existingSecret=metering-sidecar-token",
        )
    )
    mounts = {m["name"]: m["mountPath"] for m in sidecar_container(spec)["volumeMounts"]}
    assert mounts["metering-auth-token"] == str(Path(TOKEN_FILE).parent)
    assert mounts["metering-queue-dsn"] == str(Path(DSN_FILE).parent)
    env = env_of(sidecar_container(spec))
    assert (env["METERING_AUTH_TOKEN_FILE"]["value"], env["METERING_QUEUE_DSN_FILE"]["value"]) == (
        TOKEN_FILE,
        DSN_FILE,
    )


def test_shared_store_dsn_file_is_what_the_sidecar_reads(
    helm_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sidecar's own settings, given the environment the chart renders with the
    # file where the chart's path points: it reads the DSN from the file, stripped.
    sidecar = sidecar_container(pod_spec(render_scenario(helm_home, "postgres-none")))
    dsn = "postgresql://metering:pa%40ss@db.example.com:5432/metering?sslmode=verify-full"
    secret = tmp_path / Path(DSN_FILE).name
    secret.write_text(f"{dsn}\n")  # kubectl create secret --from-file keeps the newline
    secret.chmod(0o440)
    for name in list(os.environ):
        if name.startswith("METERING_"):
            monkeypatch.delenv(name)
    for entry in sidecar["env"]:
        if entry["name"].startswith("METERING_"):
            value = entry["value"]
            monkeypatch.setenv(entry["name"], str(secret) if value == DSN_FILE else value)
    assert os.environ["METERING_QUEUE_DSN_FILE"] == str(secret)
    settings = Settings()
    assert settings.queue_dsn is not None
    assert settings.queue_dsn.get_secret_value() == dsn
    assert dsn not in repr(settings)


def test_shared_store_with_rds_iam_auth(helm_home: Path) -> None:
    # RDS IAM authentication: the sidecar signs a token per connection with the pod's
    # role; the DSN file stays where it was, with no password in it.
    sidecar = sidecar_container(
        pod_spec(
            render_scenario(
                helm_home,
                "postgres-none",
                "--set",
                "queue.postgres.iamAuth=true",
                "--set",
                "queue.postgres.iamRegion=eu-west-1",
            )
        )
    )
    env = env_of(sidecar)
    assert env["METERING_QUEUE_IAM_AUTH"]["value"] == "true"
    assert env["METERING_QUEUE_IAM_REGION"]["value"] == "eu-west-1"
    assert env["METERING_QUEUE_DSN_FILE"]["value"] == DSN_FILE
    plain = env_of(sidecar_container(pod_spec(render_scenario(helm_home, "postgres-none"))))
    assert "METERING_QUEUE_IAM_AUTH" not in plain
    # Only with the shared store, and set in one place.
    refused = helm_template(helm_home, "--set", "queue.postgres.iamAuth=true")
    assert refused.returncode != 0
    assert "queue.postgres.iamAuth is RDS IAM authentication for the shared store" in (
        refused.stderr
    )
    twice = helm_template(
        helm_home,
        "-f",
        str(CHART / "ci" / "postgres-none-values.yaml"),
        "--set",
        "queue.postgres.iamAuth=true",
        "--set",
        "sidecar.config.METERING_QUEUE_IAM_AUTH=true",
    )
    assert twice.returncode != 0
    assert "remove them from sidecar.config" in twice.stderr


def test_shared_store_keeps_a_chosen_strategy(helm_home: Path) -> None:
    manifests = render_scenario(
        helm_home,
        "postgres-none",
        "--set",
        "strategy.type=RollingUpdate",
        "--set",
        "strategy.rollingUpdate.maxUnavailable=0",
    )
    assert only(manifests, "Deployment")["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0},
    }


def test_extra_volumes_reach_the_sidecar(helm_home: Path) -> None:
    # The RDS CA bundle of docs/deploy-eks.md: the DSN's sslrootcert.
    spec = pod_spec(render_scenario(helm_home, "postgres-none"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["rds-ca"] == {"name": "rds-ca", "configMap": {"name": "rds-ca-bundle"}}
    mounts = {m["name"]: m for m in sidecar_container(spec)["volumeMounts"]}
    assert mounts["rds-ca"] == {"name": "rds-ca", "mountPath": "/etc/rds", "readOnly": True}
    assert mounts["metering-tmp"]["mountPath"] == "/tmp"
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert "rds-ca" not in {m["name"] for m in app.get("volumeMounts", [])}


def test_one_saas_replica_may_keep_its_own_queue(helm_home: Path) -> None:
    manifests = render(
        helm_home,
        "--set",
        "sidecar.config.METERING_QUEUE_MODE=saas",
        "--set",
        "replicas=1",
        "--set",
        "queue.storage=persistentVolumeClaim",
    )
    assert workload(manifests)["spec"]["replicas"] == 1
    assert workload(manifests)["spec"]["strategy"] == {"type": "Recreate"}
    # Container mode: every pod is its own meter, so replicas need no shared store.
    assert workload(render_scenario(helm_home, "container-emptydir"))["spec"]["replicas"] == 3


POSTGRES_NONE = ("--values", str(CHART / "ci" / "postgres-none-values.yaml"))


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        # SaaS on the pod's emptyDir: a rollout deletes the open hour with the volume,
        # and an old and a new pod overlapping both send the same grain.
        (
            ("--set", "sidecar.config.METERING_QUEUE_MODE=saas", "--set", "replicas=1"),
            "METERING_QUEUE_MODE saas with queue.storage emptyDir loses usage",
        ),
        (
            ("--set", "sidecar.config.METERING_QUEUE_MODE=null", "--set", "replicas=1"),
            "queue.storage persistentVolumeClaim",
        ),
        # SaaS replicas with queues of their own would each send the same grains.
        (
            ("--set", "sidecar.config.METERING_QUEUE_MODE=saas", "--set", "replicas=3"),
            "queue.storage none",
        ),
        # Unset, the sidecar's queue mode is saas.
        (
            ("--set", "sidecar.config.METERING_QUEUE_MODE=null", "--set", "replicas=2"),
            "queue.storage none",
        ),
        (
            (
                "--set",
                "sidecar.config.METERING_QUEUE_MODE=saas",
                "--set",
                "replicas=2",
                "--set",
                "workload.kind=StatefulSet",
            ),
            "queue.storage none",
        ),
        # A shared store would merge different pods' meters.
        (
            (*POSTGRES_NONE, "--set", "sidecar.config.METERING_QUEUE_MODE=container"),
            "METERING_QUEUE_MODE container",
        ),
        (
            (*POSTGRES_NONE, "--set", "sidecar.config.METERING_QUEUE_MODE=container"),
            "the sidecar refuses a queue DSN in container mode",
        ),
        # A DSN next to a local queue volume: refused, not silently ignored.
        (("--set", "queue.postgres.existingSecret=metering-queue-dsn"), "queue.storage"),
        (
            (*POSTGRES_NONE, "--set", "queue.storage=emptyDir", "--set", "replicas=1"),
            "queue.postgres.existingSecret",
        ),
        # The chart mounts the DSN's file and names it itself; the sidecar takes one DSN.
        (
            (
                *POSTGRES_NONE,
                "--set",
                "sidecar.extraEnv[0].name=METERING_QUEUE_DSN",
                "--set",
                "sidecar.extraEnv[0].value=postgresql://x",
            ),
            "sidecar.extraEnv sets METERING_QUEUE_DSN while",
        ),
        (
            (
                *POSTGRES_NONE,
                "--set",
                "sidecar.extraEnv[0].name=METERING_QUEUE_DSN_FILE",
                "--set",
                "sidecar.extraEnv[0].value=/x",
            ),
            "sidecar.extraEnv sets METERING_QUEUE_DSN_FILE",
        ),
        # Mode 0440: unreadable without the pod's fsGroup.
        (
            (*POSTGRES_NONE, "--set", "podSecurityContext.fsGroup=null"),
            "podSecurityContext.fsGroup",
        ),
    ],
    ids=[
        "saas-emptydir",
        "default-mode-emptydir",
        "saas-emptydir-replicas",
        "default-mode-replicas",
        "saas-statefulset-replicas",
        "container-shared-store",
        "container-shared-store-why",
        "dsn-with-emptydir",
        "dsn-with-emptydir-saas",
        "dsn-in-extra-env",
        "second-dsn-file",
        "dsn-no-fsgroup",
    ],
)
def test_queue_refusals(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    result = helm_template(helm_home, *args)
    assert result.returncode != 0, args
    assert complaint in result.stderr, result.stderr


def test_dsn_only_when_configured(helm_home: Path) -> None:
    for scenario in SCENARIOS:
        if scenario in ("postgres-none", "postgres-spool-pvc"):
            continue
        spec = pod_spec(render_scenario(helm_home, scenario))
        sidecar = sidecar_container(spec)
        names = set(env_of(sidecar))
        assert not {"METERING_QUEUE_DSN", "METERING_QUEUE_DSN_FILE"} & names, scenario
        assert "metering-queue-dsn" not in {v["name"] for v in spec["volumes"]}, scenario
        assert "metering-queue-dsn" not in {m["name"] for m in sidecar["volumeMounts"]}, scenario


@pytest.mark.parametrize("native", ["true", "false"])
def test_auth_token_mounted_as_a_file(helm_home: Path, native: str) -> None:
    spec = pod_spec(render_scenario(helm_home, "api-token", "--set", f"sidecar.native={native}"))
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["METERING_AUTH_TOKEN_FILE"] == {
        "name": "METERING_AUTH_TOKEN_FILE",
        "value": TOKEN_FILE,
    }
    # The token itself never enters the sidecar's environment.
    assert "METERING_AUTH_TOKEN" not in env
    assert not [e for e in sidecar["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["metering-auth-token"]["secret"] == {
        "secretName": "metering-sidecar-token",
        "items": [{"key": "api-token", "path": "token"}],
        "defaultMode": 0o440,
    }
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["metering-auth-token"] == {
        "name": "metering-auth-token",
        "mountPath": str(Path(TOKEN_FILE).parent),
        "readOnly": True,
    }
    # Mounted in the sidecar only; the app gets the token its own way.
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert "metering-auth-token" not in {m["name"] for m in app.get("volumeMounts", [])}
    reference = {"name": "metering-sidecar-token", "key": "api-token"}
    assert env_of(app)["SIDECAR_METERING_TOKEN"]["valueFrom"]["secretKeyRef"] == reference


def test_no_token_no_token_file(helm_home: Path) -> None:
    for scenario in SCENARIOS:
        if scenario == "api-token":
            continue
        spec = pod_spec(render_scenario(helm_home, scenario))
        assert not {"METERING_AUTH_TOKEN", "METERING_AUTH_TOKEN_FILE"} & set(
            env_of(sidecar_container(spec))
        ), scenario
        assert "metering-auth-token" not in {v["name"] for v in spec["volumes"]}, scenario


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (
            (
                "--set",
                "sidecar.extraEnv[0].name=METERING_AUTH_TOKEN",
                "--set",
                "sidecar.extraEnv[0].value=x",
            ),
            "sidecar.extraEnv sets METERING_AUTH_TOKEN",
        ),
        (
            (
                "--set",
                "sidecar.extraEnv[0].name=METERING_AUTH_TOKEN_FILE",
                "--set",
                "sidecar.extraEnv[0].value=/x",
            ),
            "sidecar.extraEnv sets METERING_AUTH_TOKEN_FILE",
        ),
        (("--set", "podSecurityContext.fsGroup=null"), "podSecurityContext.fsGroup"),
    ],
    ids=["token-in-env", "second-token-file", "no-fsgroup"],
)
def test_auth_token_refusals(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    result = helm_template(
        helm_home, "--values", str(CHART / "ci" / "api-token-values.yaml"), *args
    )
    assert result.returncode != 0, args
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_env_names_are_real_settings(helm_home: Path, scenario: str) -> None:
    # The secrets come as files (METERING_AUTH_TOKEN_FILE, METERING_QUEUE_DSN_FILE).
    allowed = setting_names() - SECRET_VARIABLES
    spec = pod_spec(render_scenario(helm_home, scenario))
    sidecar = sidecar_container(spec)
    names = {e["name"] for e in sidecar["env"] if e["name"].startswith("METERING_")}
    assert names, scenario
    assert names <= allowed, names - allowed
    for container in all_containers(spec):
        assert not SECRET_VARIABLES & set(env_of(container)), container["name"]
    host = next(e["value"] for e in sidecar["env"] if e["name"] == "METERING_HOST")
    if host != "127.0.0.1":
        assert "METERING_AUTH_TOKEN_FILE" in names  # reachable from other pods: token required


def test_schema_knows_every_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["sidecar"]["properties"]["config"]
    assert config["additionalProperties"] is False
    # The token and the queue's DSN come from Secrets only (sidecar.authToken,
    # queue.postgres), each mounted as a file whose path the chart names itself.
    secret_only = {
        "METERING_AUTH_TOKEN",
        "METERING_AUTH_TOKEN_FILE",
        "METERING_QUEUE_DSN",
        "METERING_QUEUE_DSN_FILE",
    }
    assert set(config["properties"]) == setting_names() - secret_only
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_sidecar_settings_defaults(helm_home: Path) -> None:
    env = {
        e["name"]: e.get("value")
        for e in sidecar_container(pod_spec(render_scenario(helm_home, "default")))["env"]
    }
    assert env["METERING_HOST"] == "127.0.0.1"
    assert env["METERING_PORT"] == "8080"
    assert env["METERING_OPS_HOST"] == "0.0.0.0"
    assert env["METERING_OPS_PORT"] == "8081"
    assert env["METERING_REGISTER_USAGE"] == "false"
    assert env["METERING_MODE"] == "aws"
    assert env["METERING_QUEUE_MODE"] in ("saas", "container")
    assert "METERING_PRODUCT_CODE" in env
    # The values the chart sets are values the sidecar accepts.
    settings = {k.removeprefix("METERING_").lower(): v for k, v in env.items() if v is not None}
    Settings(**settings)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set", "sidecar.config.METERING_MODE=prod"), "METERING_MODE"),
        (("--set", "sidecar.config.METERING_QUEUE_MODE=batch"), "METERING_QUEUE_MODE"),
        (("--set", "sidecar.config.METERING_LOG_LEVEL=verbose"), "METERING_LOG_LEVEL"),
        (("--set", "sidecar.config.METERING_PORT=eighty"), "METERING_PORT"),
        (("--set", "sidecar.config.METERING_NOT_A_SETTING=1"), "METERING_NOT_A_SETTING"),
        (("--set", "sidecar.config.METERING_AUTH_TOKEN=plain"), "METERING_AUTH_TOKEN"),
        (("--set", "sidecar.config.METERING_AUTH_TOKEN_FILE=/t"), "METERING_AUTH_TOKEN_FILE"),
        (("--set", "sidecar.config.METERING_OPS_PORT=65536"), "METERING_OPS_PORT"),
        (("--set", "sidecar.config.METERING_REGISTER_USAGE=yes"), "METERING_REGISTER_USAGE"),
        (("--set", "sidecar.config.METERING_QUEUE_DSN=postgresql://x"), "METERING_QUEUE_DSN"),
        (("--set", "sidecar.config.METERING_QUEUE_DSN_FILE=/d"), "METERING_QUEUE_DSN_FILE"),
        (("--set", "sidecar.config.METERING_QUEUE_CLAIM_LEASE=0"), "METERING_QUEUE_CLAIM_LEASE"),
        (("--set", "sidecar.config.METERING_QUEUE_CLAIM_LEASE=301"), "METERING_QUEUE_CLAIM_LEASE"),
        (("--set", "sidecar.config.METERING_QUEUE_POOL_SIZE=0"), "METERING_QUEUE_POOL_SIZE"),
        (("--set", "sidecar.config.METERING_QUEUE_POOL_SIZE=65"), "METERING_QUEUE_POOL_SIZE"),
        (
            ("--set", "sidecar.config.METERING_QUEUE_STATEMENT_TIMEOUT=0"),
            "METERING_QUEUE_STATEMENT_TIMEOUT",
        ),
        (("--set", "sidecar.extraVolumeMounts[0].name=rds-ca"), "mountPath"),
        (("--set", "replicas=two"), "replicas"),
        (("--set", "queue.storage=s3"), "queue.storage"),
        (("--set", "queue.storage=none"), "queue"),
        (("--set", "sidecar.native=maybe"), "sidecar.native"),
        (("--set", "workload.kind=DaemonSet"), "workload.kind"),
        (("--set", "serviceAccount.irsa.roleArn=my-role"), "roleArn"),
        (("--set", "replica=2"), "replica"),
    ],
)
def test_schema_rejects_bad_values(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    result = helm_template(helm_home, *args)
    assert result.returncode != 0, args
    assert "schema" in result.stderr, result.stderr
    assert complaint in result.stderr, result.stderr


def test_network_exposure_needs_a_token(helm_home: Path) -> None:
    result = helm_template(helm_home, "--set", "sidecar.config.METERING_HOST=0.0.0.0")
    assert result.returncode != 0
    assert "authToken" in result.stderr


def test_scraping_needs_neither_network_api_nor_token(helm_home: Path) -> None:
    # The metrics Service and ServiceMonitor use the operations listener: the API
    # stays on loopback and no token is needed.
    manifests = render(helm_home, "--set", "serviceMonitor.enabled=true")
    sidecar = sidecar_container(pod_spec(manifests))
    env = env_of(sidecar)
    assert env["METERING_HOST"]["value"] == "127.0.0.1"
    assert not {"METERING_AUTH_TOKEN", "METERING_AUTH_TOKEN_FILE"} & set(env)
    (port,) = only(manifests, "Service")["spec"]["ports"]
    assert (port["name"], port["port"], port["targetPort"]) == ("ops", 8081, 8081)
    (endpoint,) = only(manifests, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "ops"


def test_monitoring_objects(helm_home: Path) -> None:
    manifests = render_scenario(helm_home, "monitoring")
    service = next(m for m in manifests if m["kind"] == "Service")
    (port,) = service["spec"]["ports"]
    # The operations listener's port by number: the endpoints controller finds
    # named ports of native sidecars only from Kubernetes 1.32 on.
    sidecar = sidecar_container(pod_spec(manifests))
    assert (port["name"], port["targetPort"]) == ("ops", container_ports(sidecar)["ops"])
    monitor = only(manifests, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("ops", "/metrics")
    assert "/metrics" in ops_routes()
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert only(manifests, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_entitlement_gate(helm_home: Path) -> None:
    spec = pod_spec(render_scenario(helm_home, "container-entitlement"))
    sidecar = sidecar_container(spec)
    env = {name: e.get("value") for name, e in env_of(sidecar).items()}
    assert env["METERING_REGISTER_USAGE"] == "true"
    assert env["METERING_QUEUE_MODE"] == "container"
    assert "register_usage" in Settings.model_fields
    # The gate: a native sidecar whose startupProbe (/readyz, 503 until RegisterUsage
    # has succeeded) holds the app's start.
    assert sidecar in spec["initContainers"]
    assert probe_path(sidecar["startupProbe"]) == "/readyz"
    # Classic: the postStart hook holds it.
    classic = sidecar_container(
        pod_spec(
            render_scenario(helm_home, "container-entitlement", "--set", "sidecar.native=false")
        )
    )
    assert "/readyz" in classic["lifecycle"]["postStart"]["exec"]["command"][-1]
    # Off by default.
    default = sidecar_container(pod_spec(render_scenario(helm_home, "default")))
    assert env_of(default)["METERING_REGISTER_USAGE"]["value"] == "false"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (("--set", "sidecar.startupProbe.enabled=false"), "sidecar.startupProbe is off"),
        (
            ("--set", "sidecar.native=false", "--set", "sidecar.classic.waitForReady=false"),
            "sidecar.classic.waitForReady is false",
        ),
    ],
    ids=["native-no-startup-probe", "classic-no-wait"],
)
def test_entitlement_gate_refusals(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    values = ("--values", str(CHART / "ci" / "container-entitlement-values.yaml"))
    result = helm_template(helm_home, *values, *args)
    assert result.returncode != 0, args
    assert complaint in result.stderr, result.stderr
    # Without the gate setting, the same values render.
    assert helm_template(helm_home, *args).returncode == 0


def test_alerts_use_real_metrics(helm_home: Path) -> None:
    rule = only(render_scenario(helm_home, "monitoring"), "PrometheusRule")
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    alerts = {r["alert"] for r in rules}
    assert {
        "MeteringOldestPendingUsageHigh",
        "MeteringSubmissionDeadlineApproaching",
        "MeteringDuplicateRecords",
        "MeteringUsageRejected",
        "MeteringUpstreamErrors",
        "MeteringCredentialsExpiring",
        "MeteringCredentialsMissing",
        "MeteringSharedStoreUnreachable",
        "MeteringSpoolNotDraining",
        "MeteringSpoolLarge",
        "MeteringSpooledUsageRejected",
        "MeteringBackgroundLoopStopped",
    } <= alerts
    used = metric_names(" ".join(r["expr"] for r in rules))
    assert used - {"up"} <= exported_metrics(), used - exported_metrics()
    outcomes = " ".join(r["expr"] for r in rules)
    for outcome in ("duplicate_record", "rejected", "expired"):
        assert f'outcome="{outcome}"' in outcomes


def test_dashboard_uses_real_metrics() -> None:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    used = metric_names(" ".join(exprs))
    assert used <= exported_metrics(), used - exported_metrics()
    documented = readme_metrics()
    missing = sorted(name for name in used if f"`{name}" not in documented)
    assert not missing, f"README's Metrics section does not name {missing}"


def test_labels_and_names(helm_home: Path) -> None:
    long_release = "x" * 70
    result = helm_template(helm_home, "--set", f"fullnameOverride={long_release}")
    assert result.returncode == 0, result.stderr
    for manifest in yaml.safe_load_all(result.stdout):
        if manifest:
            assert len(manifest["metadata"]["name"]) <= 63
    for manifest in render_scenario(helm_home, "default"):
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "metering-sidecar"
        assert labels["app.kubernetes.io/instance"] == "metering"
        assert labels["helm.sh/chart"] == "metering-sidecar-0.1.0"


# --- the NetworkPolicy -------------------------------------------------------------

NETWORK_POLICY = ("--values", str(CHART / "ci" / "networkpolicy-values.yaml"))
PROMETHEUS = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}
NODE = {"ipBlock": {"cidr": "10.0.1.17/32"}}
INGRESS_NGINX = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
}
# A source no rule names: any other pod, namespace or address.
STRANGER: Manifest = {"podSelector": {"matchLabels": {"app": "anyone-else"}}}
ALL_PORTS = range(1, 65536)


def port_matches(entry: Manifest, port: int, protocol: str) -> bool:
    """Whether one NetworkPolicyPort covers ``port``/``protocol`` (numbers only)."""
    if entry.get("protocol", "TCP") != protocol:
        return False
    if "port" not in entry:
        return True  # every port of the protocol
    first = entry["port"]
    assert isinstance(first, int), f"a named port in {entry}: the chart uses numbers"
    last = entry.get("endPort", first)
    return bool(first <= port <= last)


def admits(policy: Manifest, port: int, source: Manifest, protocol: str = "TCP") -> bool:
    """Whether the policy's ingress rules admit ``source`` to ``port``, as Kubernetes reads them:
    a rule without ``from`` admits every source, one without ``ports`` every port."""
    for rule in policy["spec"].get("ingress") or []:
        sources = rule.get("from") or []
        if sources and source not in sources:
            continue
        ports = rule.get("ports") or []
        if not ports or any(port_matches(entry, port, protocol) for entry in ports):
            return True
    return False


def test_network_policy_off_by_default(helm_home: Path) -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["networkPolicy"]["enabled"] is False
    for scenario in SCENARIOS:
        if scenario.startswith("networkpolicy"):
            continue
        kinds = {m["kind"] for m in render_scenario(helm_home, scenario)}
        assert "NetworkPolicy" not in kinds, scenario


def test_network_policy_selects_the_workloads_pods(helm_home: Path) -> None:
    manifests = render(helm_home, *NETWORK_POLICY)
    policy = only(manifests, "NetworkPolicy")
    selector = workload(manifests)["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"] == {"matchLabels": selector}
    pod_labels = workload(manifests)["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert policy["metadata"]["namespace"] == "metering"
    # Ingress only: the sidecar's calls to AWS, STS and the shared store stay as they were.
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert "egress" not in policy["spec"]


def test_network_policy_admits_the_ops_port_only_from_the_named_peers(helm_home: Path) -> None:
    manifests = render(helm_home, *NETWORK_POLICY)
    policy = only(manifests, "NetworkPolicy")
    ops = container_ports(sidecar_container(pod_spec(manifests)))["ops"]
    assert ops == 8081
    assert admits(policy, ops, PROMETHEUS)
    assert admits(policy, ops, NODE)
    assert not admits(policy, ops, STRANGER)
    assert not admits(policy, ops, {"podSelector": PROMETHEUS["podSelector"]})  # other namespaces


def test_network_policy_admits_every_other_tcp_port_from_anywhere(helm_home: Path) -> None:
    # The app shares the pod: its ports, and the API port, stay open as without a policy.
    manifests = render(helm_home, *NETWORK_POLICY)
    policy = only(manifests, "NetworkPolicy")
    ops = container_ports(sidecar_container(pod_spec(manifests)))["ops"]
    closed = [port for port in ALL_PORTS if not admits(policy, port, STRANGER)]
    assert closed == [ops]
    assert all(admits(policy, port, STRANGER, "UDP") for port in (53, ops, 8000, 65535))
    app = next(c for c in pod_spec(manifests)["containers"] if c["name"] == "app")
    assert admits(policy, container_ports(app)["http"], STRANGER)


@pytest.mark.parametrize("ops", [9191, 1, 65535])
def test_network_policy_follows_the_ops_port(helm_home: Path, ops: int) -> None:
    manifests = render(
        helm_home, *NETWORK_POLICY, "--set", f"sidecar.config.METERING_OPS_PORT={ops}"
    )
    policy = only(manifests, "NetworkPolicy")
    assert container_ports(sidecar_container(pod_spec(manifests)))["ops"] == ops
    assert admits(policy, ops, PROMETHEUS)
    closed = [port for port in ALL_PORTS if not admits(policy, port, STRANGER)]
    assert closed == [ops]


def test_network_policy_without_peers_admits_no_one_to_the_ops_port(helm_home: Path) -> None:
    # A rule with an empty `from` admits everyone: with no peers, the ops port is in no rule.
    manifests = render(helm_home, *NETWORK_POLICY, "--set-json", "networkPolicy.opsFrom=[]")
    policy = only(manifests, "NetworkPolicy")
    assert all(rule.get("from") for rule in policy["spec"]["ingress"] if "from" in rule)
    assert not admits(policy, 8081, STRANGER)
    assert not admits(policy, 8081, PROMETHEUS)
    assert admits(policy, 8080, STRANGER)


def test_network_policy_strict(helm_home: Path) -> None:
    # allowOtherPorts false: the ops port from opsFrom, then only extraIngress.
    manifests = render_scenario(helm_home, "networkpolicy-strict")
    policy = only(manifests, "NetworkPolicy")
    assert admits(policy, 8081, PROMETHEUS)
    assert not admits(policy, 8000, PROMETHEUS)
    assert admits(policy, 8000, INGRESS_NGINX)
    assert not admits(policy, 8081, INGRESS_NGINX)
    assert not [port for port in ALL_PORTS if admits(policy, port, STRANGER)]
    assert not admits(policy, 53, STRANGER, "UDP")
    # Nothing at all: an empty list of rules, not a missing one.
    bare = render(
        helm_home,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.allowOtherPorts=false",
    )
    assert only(bare, "NetworkPolicy")["spec"]["ingress"] == []


def test_network_policy_for_your_own_pods(helm_home: Path) -> None:
    selector = {"matchLabels": {"app": "my-app"}}
    manifests = render(
        helm_home,
        "--set",
        "workload.enabled=false",
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        f"networkPolicy.podSelector={json.dumps(selector)}",
        "--set-json",
        f"networkPolicy.opsFrom=[{json.dumps(PROMETHEUS)}]",
    )
    assert not [m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")]
    policy = only(manifests, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == selector
    assert admits(policy, 8081, PROMETHEUS)
    assert not admits(policy, 8081, STRANGER)


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (
            (
                "--set",
                "sidecar.config.METERING_OPS_PORT=0",
                *(f"--set=sidecar.{name}.enabled=false" for name in PROBES),
            ),
            "METERING_OPS_PORT is 0",
        ),
        (
            ("--set-json", 'networkPolicy.podSelector={"matchLabels":{"app":"x"}}'),
            "networkPolicy.podSelector is for your own pods",
        ),
        (("--set", "workload.enabled=false"), "set networkPolicy.podSelector"),
        (
            (
                "--set",
                "workload.enabled=false",
                "--set-json",
                'networkPolicy.podSelector={"matchLabels":{}}',
            ),
            "set networkPolicy.podSelector",
        ),
    ],
    ids=["ops-port-off", "selector-with-workload", "no-selector", "empty-selector"],
)
def test_network_policy_refusals(helm_home: Path, args: tuple[str, ...], complaint: str) -> None:
    result = helm_template(helm_home, "--set", "networkPolicy.enabled=true", *args)
    assert result.returncode != 0, args
    assert complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    "peer",
    [
        {},
        {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
        {"ipBlock": {"except": ["10.0.0.0/8"]}},
        {"pod": {"matchLabels": {"a": "b"}}},
    ],
    ids=["empty", "ipblock-and-selector", "ipblock-without-cidr", "unknown-field"],
)
def test_schema_rejects_bad_ops_peers(helm_home: Path, peer: Manifest) -> None:
    result = helm_template(
        helm_home,
        "--set",
        "networkPolicy.enabled=true",
        "--set-json",
        f"networkPolicy.opsFrom=[{json.dumps(peer)}]",
    )
    assert result.returncode != 0, peer
    assert "schema" in result.stderr, result.stderr
    assert "opsFrom" in result.stderr, result.stderr
