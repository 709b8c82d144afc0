"""The README documents every setting and starts with the two commands CI also runs."""

from __future__ import annotations

from app.config import Settings
from tests.sidecar import REPO


def test_every_setting_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`METERING_{name.upper()}`" in readme, name
        assert f"`--{name.replace('_', '-')}`" in readme, name


def test_ci_runs_the_readmes_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "```sh\n./scripts/test\n```" in readme
    assert "./scripts/test" in ci
