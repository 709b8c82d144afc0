"""The container image: linted, built with buildah on a stand-in base, inspected, run and stopped.

``scripts/install-image-tools`` installs buildah and hadolint and caches the
stand-in base tarball (Debian bookworm's python3: no base image can be pulled
here); ``tests/deploy/image.py`` builds and runs. The image is built once for
this module, in scratch storage removed afterwards, and one sidecar runs in it
on a read-only root, with only the queue volume writable, in sandbox mode.

The sidecar's tests run in file order: the calls first, then the stop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy import image
from tests.deploy.image import APP_GID, APP_UID, QUEUE_DIR, Buildah, BuiltImage, Container
from tests.deploy.image import RunningSidecar as Sidecar
from tests.sidecar import isolated_env, run_sidecar

SANDBOX = {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": "prod-check"}
STOP_GRACE = 40.0  # seconds from SIGTERM to exit, at most
OCI_LABELS = ("title", "description", "version", "revision", "created", "licenses")
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


@pytest.fixture(scope="module")
def tools() -> None:
    """What ./scripts/install-image-tools installs, and the root that buildah needs."""
    if os.geteuid() != 0:
        pytest.fail("run as root: buildah's chroot isolation and bind mounts need it")
    for tool, present in (
        ("buildah", shutil.which("buildah") is not None),
        ("hadolint", image.HADOLINT.is_file()),
        ("the stand-in base", image.BASE_TARBALL.is_file()),
    ):
        if not present:
            pytest.fail(f"{tool} is missing: run ./scripts/install-image-tools first")


@pytest.fixture(scope="module")
def buildah(tools: None) -> Iterator[Buildah]:
    """buildah on fresh scratch storage for this module, removed after."""
    with image.scratch_storage() as buildah:
        yield buildah


@pytest.fixture(scope="module")
def built(buildah: Buildah) -> BuiltImage:
    """The image, built once from nothing but the cached base tarball."""
    return image.build_image(buildah)


@pytest.fixture(scope="module")
def config(built: BuiltImage) -> dict[str, Any]:
    """The image's Docker config (Docker's format keeps HEALTHCHECK)."""
    return built.config


@pytest.fixture(scope="module")
def container(buildah: Buildah, built: BuiltImage) -> Iterator[Container]:
    """A container of the image with its root filesystem mounted on the host."""
    with image.mounted_container(buildah, built) as container:
        yield container


@pytest.fixture(scope="module")
def running(container: Container) -> Iterator[Sidecar]:
    """The sidecar in sandbox mode on a read-only root, the queue in a volume."""
    with image.run_sidecar(container, SANDBOX) as sidecar:
        yield sidecar


@pytest.fixture
def sidecar(running: Sidecar) -> Sidecar:
    """The running sidecar, for a test that needs it still up."""
    if running.shutdown is not None:
        pytest.fail("the sidecar was stopped already: the stop tests come last (file order)")
    return running


@pytest.fixture
def client(sidecar: Sidecar) -> Iterator[httpx.Client]:
    """An HTTP client for the sidecar's API listener."""
    with httpx.Client(base_url=sidecar.url, timeout=10.0, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def shutdown(running: Sidecar) -> image.Shutdown:
    """The sidecar stopped with SIGTERM, as a container runtime stops it."""
    return running.stop(grace=STOP_GRACE)


# --- the Dockerfile ---------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile(tools: None) -> None:
    image.run([str(image.HADOLINT), "Dockerfile"], timeout=60)


def run_python(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A ``python3 ...`` command of the image, run by this venv's Python."""
    assert command[0] == "python3", command
    return subprocess.run(
        [sys.executable, *command[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthcheck_never_goes_through_a_proxy(tmp_path: Path) -> None:
    # The Dockerfile's HEALTHCHECK command (the built image's is checked to be the
    # same below), run against a live sidecar with a dead proxy in its environment.
    command = image.dockerfile_healthcheck_command()
    with run_sidecar({"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": "prod-check"}) as s:
        port = s.url.rsplit(":", 1)[1]
        env = isolated_env({**DEAD_PROXY, "METERING_PORT": port}, tmp_path)
        result = run_python(command, env)
        assert result.returncode == 0, result.stderr
        # Plain urlopen, in the same environment, goes to the dead proxy and fails:
        # so passing above means the proxy was bypassed.
        url = f"http://127.0.0.1:{port}/healthz"
        plain = [
            "python3",
            "-c",
            f"import urllib.request; urllib.request.urlopen({url!r}, timeout=3)",
        ]
        result = run_python(plain, env)
        assert result.returncode != 0
        assert "Connection refused" in result.stderr, result.stderr
        # And with the sidecar gone, the health check fails: passing means something.
        s.stop()
        assert run_python(command, env).returncode != 0


# --- the image's configuration ------------------------------------------------------


def test_runs_as_a_numeric_non_root_user(config: dict[str, Any]) -> None:
    # Kubernetes' runAsNonRoot can only verify a number.
    assert config.get("User") == f"{APP_UID}:{APP_GID}"


def test_entrypoint_is_the_sidecar(config: dict[str, Any]) -> None:
    assert config.get("Entrypoint") == ["metering-sidecar"]


def test_stop_signal_is_sigterm(config: dict[str, Any]) -> None:
    assert config.get("StopSignal") == "SIGTERM"


def test_healthcheck_calls_healthz(config: dict[str, Any]) -> None:
    command = image.healthcheck_command(config)
    assert "/healthz" in " ".join(command)


def test_healthcheck_is_the_dockerfiles(config: dict[str, Any]) -> None:
    # What test_healthcheck_never_goes_through_a_proxy runs without a build.
    assert image.healthcheck_command(config) == image.dockerfile_healthcheck_command()


def test_api_and_operations_ports_are_exposed(config: dict[str, Any]) -> None:
    exposed = config.get("ExposedPorts") or {}
    assert "8080/tcp" in exposed
    assert "8081/tcp" in exposed, "the operations listener's port"


def test_queue_is_a_volume_and_the_queue_path_is_in_it(config: dict[str, Any]) -> None:
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    assert QUEUE_DIR in (config.get("Volumes") or {})
    assert env.get("METERING_QUEUE_PATH") == f"{QUEUE_DIR}/queue.sqlite3"


def test_python_writes_no_bytecode(config: dict[str, Any]) -> None:
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"


def test_oci_labels(built: BuiltImage, config: dict[str, Any]) -> None:
    labels = config.get("Labels") or {}
    missing = [name for name in OCI_LABELS if f"org.opencontainers.image.{name}" not in labels]
    assert not missing, f"no org.opencontainers.image.{{{','.join(missing)}}} label"
    assert labels["org.opencontainers.image.version"] == built.version
    assert labels["org.opencontainers.image.revision"] == built.revision


# --- the image's content ---------------------------------------------------------


def test_no_compiler_or_build_tool(container: Container) -> None:
    found = [
        f"/{folder}/{tool}"
        for tool in ("gcc", "cc", "c++", "make", "ld")
        for folder in ("usr/bin", "usr/local/bin", "opt/venv/bin")
        if os.path.lexists(container.rootfs / folder / tool)
    ]
    assert not found, f"in the image: {found}"


def test_no_pip_in_the_venv(container: Container) -> None:
    assert not (container.rootfs / "opt/venv/bin/pip").exists()


def test_no_pip_cache(container: Container) -> None:
    found = [
        f"/{cache}"
        for cache in ("root/.cache/pip", "nonexistent/.cache")
        if (container.rootfs / cache).exists()
    ]
    assert not found, f"in the image: {found}"


def test_no_build_leftovers(container: Container) -> None:
    assert not (container.rootfs / "src").exists(), "the build's /src"
    assert not (container.rootfs / "tmp/wheels").exists(), "the build's wheels"


def test_the_sidecar_is_installed_in_the_venv(container: Container) -> None:
    assert (container.rootfs / "opt/venv/bin/metering-sidecar").is_file()


def test_queue_directory_belongs_to_the_user(container: Container) -> None:
    stat = (container.rootfs / QUEUE_DIR.lstrip("/")).stat()
    assert (stat.st_uid, stat.st_gid) == (APP_UID, APP_GID)


# --- the sidecar, running in it ---------------------------------------------------


def test_root_is_read_only_and_the_queue_volume_writable(sidecar: Sidecar) -> None:
    mounts = image.mounts(sidecar.pid)
    assert mounts["/"].read_only
    assert not mounts[QUEUE_DIR].read_only


@pytest.mark.parametrize("kind", ["Uid", "Gid"])
def test_sidecar_runs_as_the_non_root_user(sidecar: Sidecar, kind: str) -> None:
    # Real, effective, saved and filesystem IDs, all of them.
    expected = APP_UID if kind == "Uid" else APP_GID
    assert image.proc_ids(sidecar.pid, kind) == [expected] * 4


def test_healthz(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ready"


def test_sandbox_meter_usage(client: httpx.Client) -> None:
    response = client.post("/v1/meter-usage", json={"UsageDimension": "users", "UsageQuantity": 3})
    assert response.status_code == 200, response.text
    assert response.json().get("MeteringRecordId")
    assert response.headers.get("X-Metering-Sandbox") == "true"


def test_operations_listener_answers_readyz(sidecar: Sidecar) -> None:
    with httpx.Client(base_url=sidecar.ops_url, timeout=10.0, trust_env=False) as ops:
        response = ops.get("/readyz")
    assert response.status_code == 200, response.text


def test_the_images_healthcheck_command_succeeds(sidecar: Sidecar, config: dict[str, Any]) -> None:
    # Run in the container as Docker would, against the running sidecar, with a dead
    # proxy in the container's environment as an egress proxy would be.
    buildah = sidecar.container.buildah
    proxy_args = [arg for name, value in DEAD_PROXY.items() for arg in ("--env", f"{name}={value}")]
    try:
        image.run(
            buildah.command(
                "run", "--isolation", "chroot", "--network", "host",
                "--env", f"METERING_PORT={sidecar.port}", *proxy_args,
                sidecar.container.name, "--", *image.healthcheck_command(config),
            ),
            timeout=60,
        )  # fmt: skip
    except image.CommandFailed as failure:
        pytest.fail(f"the image's HEALTHCHECK command failed: {failure}")


# --- ... and stopped --------------------------------------------------------------


def test_sigterm_stops_it_gracefully_in_time(shutdown: image.Shutdown) -> None:
    assert shutdown.seconds is not None, (
        f"still running {STOP_GRACE:.0f} s after SIGTERM:\n{shutdown.log}"
    )
    assert '"Application shutdown complete."' in shutdown.log, shutdown.log


def test_it_logged_no_errors(shutdown: image.Shutdown) -> None:
    errors = [line for line in shutdown.log.splitlines() if image.ERROR_IN_LOG.search(line)]
    assert not errors, shutdown.log


def test_it_wrote_its_queue_to_the_volume(running: Sidecar, shutdown: image.Shutdown) -> None:
    # The root was read-only: the volume is the one place it could write.
    written = sorted(path.name for path in running.queue.iterdir())
    assert "queue.sqlite3" in written, written
