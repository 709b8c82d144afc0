"""What restates ``Settings`` is generated from it: the README's table, the chart's schema.

``./scripts/gen-settings`` (``scripts/settings_docs.py``) writes the README's
settings table and ``values.schema.json``'s ``sidecar.config.properties``; as
with ``openapi/openapi.json``, the committed files must equal what the code
produces. The few rules the generator keeps by hand (patterns Settings checks in
validators, the chart's narrowing) are checked against Settings itself.
"""

from __future__ import annotations

import re
import sys

import pytest
from pydantic import ValidationError

from app.config import Settings
from tests.sidecar import REPO

sys.path.insert(0, str(REPO / "scripts"))
import settings_docs

REGENERATE = "run ./scripts/gen-settings and commit the result"

# Values on both sides of each pattern Settings checks in a validator.
VALIDATOR_SAMPLES = {
    "product_code": ["prod-abc123", "", "a/b=c:d_e.f@g", "prod abc", "prod#1", "prod-é"],
    "endpoint_url": [
        "",
        "https://metering.marketplace.us-east-1.amazonaws.com",
        "http://127.0.0.1:4566/",
        "https://vpce.example.com/a/b?c=d",
        "https://vpce.example.com/a/b",
        "https://vpce.example.com/a@b",
        "https://user:pass@vpce.example.com",
        "https://vpce.example.com#top",
        "https://vpce.example.com\n",
        "ftp://example.com",
        "https://",
        "https://exa mple.com",
        "metering.example.com",
    ],
    "events_queue_url": [
        "",
        "https://sqs.us-east-1.amazonaws.com/123456789012/marketplace-events",
        "http://127.0.0.1:9324/000000000000/events.fifo",
        "https://sqs.us-east-1.amazonaws.com/123456789012/",
        "https://sqs.us-east-1.amazonaws.com/marketplace-events",
        "https://user:pw@sqs.us-east-1.amazonaws.com/123456789012/q",
        "https://sqs.us-east-1.amazonaws.com/123456789012/q?x=1",
        "https://sqs.us-east-1.amazonaws.com/123456789012/q\n",
    ],
}


def accepts(name: str, value: object) -> bool:
    """Whether Settings takes this value for this field (the environment aside)."""
    try:
        Settings.model_validate({name: value})
    except ValidationError:
        return False
    return True


def test_readme_table_is_generated() -> None:
    current = settings_docs.README.read_text()
    assert current == settings_docs.render_readme(current), (
        f"README.md's settings table differs from app/config.py's Settings: {REGENERATE}"
    )


def test_chart_schema_is_generated() -> None:
    current = settings_docs.SCHEMA.read_text()
    assert current == settings_docs.render_schema(current), (
        "helm/metering-sidecar/values.schema.json's sidecar.config.properties differ from "
        f"app/config.py's Settings: {REGENERATE}"
    )


def test_every_setting_has_a_row() -> None:
    rows = settings_docs.readme_table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    for row, name in zip(rows, Settings.model_fields, strict=True):
        assert row.startswith(f"| `METERING_{name.upper()}` | `--{name.replace('_', '-')}`")


def test_schema_leaves_out_exactly_the_secret_only_settings() -> None:
    assert set(Settings.model_fields) >= settings_docs.SECRET_ONLY
    expected = {
        f"METERING_{name.upper()}"
        for name in Settings.model_fields
        if name not in settings_docs.SECRET_ONLY
    }
    assert set(settings_docs.config_properties()) == expected


def test_fallback_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # The README's default column names them in order (region: AWS_REGION, then
    # AWS_DEFAULT_REGION); the field's own variable comes first.
    for name, field in Settings.model_fields.items():
        own, fallbacks = settings_docs.env_names(name, field)
        if not fallbacks:
            continue
        values = {variable: f"eu-west-{i}" for i, variable in enumerate([*own, *fallbacks], 1)}
        for variable in values:
            monkeypatch.delenv(variable, raising=False)
        for variable in reversed(list(values)):
            monkeypatch.setenv(variable, values[variable])
            assert getattr(Settings(), name) == values[variable], variable


@pytest.mark.parametrize(
    ("name", "value"),
    [(name, value) for name, values in VALIDATOR_SAMPLES.items() for value in values],
)
def test_validator_patterns_agree_with_settings(name: str, value: str) -> None:
    pattern = settings_docs.config_properties()[f"METERING_{name.upper()}"]["pattern"]
    # JSON Schema's (ECMA-262) "$" ends the string; Python's also matches before a
    # final newline, so the pattern is read with "\Z" in its place.
    ecma = pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern
    assert (re.search(ecma, value) is not None) == accepts(name, value), (
        f"the chart's pattern for METERING_{name.upper()} and Settings disagree on {value!r}"
    )


def test_every_validator_pattern_is_sampled() -> None:
    assert set(VALIDATOR_SAMPLES) == set(settings_docs.VALIDATOR_PATTERNS)


def test_chart_narrowing_stays_within_settings() -> None:
    for name, bounds in settings_docs.CHART_NARROWING.items():
        for key, bound in bounds.items():
            assert key in ("minimum", "maximum"), key
            assert accepts(name, bound), f"the chart's {key} of {name}, {bound}, is no valid value"
