"""docs/shared-store.md, followed as written.

"Try it on one machine" is run by bash, block after block, from the repository's root
as its reader would: a throwaway PostgreSQL, two sandbox sidecars on it, usage sent to
each, one grain holding the sum, and everything stopped. The recipe's fixed ports are
swapped for free ones. Before its last block (the stop) the fleet-settings block further
down runs against the same store, and a third sidecar with another
``METERING_QUEUE_GRACE`` must refuse to start with the guide's message.

PostgreSQL refuses to run as root, and CI runs as root: then the recipe finds a mirror
of ``/usr/lib/postgresql`` whose programs run as the ``postgres`` OS user (as
``tests/pg.py`` runs them). Whatever happens, the test kills what the recipe started (its
bash's process group) and stops any PostgreSQL left in its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests import guides
from tests.pg import OS_USER, POSTGRES_ROOT
from tests.sidecar import REPO, free_port, isolated_env

GUIDE = REPO / "docs" / "shared-store.md"
SECTION = "## Try it on one machine"
# The ports the recipe's reader types; each is swapped for a free one.
RECIPE_PORTS = ("5433", "8180", "8181", "8280", "8281")
# Each replica's operations port, for its metrics.
OPS_PORTS = ("8181", "8281")
# How the recipe finds PostgreSQL's programs on Debian.
RECIPE_BINDIRS = f"{POSTGRES_ROOT}/*/bin"
# The whole script, start to stop; it takes about 7 s.
SCRIPT_TIMEOUT = 40.0
MARK = ":::"
AS_ROOT = os.geteuid() == 0

# A PostgreSQL program run as the postgres OS user; initdb hands the folder of its data
# directory to that user first (the recipe's mktemp folder, root's otherwise).
WRAPPER = """#!/bin/bash
set -e
if [ {name} = initdb ]; then
  previous=
  for arg in "$@"; do
    if [ "$previous" = -D ]; then
      mkdir -p "$arg"
      chown {user}: "$(dirname "$arg")" "$arg"
    fi
    previous=$arg
  done
fi
exec runuser -u {user} -- {program} "$@"
"""


def test_the_recipe_runs_two_replicas_into_one_grain() -> None:
    recipe, fleet_block = _blocks()
    with _folder() as folder:
        ports = _free_ports(len(RECIPE_PORTS) + 2)
        port_of = dict(zip(RECIPE_PORTS, ports, strict=False))
        refused_port, refused_ops_port = ports[len(RECIPE_PORTS) :]
        typed = "".join(block.text for block in recipe)
        for typed_port in RECIPE_PORTS:
            assert re.search(rf"\b{typed_port}\b", typed), (
                f"{typed_port} is no longer in the recipe"
            )
        steps = [(block.where, _with_ports(block.text, port_of)) for block in recipe]
        if AS_ROOT:
            where, first = steps[0]
            assert RECIPE_BINDIRS in first, (
                f"{where}: the recipe no longer looks in {RECIPE_BINDIRS}"
            )
            steps[0] = (where, first.replace(RECIPE_BINDIRS, f"{_mirror(folder)}/*/bin"))
        refused_log = folder / "refused.log"
        # The third replica, with the recipe's variables and another grace; `timeout`
        # bounds it if it started after all.
        refusal = (
            f"METERING_QUEUE_GRACE=60 METERING_PORT={refused_port} "
            f"METERING_OPS_PORT={refused_ops_port} "
            f"METERING_QUEUE_PATH={shlex.quote(str(folder / 'spool-c.sqlite3'))} "
            f"timeout 20 .venv/bin/metering-sidecar >{shlex.quote(str(refused_log))} 2>&1 "
            '&& status=0 || status=$?\necho "exit $status"\n'
        )
        # `python` as in a replica's environment: the venv's.
        fleet = f'(PATH="$PWD/.venv/bin:$PATH"\n{fleet_block.text})\n'
        # What each replica took, from its own metrics.
        queued = "".join(
            f"curl -fsS localhost:{port_of[ops]}/metrics | grep '^metering_queue_records_total'\n"
            for ops in OPS_PORTS
        )
        steps[-1:-1] = [
            ("queued", queued),
            (fleet_block.where, fleet),
            ("refusal", refusal),
        ]
        script = "set -e\n" + "".join(
            f"echo {shlex.quote(f'{MARK} {name}')}\n{text}" for name, text in steps
        )
        script += f"echo {MARK} done\n"

        stdout, stderr, status = _run(script, folder)
        output = _sections(stdout)
        context = f"exit {status}\n--- stdout\n{stdout}\n--- stderr\n{stderr}{_logs(folder)}"
        assert status == 0, context
        assert list(output) == [name for name, _ in steps] + ["done"], context

        # Both replicas ready.
        ready = _json_lines(output[recipe[1].where])
        assert [answer["status"] for answer in ready] == ["ready", "ready"], context

        # One record to each, both in one grain with the sum, listed alike by both.
        first, second, *pages = _json_lines(output[recipe[2].where])
        receipts = [receipt["Accepted"] for receipt in (first, second)]
        assert [len(accepted) for accepted in receipts] == [1, 1], context
        assert [first["Rejected"], second["Rejected"]] == [[], []], context
        grain_ids = {accepted[0]["GrainId"] for accepted in receipts}
        assert len(grain_ids) == 1, context
        assert len(pages) == 2, context
        assert pages[0] == pages[1], context
        (grain,) = pages[0]["Items"]
        assert grain["Id"] in grain_ids, context
        assert (grain["Quantity"], grain["Records"], grain["Status"]) == ("5", 2, "open"), context

        # Each replica queued one of the records.
        assert output["queued"].splitlines() == [
            'metering_queue_records_total{status="queued"} 1.0'
        ] * len(OPS_PORTS), context

        # fleet-settings: the same settings as the fleet's; both commands exit 0 (set -e).
        fleet_output = output[fleet_block.where].splitlines()
        compared = [line for line in fleet_output if line.startswith("METERING_")]
        assert compared, context
        for line in compared:
            match = re.fullmatch(r"METERING_\w+: here (.*), fleet (.*)", line)
            assert match is not None, line
            assert match.group(1) == match.group(2), line
        # Once for the comparison, once for --write (which has nothing to write then).
        assert fleet_output.count("fleet-settings: these are the fleet's settings") == 2, context

        # The third replica refused to start, as the guide's output block says.
        # It exits at once, non-zero (124: still running when `timeout` ended it).
        refused_status = int(output["refusal"].strip().removeprefix("exit "))
        assert refused_status not in (0, 124), refused_log.read_text()
        assert _masked(_the_guides_refusal()) in _masked(_refusal_in(refused_log)), (
            refused_log.read_text()
        )

        # Everything stopped: no server left in the folder, every port closed.
        assert not list(folder.rglob("postmaster.pid")), context
        for port in ports:
            assert not _listening(port), f"port {port} still open after the recipe\n{context}"


def test_the_iam_statement_grants_connect_to_the_database_user() -> None:
    statement = json.loads(guides.file_block(GUIDE, "rds-db-connect-statement.json").text)
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "rds-db:connect"
    assert re.fullmatch(
        r"arn:aws:rds-db:<region>:<account>:dbuser:<DbiResourceId>/metering", statement["Resource"]
    )


# --- the recipe ---------------------------------------------------------------------------


def _blocks() -> tuple[list[guides.Block], guides.Block]:
    """The recipe's run blocks, in order, and the fleet-settings block: the guide's only
    run blocks."""
    lines = GUIDE.read_text().split("\n")
    start = lines.index(SECTION) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("## ")) + 1
    runs = guides.of_kind(GUIDE, "run")
    recipe = [block for block in runs if start < block.line < end]
    others = [block for block in runs if block not in recipe]
    assert len(recipe) == 4, [block.where for block in recipe]
    assert len(others) == 1, [block.where for block in others]
    assert "python -m app fleet-settings --write" in others[0].text
    return recipe, others[0]


def _with_ports(text: str, port_of: dict[str, int]) -> str:
    """The text with each of the recipe's ports (a whole number) swapped, in one pass."""
    pattern = r"\b(" + "|".join(map(re.escape, port_of)) + r")\b"
    return re.sub(pattern, lambda match: str(port_of[match.group(1)]), text)


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _mirror(folder: Path) -> Path:
    """``/usr/lib/postgresql``'s version folders, each program run as the postgres user."""
    mirror = folder / "postgresql"
    for bindir in POSTGRES_ROOT.glob("*/bin"):
        target = mirror / bindir.parent.name / "bin"
        target.mkdir(parents=True)
        for program in bindir.iterdir():
            wrapper = target / program.name
            wrapper.write_text(
                WRAPPER.format(name=program.name, user=OS_USER, program=shlex.quote(str(program)))
            )
            wrapper.chmod(0o755)
    return mirror


# --- running it ---------------------------------------------------------------------------


@contextlib.contextmanager
def _folder() -> Iterator[Path]:
    """A folder for the recipe's temporary files (its TMPDIR), the postgres user's when
    root; any PostgreSQL still running in it is stopped at the end, and it is removed."""
    folder = Path(tempfile.mkdtemp(prefix="guide-shared-store-"))
    try:
        if AS_ROOT:
            shutil.chown(folder, OS_USER, OS_USER)
        yield folder
    finally:
        _stop_postgres_in(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_postgres_in(folder: Path) -> None:
    """Shut down at once (SIGQUIT, as ``pg_ctl stop -m immediate``) every PostgreSQL server
    whose command line names the folder: the recipe's, if it is still running (even with
    its data directory removed). pg_ctl detaches the server from the recipe's process
    group, so it is found by its command line and ended by its process id."""
    servers: list[int] = []
    for process in Path("/proc").iterdir():
        try:
            command = (process / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[0].endswith(b"/postgres") and any(bytes(folder) in arg for arg in command):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(process.name), signal.SIGQUIT)
                servers.append(int(process.name))
    deadline = time.monotonic() + 10
    while servers and time.monotonic() < deadline:
        servers = [pid for pid in servers if _running(pid)]
        time.sleep(0.05)
    for pid in servers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _run(script: str, folder: Path) -> tuple[str, str, int]:
    """Run the script with bash from the repository's root, in an environment of its own,
    in a process group of its own that is killed at the end (the sidecars with it)."""
    home = folder / "home"
    home.mkdir()
    env = {
        name: value
        for name, value in isolated_env({"TMPDIR": str(folder)}, home).items()
        if not name.startswith("PG") and name not in ("BASH_ENV", "ENV", "CDPATH")
    }
    path = folder / "recipe.sh"
    path.write_text(script)
    process = subprocess.Popen(
        ["bash", str(path)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            stdout, stderr = process.communicate(timeout=SCRIPT_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate(timeout=10)
            stderr += f"\n(killed: still running after {SCRIPT_TIMEOUT:g} s)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return stdout, stderr, process.returncode


def _sections(stdout: str) -> dict[str, str]:
    """What each step printed, by the step's name (its marker line)."""
    found: dict[str, str] = {}
    name: str | None = None
    for line in stdout.splitlines(keepends=True):
        if line.startswith(MARK + " "):
            name = line[len(MARK) + 1 :].strip()
            found[name] = ""
        elif name is not None:
            found[name] += line
    return found


def _json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _logs(folder: Path) -> str:
    """The end of every log the recipe left (its sidecars', PostgreSQL's)."""
    parts = []
    for log in sorted(folder.rglob("*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        parts.append(f"\n--- {log.name}\n{tail}")
    return "".join(parts)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- the refusal ----------------------------------------------------------------------------


def _the_guides_refusal() -> str:
    (block,) = guides.of_kind(GUIDE, "output")
    return block.text


def _refusal_in(log: Path) -> str:
    """The refusing replica's error message (its log is JSON lines), or nothing."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            message = str(json.loads(line).get("msg", ""))
            if message.startswith("refusing to start"):
                return message
    return ""


def _masked(text: str) -> str:
    """One line, with the moment and the replica that first wrote the settings masked."""
    text = " ".join(text.split())
    return re.sub(
        r"since \S+ \(first written by [^)]*\)", "since <when> (first written by <who>)", text
    )
