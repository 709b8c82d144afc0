"""Build and run the container image with buildah, without a Docker daemon.

``scripts/install-image-tools`` installs buildah and hadolint and caches the
stand-in base: no base image can be pulled here, so Debian bookworm's own
python3 is bootstrapped into a tarball. This module imports that tarball as the
Dockerfile's ``BASE_IMAGE``, builds the image with buildah (vfs storage in a
scratch folder, chroot isolation, nothing pulled) and runs the sidecar in it
with its root filesystem read-only and only the queue volume writable.

Every command has a time-out; every process started here is stopped, and the
scratch storage removed, when its context manager exits.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.sidecar import REPO, free_port

# scripts/install-image-tools installs and caches these: change both together.
TOOLS = REPO / ".tools"
HADOLINT = TOOLS / "hadolint" / "bin" / "hadolint"
IMAGE_CACHE = TOOLS / "image"
BASE_TARBALL = IMAGE_CACHE / "debian-bookworm-python3-minbase.tar"

BASE_TAG = "localhost/metering-sidecar-base:bookworm-python3"
IMAGE_TAG = "localhost/metering-sidecar:check"
APP_UID = 10001
APP_GID = 10001
QUEUE_DIR = "/var/lib/metering-sidecar"

# The stand-in base: the cached root filesystem, plus the host's CA bundle (not
# in the tarball) so that where egress passes through a TLS-inspecting proxy,
# pip in the build trusts what the host trusts. The official python image
# brings its own bundle.
_BASE_CONTAINERFILE = """\
FROM scratch
ADD rootfs.tar /
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
CMD ["/bin/bash"]
"""
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

IMPORT_TIMEOUT = 300.0
BUILD_TIMEOUT = 900.0
# Starting, calling and stopping the sidecar: the whole run, at most.
RUN_TIMEOUT = 180
STARTUP_TIMEOUT = 30.0


class CommandFailed(AssertionError):
    """A command exited non-zero or ran out of time; the message ends with its output."""


def run(
    args: Sequence[str], *, timeout: float, cwd: Path = REPO, tail: int = 40
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in a session of its own, stdout and stderr together.

    On a time-out the whole session gets SIGTERM (buildah cleans up its
    children), then SIGKILL; either failure raises with the output's last lines.
    """
    with subprocess.Popen(
        list(args),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                output, _ = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            raise CommandFailed(
                f"{_show(args)} did not finish within {timeout:.0f} s:\n{_tail(output, tail)}"
            ) from None
    if process.returncode != 0:
        raise CommandFailed(
            f"{_show(args)} exited with {process.returncode}:\n{_tail(output, tail)}"
        )
    return subprocess.CompletedProcess(process.args, process.returncode, output, None)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _show(args: Sequence[str]) -> str:
    return " ".join(args[:3]) + (" ..." if len(args) > 3 else "")


def _tail(output: str, lines: int) -> str:
    return "\n".join(output.splitlines()[-lines:])


@dataclass(frozen=True)
class Buildah:
    """buildah on storage of its own in ``scratch``: vfs, so nothing needs overlay."""

    scratch: Path

    def command(self, *args: str) -> list[str]:
        """The buildah command line for ``args`` on this storage."""
        return [
            "buildah",
            "--root",
            str(self.scratch / "root"),
            "--runroot",
            str(self.scratch / "runroot"),
            "--storage-driver",
            "vfs",
            *args,
        ]

    def __call__(self, *args: str, timeout: float = 60.0) -> str:
        """Run buildah with ``args``; its output, or CommandFailed."""
        return run(self.command(*args), timeout=timeout).stdout


@contextlib.contextmanager
def scratch_storage() -> Iterator[Buildah]:
    """A fresh buildah storage next to the cached base; removed, with all it holds, after."""
    IMAGE_CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run.", dir=IMAGE_CACHE))
    for folder in ("root", "runroot", "queue", "base"):
        (scratch / folder).mkdir()
    buildah = Buildah(scratch)
    try:
        yield buildah
    finally:
        for args in (("rm", "--all"), ("rmi", "--all", "--force")):
            with contextlib.suppress(CommandFailed):
                buildah(*args, timeout=120)
        _remove_scratch(scratch)


def _mounts_under(folder: Path) -> list[str]:
    prefix = f"{folder}/"
    mount_points = (
        line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )
    return sorted((point for point in mount_points if point.startswith(prefix)), reverse=True)


def _remove_scratch(scratch: Path) -> None:
    """Never delete through a mount point: a bind mount left behind would take the host's files."""
    for point in _mounts_under(scratch):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30, check=False)
    if _mounts_under(scratch):
        print(f"left {scratch} in place: something is still mounted under it")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class BuiltImage:
    """The image as built: its tag, the build arguments it got and its Docker config."""

    tag: str
    version: str
    revision: str
    config: dict[str, Any]


def project_version() -> str:
    """The version in pyproject.toml, which the image's version label carries."""
    with (REPO / "pyproject.toml").open("rb") as file:
        version: str = tomllib.load(file)["project"]["version"]
    return version


def git_revision() -> str:
    """The checked-out commit, or ``unknown`` outside a git checkout."""
    result = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def import_base(buildah: Buildah) -> None:
    """Tag the cached stand-in root filesystem as BASE_TAG in ``buildah``'s storage."""
    context = buildah.scratch / "base"
    try:
        os.link(BASE_TARBALL, context / "rootfs.tar")
    except OSError:
        shutil.copyfile(BASE_TARBALL, context / "rootfs.tar")
    shutil.copyfile(HOST_CA_BUNDLE, context / "ca-certificates.crt")
    (context / "Containerfile").write_text(_BASE_CONTAINERFILE)
    buildah(
        "bud", "--isolation", "chroot", "--pull=never", "--quiet", "-t", BASE_TAG, str(context),
        timeout=IMPORT_TIMEOUT,
    )  # fmt: skip


def build_image(buildah: Buildah) -> BuiltImage:
    """Build the Dockerfile on the stand-in base, as IMAGE_TAG; its config."""
    import_base(buildah)
    version, revision = project_version(), git_revision()
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Docker's format keeps HEALTHCHECK (the OCI image config has no such field).
    buildah(
        "bud", "--isolation", "chroot", "--pull=never", "--format", "docker",
        "--build-arg", f"BASE_IMAGE={BASE_TAG}",
        "--build-arg", f"VERSION={version}",
        "--build-arg", f"REVISION={revision}",
        "--build-arg", f"CREATED={created}",
        "-t", IMAGE_TAG, str(REPO),
        timeout=BUILD_TIMEOUT,
    )  # fmt: skip
    inspected = json.loads(buildah("inspect", "--type", "image", IMAGE_TAG))
    config: dict[str, Any] = inspected["Docker"]["config"]
    return BuiltImage(IMAGE_TAG, version, revision, config)


@dataclass(frozen=True)
class Container:
    """A working container of the image, its root filesystem mounted on the host."""

    buildah: Buildah
    name: str
    rootfs: Path


@contextlib.contextmanager
def mounted_container(buildah: Buildah, image: BuiltImage) -> Iterator[Container]:
    """A container from ``image`` with its root mounted; unmounted and removed after."""
    name = buildah("from", "--pull=never", "--name", "metering-sidecar-check", image.tag).strip()
    try:
        rootfs = Path(buildah("mount", name).strip())
        try:
            yield Container(buildah, name, rootfs)
        finally:
            with contextlib.suppress(CommandFailed):
                buildah("umount", name)
    finally:
        with contextlib.suppress(CommandFailed):
            buildah("rm", name)


def descendants(pid: int) -> list[int]:
    """Every process started under ``pid``, children before their parents."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: the fields follow its ")".
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []

    def walk(parent: int) -> None:
        for child in children.get(parent, []):
            walk(child)
            found.append(child)

    walk(pid)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    except OSError:
        return []


def _is_sidecar(pid: int) -> bool:
    """The image's entry point, run by the image's Python."""
    args = _cmdline(pid)
    return (
        len(args) >= 2
        and Path(args[0]).name.startswith("python")
        and Path(args[1]).name == "metering-sidecar"
    )


def proc_ids(pid: int, kind: str) -> list[int]:
    """``Uid`` or ``Gid`` of ``pid``: real, effective, saved and filesystem."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name == kind:
            return [int(value) for value in values.split()]
    raise AssertionError(f"no {kind} line in /proc/{pid}/status")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/<pid>/mountinfo: where, and mounted read-only or not."""

    point: str
    read_only: bool


def mounts(pid: int) -> dict[str, Mount]:
    """The mounts ``pid`` sees, by mount point as seen from its root."""
    found: dict[str, Mount] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        found[point] = Mount(point, "ro" in fields[5].split(","))
    return found


@dataclass(frozen=True)
class Shutdown:
    """How the sidecar's stop went: seconds from SIGTERM to exit (None: it did not)."""

    seconds: float | None
    log: str


@dataclass
class RunningSidecar:
    """The sidecar running in the container, and the process tree that runs it."""

    container: Container
    runner: subprocess.Popen[bytes]
    pid: int
    port: int
    ops_port: int
    log_path: Path
    queue: Path
    shutdown: Shutdown | None = None

    @property
    def url(self) -> str:
        """The API listener."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def ops_url(self) -> str:
        """The operations listener."""
        return f"http://127.0.0.1:{self.ops_port}"

    def log(self) -> str:
        """What the sidecar (and buildah) wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, grace: float) -> Shutdown:
        """SIGTERM to the sidecar; wait up to ``grace`` seconds for it to exit."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        seconds: float | None = None
        while time.monotonic() - started < grace:
            if not alive(self.pid):
                seconds = time.monotonic() - started
                break
            time.sleep(0.1)
        if seconds is not None:
            # buildah 1.28 itself exits non-zero here (it cannot remove its mount
            # points from a read-only root); the sidecar's own exit is what counts.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.runner.wait(timeout=30)
        self.shutdown = Shutdown(seconds, self.log())
        return self.shutdown

    def kill_all(self) -> None:
        """SIGTERM to every process of the run, then SIGKILL to what is left; reap the runner."""
        if self.runner.poll() is None:
            for pid in [*descendants(self.runner.pid), self.runner.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.runner.wait(timeout=10)
            for pid in [*descendants(self.runner.pid), self.runner.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.runner.wait(timeout=30)


# buildah has no --read-only: a private mount namespace makes the container's
# root a read-only bind mount for this run only. The queue volume is the one
# writable place, as in the Helm chart.
_READ_ONLY_ROOT = """
set -e
mount --bind "$1" "$1"
mount -o remount,bind,ro "$1"
shift
exec "$@"
"""


@contextlib.contextmanager
def run_sidecar(container: Container, env: Mapping[str, str]) -> Iterator[RunningSidecar]:
    """The image's entry point on a read-only root, the queue in a volume, on free ports.

    ``env`` comes on top of METERING_PORT, METERING_OPS_HOST (127.0.0.1) and
    METERING_OPS_PORT. On exit every process of the run is stopped.
    """
    scratch = container.buildah.scratch
    queue = scratch / "queue"
    os.chown(queue, APP_UID, APP_GID)
    # buildah run bind-mounts these over files in the root; on a read-only root
    # they must exist beforehand.
    for name in ("run/.containerenv", "etc/hosts", "etc/resolv.conf", "etc/hostname"):
        (container.rootfs / name).touch()
    port, ops_port = free_port(), free_port()
    full_env = {
        "METERING_PORT": str(port),
        "METERING_OPS_HOST": "127.0.0.1",
        "METERING_OPS_PORT": str(ops_port),
        **env,
    }
    env_args = [arg for name, value in full_env.items() for arg in ("--env", f"{name}={value}")]
    log_path = scratch / "sidecar.log"
    with log_path.open("wb") as log_file:
        runner = subprocess.Popen(
            [
                "timeout", str(RUN_TIMEOUT),
                "unshare", "--mount", "--propagation", "private", "--",
                "bash", "-c", _READ_ONLY_ROOT, "read-only-root", str(container.rootfs),
                *container.buildah.command(
                    "run", "--isolation", "chroot", "--network", "host",
                    "--volume", f"{queue}:{QUEUE_DIR}",
                    *env_args,
                    container.name, "--", "metering-sidecar",
                ),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    # Its PID is known once it is up.
    sidecar = RunningSidecar(container, runner, 0, port, ops_port, log_path, queue)
    try:
        sidecar.pid = _wait_for_sidecar(sidecar)
        yield sidecar
    finally:
        sidecar.kill_all()


def _wait_for_sidecar(sidecar: RunningSidecar) -> int:
    """The sidecar's PID once it answers /healthz; CommandFailed if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with httpx.Client(base_url=sidecar.url, timeout=1.0, trust_env=False) as client:
        while time.monotonic() < deadline and sidecar.runner.poll() is None:
            pids = [pid for pid in descendants(sidecar.runner.pid) if _is_sidecar(pid)]
            if pids:
                try:
                    if client.get("/healthz").status_code == 200:
                        return pids[-1]
                except httpx.TransportError:
                    pass
            time.sleep(0.2)
    exit_code = sidecar.runner.poll()
    what = (
        f"did not answer /healthz within {STARTUP_TIMEOUT:.0f} s"
        if exit_code is None
        else f"exited (buildah run: {exit_code}) before answering /healthz"
    )
    raise CommandFailed(f"the sidecar {what}:\n{_tail(sidecar.log(), 60)}")


def healthcheck_command(config: Mapping[str, Any]) -> list[str]:
    """The HEALTHCHECK's command: its Test without the leading CMD."""
    test: list[str] = (config.get("Healthcheck") or {}).get("Test") or []
    assert test[:1] == ["CMD"], f"HEALTHCHECK is {test}"
    return test[1:]


def dockerfile_healthcheck_command(dockerfile: Path = REPO / "Dockerfile") -> list[str]:
    """The HEALTHCHECK's command as the Dockerfile writes it (exec form), without a build."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = re.findall(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert len(found) == 1, f"{len(found)} HEALTHCHECK ... CMD [...] instructions in {dockerfile}"
    command: list[str] = json.loads(found[0])
    assert isinstance(command, list), command
    assert all(isinstance(arg, str) for arg in command), command
    return command


# A JSON log line at level error or critical, or a Python traceback.
ERROR_IN_LOG = re.compile(r'"level": ?"(error|critical)"|Traceback', re.IGNORECASE)
