"""The guides' fenced blocks, each with what the suite does with it.

A guide marks every fenced block with a comment on the line before it (a blank
line may sit between):

- ``<!-- guide: run -->``: a shell block the guide's test runs, in order, in one
  working directory with the guide's example values exported;
- ``<!-- guide: file NAME -->``: the block is the file NAME of the guide (a
  values file, a policy, a task definition): the test saves and checks it;
- ``<!-- guide: output -->``: what a command prints (the test that runs the
  command checks it, or it shows an error by design);
- ``<!-- guide: examples -->``: ``$ curl`` lines with their outputs, run and
  compared by ``tests/test_readme_examples.py``;
- ``<!-- guide: pod VALUES... -->``: commands typed in the app's container of a
  pod the chart renders from these values files: the test runs them against a
  sandbox sidecar configured as those values configure it;
- ``<!-- guide: text -->``: a listing or an excerpt, nothing to run;
- ``<!-- guide: elsewhere REASON -->``: it needs what these machines cannot
  have (an AWS account, a cluster, a registry). The test still parses it with
  ``bash -n`` and finds every variable it uses set earlier in the guide.

``tests/test_guides.py`` refuses a block without a mark, so a new block is
either run or says why it cannot be.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.sidecar import REPO

GUIDES = (
    REPO / "README.md",
    REPO / "docs" / "deploy-eks.md",
    REPO / "docs" / "deploy-ecs.md",
    REPO / "docs" / "shared-store.md",
)
KINDS = frozenset({"run", "file", "output", "elsewhere", "examples", "text", "pod"})
_MARK = re.compile(r"^<!-- guide: (\w+)(?: (.*?))? -->$")
# $NAME or ${NAME...}: a shell variable a block reads.
_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
# NAME=... at a command's start, `export NAME=...`, `read NAME`, `for NAME in`.
_ASSIGNED = re.compile(
    r"(?:^|[\s;&|(])(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=|\bfor\s+([A-Za-z_][A-Za-z0-9_]*)\s+in\b"
)


@dataclass(frozen=True)
class Block:
    """One fenced block of a guide and its mark."""

    guide: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    kind: str | None
    argument: str

    @property
    def where(self) -> str:
        return f"{self.guide.relative_to(REPO)}:{self.line}"


def blocks(guide: Path) -> list[Block]:
    """Every fenced block of the guide, in order."""
    return parse(guide.read_text(), guide)


def parse(text: str, guide: Path) -> list[Block]:
    """Every fenced block of this text (the guide's), in order."""
    lines = text.split("\n")
    found: list[Block] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not line.startswith("```"):
            index += 1
            continue
        language = line[3:].strip()
        kind, argument = _mark_before(lines, index)
        end = index + 1
        while end < len(lines) and lines[end] != "```":
            end += 1
        text = "\n".join(lines[index + 1 : end]) + "\n"
        found.append(Block(guide, index + 1, language, text, kind, argument))
        index = end + 1
    return found


def _mark_before(lines: list[str], fence: int) -> tuple[str | None, str]:
    previous = fence - 1
    if previous >= 0 and not lines[previous].strip():
        previous -= 1
    if previous < 0:
        return None, ""
    match = _MARK.match(lines[previous].strip())
    if match is None:
        return None, ""
    return match.group(1), match.group(2) or ""


def of_kind(guide: Path, kind: str) -> list[Block]:
    return [block for block in blocks(guide) if block.kind == kind]


def file_block(guide: Path, name: str) -> Block:
    """The block marked ``file NAME``."""
    found = [block for block in of_kind(guide, "file") if block.argument == name]
    assert len(found) == 1, f"{guide.name}: {len(found)} blocks marked 'file {name}'"
    return found[0]


def variables_read(script: str) -> set[str]:
    """The shell variables a script reads (not those inside single quotes)."""
    unquoted = re.sub(r"'[^']*'", "''", script)
    unquoted = re.sub(r"(?m)#.*$", "", unquoted)
    return {a or b for a, b in _VARIABLE.findall(unquoted)}


def variables_set(script: str) -> set[str]:
    """The shell variables a script assigns."""
    return {a or b for a, b in _ASSIGNED.findall(script)}


def exported(script: str) -> set[str]:
    """The variables a script exports (``export A=1 B=2`` and ``export A``)."""
    names: set[str] = set()
    for line in script.split("\n"):
        stripped = line.strip()
        if stripped.startswith("export "):
            for word in stripped.removeprefix("export ").split():
                name = word.split("=", 1)[0]
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    names.add(name)
    return names


def bash_syntax_error(script: str) -> str | None:
    """What ``bash -n`` says of the script, or None if it parses."""
    result = subprocess.run(
        ["bash", "-n"], input=script, capture_output=True, text=True, timeout=10, check=False
    )
    return None if result.returncode == 0 else result.stderr
