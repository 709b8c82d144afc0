"""docs/troubleshooting.md has a section for every code a caller or an operator can meet,
found by its heading, and each problem type leads to its section.

The codes are read from where they are decided: the error classes, botocore's
service model, the classifier's lists (botocore's own among them), the causes,
and the checks ``/readyz`` reports (read from the code that builds them), so a new
one fails here until the runbook has it.
"""

from __future__ import annotations

import ast
import re

import pytest

from app.aws.classify import THROTTLING_CODES, TRANSIENT_CODES, modelled_errors
from app.metering import errors
from app.metering.codes import CONFIGURATION_CODES, CREDENTIAL_CODES, GENERIC_REQUEST_CODES
from app.metering.errors import AwsServiceError, Fault, MeteringError
from tests.sidecar import REPO

RUNBOOK = REPO / "docs" / "troubleshooting.md"
URN = "urn:metering-sidecar:problem:"
# Checks /readyz reports in some mode or setting (sandbox, aws, SQLite, a shared
# store, the entitlement gate, the events queue): none may go missing from the runbook.
READYZ_CHECKS = {
    "mode",
    "credentials",
    "endpoint",
    "aws",
    "quota",
    "clock",
    "queue",
    "spool",
    "background",
    "entitlement",
    "events",
}
HEADING = re.compile(r"^(#{1,6}) (.+)$", re.MULTILINE)


def _sections() -> list[tuple[str, str]]:
    """(heading, text up to the next heading) for every heading of the runbook."""
    text = RUNBOOK.read_text()
    matches = list(HEADING.finditer(text))
    return [
        (m.group(2), text[m.end() : matches[i + 1].start() if i + 1 < len(matches) else None])
        for i, m in enumerate(matches)
    ]


SECTIONS = _sections()


def _section(code: str, *, prefix: str = "") -> str:
    """The text of the section whose heading names ``code`` (in backquotes, after
    ``prefix``); fails if there is none."""
    found = [
        text for heading, text in SECTIONS if heading.startswith(prefix) and f"`{code}`" in heading
    ]
    assert found, f"docs/troubleshooting.md has no section headed {prefix}`{code}`"
    return found[0]


def _error_classes(cls: type[MeteringError]) -> list[type[MeteringError]]:
    return [cls, *(sub for child in cls.__subclasses__() for sub in _error_classes(child))]


def sidecar_codes() -> set[str]:
    """The code of every MeteringError class (AwsServiceError carries AWS's)."""
    return {
        cls.code
        for cls in _error_classes(MeteringError)
        if cls is not AwsServiceError and cls.__module__ == errors.__name__
    }


def aws_codes() -> set[str]:
    """AWS's codes a caller can meet as a problem's code: every modelled error, and
    every code the classifier sorts but for the credential codes (those become
    CredentialsRejected)."""
    modelled = frozenset().union(*modelled_errors().values())
    return set(
        modelled | THROTTLING_CODES | TRANSIENT_CODES | CONFIGURATION_CODES | GENERIC_REQUEST_CODES
    )


def readyz_checks_in_the_code() -> set[str]:
    """The names /readyz's route and the queue's readiness give their checks."""
    names: set[str] = set()
    probes = ast.parse((REPO / "app" / "api" / "routes" / "probes.py").read_text())
    for node in ast.walk(probes):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id == "checks"
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            names.add(node.slice.value)
    for path in (REPO / "app" / "queue").glob("*.py"):
        for function in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(function, ast.AsyncFunctionDef) and function.name == "readiness"):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict):
                    names.update(
                        key.value
                        for key in node.value.keys
                        if isinstance(key, ast.Constant) and isinstance(key.value, str)
                    )
    return names


def test_the_lists_are_read_from_the_code() -> None:
    assert {"CredentialsRejected", "QueueUnavailable", "InternalError"} <= sidecar_codes()
    assert {"CustomerNotEntitledException", "TooManyRequestsException"} <= aws_codes()
    assert {"credentials", "aws", "queue", "events"} <= readyz_checks_in_the_code()


@pytest.mark.parametrize("code", sorted(sidecar_codes() | aws_codes()))
def test_every_problem_type_leads_to_its_section(code: str) -> None:
    section = _section(code)
    assert f"`{URN}{code}`" in section, f"the section of {code} does not give its type"


@pytest.mark.parametrize("code", sorted(CREDENTIAL_CODES))
def test_every_credential_code_has_a_section(code: str) -> None:
    assert _section(code).strip(), f"the section of {code} says nothing"


@pytest.mark.parametrize("cause", [fault.value for fault in Fault])
def test_every_cause_has_a_section(cause: str) -> None:
    section = _section(cause, prefix="Cause ")
    assert "Shows in" in section


@pytest.mark.parametrize("check", sorted(READYZ_CHECKS | readyz_checks_in_the_code()))
def test_every_readyz_check_has_a_section(check: str) -> None:
    assert _section(check, prefix="`/readyz` check ").strip()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_every_link_within_the_runbook_lands_on_a_heading() -> None:
    anchors = [_slug(heading) for heading, _ in SECTIONS]
    assert len(anchors) == len(set(anchors)), "two headings share an anchor"
    links = set(re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text()))
    assert links, "the runbook links nothing"
    assert links <= set(anchors), sorted(links - set(anchors))


def test_the_problem_type_says_where_its_section_is() -> None:
    from app.api.problems import Problem

    description = Problem.model_fields["type"].description or ""
    assert "docs/troubleshooting.md" in description
    assert "docs/troubleshooting.md" in (REPO / "README.md").read_text()
