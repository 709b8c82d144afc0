"""What people who depend on the project read: one license, said the same everywhere (the
package, the image and LICENSE), and a changelog that knows the current version."""

from __future__ import annotations

import hashlib
import re
import tomllib

from app import __version__
from tests.sidecar import REPO

SPDX = "Apache-2.0"
# The sha256 of the Apache License 2.0's terms exactly as the ASF publishes them
# (https://www.apache.org/licenses/LICENSE-2.0.txt, up to "END OF TERMS AND
# CONDITIONS"): the appendix after them is the boilerplate one may fill in.
APACHE_2_0_TERMS_SHA256 = "0cec06e0e55fbc3dc5cee4fca9b607f66cb8f4e4dbcf3b3c013594dd156732e9"
END_OF_TERMS = "END OF TERMS AND CONDITIONS"


def test_pyproject_declares_the_license() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    license_ = project["license"]
    declared = license_ if isinstance(license_, str) else license_.get("text")
    assert declared == SPDX


def test_the_image_label_declares_the_same_license() -> None:
    labels = re.findall(
        r'org\.opencontainers\.image\.licenses="([^"]*)"', (REPO / "Dockerfile").read_text()
    )
    # The label is optional; where it is, it says what the package says.
    assert all(label == SPDX for label in labels), labels


def test_license_holds_the_whole_apache_2_0_text() -> None:
    text = (REPO / "LICENSE").read_text()
    head = [line.strip() for line in text.splitlines() if line.strip()][:2]
    assert head == ["Apache License", "Version 2.0, January 2004"]
    assert END_OF_TERMS in text, "LICENSE stops before the end of the terms"
    terms = text[: text.index(END_OF_TERMS) + len(END_OF_TERMS)]
    assert hashlib.sha256(terms.encode()).hexdigest() == APACHE_2_0_TERMS_SHA256, (
        "LICENSE's terms differ from the Apache License 2.0 as published"
    )
    # No copyright holder invented: the appendix is the ASF's, placeholders and all,
    # or names the project's authors.
    owners = re.findall(r"^\s*Copyright (.+)$", text[len(terms) :], flags=re.MULTILINE)
    assert set(owners) <= {"[yyyy] [name of copyright owner]", "the metering-sidecar authors"}


def test_the_changelog_has_unreleased_changes_and_the_current_version() -> None:
    text = (REPO / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert versions[0] == "Unreleased"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    assert __version__ in versions
