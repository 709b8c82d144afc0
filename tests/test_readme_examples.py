"""The README's example outputs are what the sandbox answers, so they cannot drift.

Every ```sh block line starting with ``$ curl`` is run, in order, by bash against
one fresh sandbox sidecar started as the README's first command starts it
(``localhost:8080`` and ``localhost:8081`` point at it), and its output is
compared with the lines the README shows under it. Values that differ from run
to run (ids, times, signatures) are masked on both sides; a value the README
shows in an output and uses in a later command (a record's id) is replaced by
the real one before that command runs.

``METERING_UPDATE_README=1 .venv/bin/pytest tests/test_readme_examples.py``
writes the real outputs into README.md where they differ (masked).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.sidecar import REPO, Sidecar, run_sidecar

README = REPO / "README.md"

# (name, pattern): what changes between runs, masked as <name>.
VOLATILE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("record-id", re.compile(r"\bur_[0-9a-f]{28}\b")),
    ("uuid", re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")),
    ("time", re.compile(r"\b\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?Z")),
    ("hex", re.compile(r"\b[0-9a-f]{32}\b")),
)


@dataclass
class Example:
    """One ``$ command`` of the README and the output lines shown under it."""

    command: str
    output: list[str]
    # Line numbers (0-based) of the output in README.md.
    first: int
    end: int


def examples(text: str) -> list[Example]:
    """Every ``$ curl`` example of the README's ```sh blocks, in order."""
    lines = text.split("\n")
    found: list[Example] = []
    in_block = False
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("```"):
            in_block = line == "```sh" and not in_block
            index += 1
            continue
        if not (in_block and line.startswith("$ curl")):
            index += 1
            continue
        command = [line[2:]]
        terminator = _heredoc(line)
        index += 1
        while index < len(lines) and (
            terminator or command[-1].endswith("\\") or not _complete("\n".join(command))
        ):
            current = lines[index]
            command.append(current)
            if terminator and current == terminator:
                terminator = None
            elif terminator is None:
                terminator = _heredoc(current)
            index += 1
        first = index
        while index < len(lines) and not lines[index].startswith(("$ ", "```")):
            index += 1
        found.append(Example("\n".join(command), lines[first:index], first, index))
    return found


def _complete(command: str) -> bool:
    """Whether every quote of ``command`` is closed (a quoted body may span lines)."""
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def _heredoc(line: str) -> str | None:
    """The terminator of a here-document that ``line`` opens, if it opens one."""
    match = re.search(r"<<-?'?(\w+)'?", line)
    return match.group(1) if match else None


def mask(text: str) -> str:
    """``text`` with every volatile value replaced by its kind."""
    for name, pattern in VOLATILE:
        text = pattern.sub(f"<{name}>", text)
    return text


def volatile_values(text: str, name: str) -> list[str]:
    """The values of kind ``name`` in ``text``, in order."""
    pattern = dict(VOLATILE)[name]
    return pattern.findall(text)


@pytest.fixture(scope="module")
def readme_sandbox() -> Iterator[Sidecar]:
    """The sandbox as the README's first command starts it."""
    with run_sidecar(
        {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": "prod-demo"}, wait_ready=True
    ) as sidecar:
        yield sidecar


def run(command: str, sidecar: Sidecar) -> str:
    """Run one README command with bash, against ``sidecar``."""
    assert sidecar.ops_url is not None
    command = command.replace("localhost:8080", sidecar.url.removeprefix("http://"))
    command = command.replace("localhost:8081", sidecar.ops_url.removeprefix("http://"))
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout.rstrip("\n")


def test_the_readme_has_examples_to_check() -> None:
    found = examples(README.read_text())
    commands = " ".join(example.command for example in found)
    for route in ("meter-usage", "batch-meter-usage", "resolve-customer", "usage-records"):
        assert f"/v1/{route}" in commands, route
    assert all(example.output for example in found), "an example shows no output"


def test_the_readme_shows_what_the_sandbox_answers(readme_sandbox: Sidecar) -> None:
    text = README.read_text()
    lines = text.split("\n")
    # README value -> the real one, for values an example uses in a later command.
    seen: dict[str, str] = {}
    stale: list[str] = []
    replacements: list[tuple[Example, str]] = []
    for example in examples(text):
        command = example.command
        for shown, real in seen.items():
            command = command.replace(shown, real)
        actual = run(command, readme_sandbox)
        expected = "\n".join(example.output)
        for name, _ in VOLATILE:
            seen.update(
                zip(volatile_values(expected, name), volatile_values(actual, name), strict=False)
            )
        if mask(actual) != mask(expected):
            stale.append(f"$ {example.command}\nREADME:\n{expected}\nsandbox:\n{actual}")
            replacements.append((example, actual))
    if stale and os.environ.get("METERING_UPDATE_README") == "1":
        for example, actual in reversed(replacements):
            lines[example.first : example.end] = actual.split("\n")
        README.write_text("\n".join(lines))
        pytest.fail("README.md rewritten with the sandbox's answers: review and commit it")
    assert not stale, "\n\n".join(stale) + (
        "\n\nMETERING_UPDATE_README=1 .venv/bin/pytest tests/test_readme_examples.py "
        "writes the sandbox's answers into README.md"
    )
