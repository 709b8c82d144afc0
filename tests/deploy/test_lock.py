"""The lock files pin every dependency pyproject.toml names, at a version it allows."""

from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.sidecar import REPO

_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", re.MULTILINE)


def _pins(lock: str) -> dict[str, str]:
    text = (REPO / "requirements" / lock).read_text()
    return {canonicalize_name(name): version for name, version in _PIN.findall(text)}


def _requirements(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"])
    if extra:
        names += project["optional-dependencies"][extra]
    return [Requirement(name) for name in names]


@pytest.mark.parametrize(("lock", "extra"), [("runtime.txt", None), ("test.txt", "test")])
def test_every_dependency_is_locked_at_an_allowed_version(lock: str, extra: str | None) -> None:
    pins = _pins(lock)
    text = (REPO / "requirements" / lock).read_text()
    for requirement in _requirements(extra):
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements/{lock}: run ./scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/{lock} pins {name}=={pins[name]}, outside {requirement.specifier}: "
            "run ./scripts/lock"
        )
    # Every pin carries hashes: the image and CI install with --require-hashes.
    assert text.count("==") == len(pins)
    assert text.count("--hash=sha256:") >= len(pins)


def test_the_image_and_ci_install_from_the_locks() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile
    assert "requirements/runtime.txt" in dockerfile
    script = (REPO / "scripts" / "test").read_text()
    assert "--require-hashes -r requirements/test.txt" in script
