"""Every fenced block of the guides is run, checked, or says why it cannot be.

What runs is in each guide's own test (``tests/test_readme_examples.py``,
``tests/test_readme.py``, ``tests/deploy/test_guide_*.py``); here: every block carries a
mark (``tests/guides.py``), shell blocks parse, a block that cannot run here uses
only variables the guide sets before it, and no command carries a fixed date.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import guides
from tests.sidecar import REPO
from tests.test_readme_examples import examples

# Set by the shell or the platform, not by the guide.
AMBIENT = frozenset({"HOME", "PATH", "PWD", "USER"})
# A calendar date: in a command it goes stale, and AWS refuses usage older than its window.
FIXED_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
# The IAM policy language's version is a date by name, not a time of usage.
POLICY_VERSION = '"Version": "2012-10-17"'
SHELL = ("sh", "bash", "shell")


@pytest.mark.parametrize("guide", guides.GUIDES, ids=lambda path: path.name)
def test_every_block_is_marked(guide: Path) -> None:
    unmarked = [block.where for block in guides.blocks(guide) if block.kind is None]
    assert not unmarked, f"fenced blocks without a '<!-- guide: ... -->' mark: {unmarked}"
    unknown = [
        (block.where, block.kind)
        for block in guides.blocks(guide)
        if block.kind is not None and block.kind not in guides.KINDS
    ]
    assert not unknown, unknown
    for block in guides.blocks(guide):
        if block.kind in ("elsewhere", "file"):
            assert block.argument, f"{block.where}: '{block.kind}' needs a reason or a name"


@pytest.mark.parametrize("guide", guides.GUIDES, ids=lambda path: path.name)
def test_shell_blocks_parse(guide: Path) -> None:
    for block in guides.blocks(guide):
        if block.language in SHELL and block.kind in ("run", "elsewhere"):
            error = guides.bash_syntax_error(block.text)
            assert error is None, f"{block.where}: {error}"


@pytest.mark.parametrize("guide", guides.GUIDES, ids=lambda path: path.name)
def test_blocks_that_run_elsewhere_use_only_what_the_guide_sets(guide: Path) -> None:
    """A variable read by a block that cannot run here is set earlier in the guide
    (exported where a child process such as envsubst reads it) or within the block."""
    known: set[str] = set(AMBIENT)
    for block in guides.blocks(guide):
        if block.language not in SHELL or block.kind not in ("run", "elsewhere"):
            continue
        if block.kind == "elsewhere":
            unset = guides.variables_read(block.text) - known - guides.variables_set(block.text)
            assert not unset, f"{block.where} reads {sorted(unset)}, which the guide never sets"
        known |= guides.variables_set(block.text) | guides.exported(block.text)


@pytest.mark.parametrize("guide", guides.GUIDES, ids=lambda path: path.name)
def test_no_command_carries_a_fixed_date(guide: Path) -> None:
    for block in guides.blocks(guide):
        if block.kind == "examples":
            commands = [example.command for example in examples(block.text)]
        elif block.kind in ("run", "elsewhere", "file"):
            commands = [block.text]
        else:
            continue
        for command in commands:
            found = FIXED_DATE.search(command.replace(POLICY_VERSION, ""))
            assert found is None, f"{block.where}: a fixed date {found.group()!r} in {command!r}"


def test_the_marks_are_read() -> None:
    """The parser finds a mark and its argument, and a block without one."""
    text = (
        "<!-- guide: file values.yaml -->\n```yaml\na: 1\n```\n\n"
        "<!-- guide: run -->\n\n```sh\necho hi\n```\n\n```sh\necho unmarked\n```\n"
    )
    found = guides.parse(text, REPO / "docs" / "x.md")
    assert [(b.kind, b.argument, b.language, b.text) for b in found] == [
        ("file", "values.yaml", "yaml", "a: 1\n"),
        ("run", "", "sh", "echo hi\n"),
        (None, "", "sh", "echo unmarked\n"),
    ]


def test_variables_read_and_set() -> None:
    script = "export A=1 B\nC=$(echo \"$D\" '$E')\nfor F in 1; do echo ${G:-x} $F; done\n"
    assert guides.variables_read(script) == {"D", "G", "F"}
    assert guides.variables_set(script) == {"A", "C", "F"}
    assert guides.exported(script) == {"A", "B"}
