"""The README's settings table and the chart's ``sidecar.config`` schema, from ``Settings``.

Both restate ``app.config.Settings``: one README row per field (environment
variable, flag, default, and the Field description that ``--help`` prints), one
``values.schema.json`` property per ``METERING_*`` variable the chart lets a
user set (types and bounds from the fields' constraints). ``./scripts/gen-settings``
writes them; ``tests/deploy/test_generated.py`` fails when they drift.

Only ``app.config.Settings`` is imported from the app.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path, PurePath
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from app.config import Settings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SCHEMA = REPO / "helm" / "metering-sidecar" / "values.schema.json"

README_BEGIN = (
    "<!-- settings:begin: ./scripts/gen-settings writes this table from app/config.py -->"
)
README_END = "<!-- settings:end -->"
README_HEADER = "| environment | flag | default | meaning |\n|---|---|---|---|\n"

# The chart sets these itself, from Secrets mounted as files (sidecar.authToken
# as the file METERING_AUTH_TOKEN_FILE names, queue.postgres as the file
# METERING_QUEUE_DSN_FILE names), so that neither secret is in the sidecar's
# environment: sidecar.config must not take them.
SECRET_ONLY = frozenset({"auth_token", "auth_token_file", "queue_dsn", "queue_dsn_file"})

# Checked by Settings' field validators rather than by Field constraints, so
# the fields' own schema does not show them. tests/deploy/test_generated.py
# checks each against Settings.
VALIDATOR_PATTERNS: dict[str, str] = {
    "product_code": r"^[-a-zA-Z0-9/=:_.@]*$",
    "endpoint_url": r"^(https?://[^/\s@?#]+(/[^\s?#]*)?)?$",
    "events_queue_url": r"^(https?://[^/\s@?#]+/[0-9]{1,20}/[A-Za-z0-9_-]{1,80}(\.fifo)?)?$",
}

# Where the chart accepts less than the app. METERING_PORT 0 (any free port)
# cannot work in a pod: the container port and the app's URL name the port.
CHART_NARROWING: dict[str, dict[str, Any]] = {
    "port": {"minimum": 1},
}

INTEGER_PATTERN = "^[0-9]+$"
SIGNED_INTEGER_PATTERN = "^-?[0-9]+$"
NUMBER_PATTERN = "^[0-9]+(\\.[0-9]+)?$"
SIGNED_NUMBER_PATTERN = "^-?[0-9]+(\\.[0-9]+)?$"
BOUNDS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
PROPERTY_KEYS = ("description", "type", "enum", "minLength", "maxLength", "pattern", *BOUNDS)


def env_prefix() -> str:
    """``METERING_``."""
    prefix: str = Settings.model_config.get("env_prefix", "")
    return prefix


def env_names(name: str, field: FieldInfo) -> tuple[list[str], list[str]]:
    """The field's own variables, and the other variables read after them (region)."""
    alias = field.validation_alias
    if alias is None:
        return [f"{env_prefix()}{name}".upper()], []
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    # The field's own name is the keyword the flags use, not a variable.
    variables = [c for c in choices if isinstance(c, str) and c != name]
    own = [v for v in variables if v.upper().startswith(env_prefix().upper())]
    return own, [v for v in variables if v not in own]


def flags(name: str, field: FieldInfo) -> list[str]:
    """The field's flags, as ``app.__main__`` builds them."""
    flag = "--" + name.replace("_", "-")
    if field.annotation is bool:
        return [flag, "--no-" + flag.removeprefix("--")]
    return [flag]


def render_value(value: Any) -> str:
    """A default as the README writes it: true/false, 10 not 10.0, ./relative paths."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, PurePath):
        text = value.as_posix()
        if not value.is_absolute() and not text.startswith("."):
            text = f"./{text}"
        return text
    if hasattr(value, "get_secret_value"):
        return "***"
    return str(value)


def default_text(name: str, field: FieldInfo) -> str:
    """The README's default column: ``none``, a value, or the variables read first."""
    default = field.get_default(call_default_factory=True)
    text = "none" if default is None else f"`{render_value(default)}`"
    _, fallbacks = env_names(name, field)
    return ", then ".join([*(f"`{variable}`" for variable in fallbacks), text])


def escape_markdown(text: str) -> str:
    """Text safe in a table cell: no column breaks, no HTML tags, no emphasis."""
    for char in ("\\", "|", "<", "*"):
        text = text.replace(char, "\\" + char)
    return text


def description(name: str, field: FieldInfo) -> str:
    """The Field description: the ``--help`` text."""
    if not field.description:
        raise ValueError(f"Settings.{name} has no description")
    return " ".join(field.description.split())


def readme_table() -> str:
    """The README's settings table, one row per field in declaration order."""
    rows = []
    for name, field in Settings.model_fields.items():
        own, _ = env_names(name, field)
        cells = [
            ", ".join(f"`{variable}`" for variable in own),
            ", ".join(f"`{flag}`" for flag in flags(name, field)),
            default_text(name, field),
            escape_markdown(description(name, field)),
        ]
        rows.append("| " + " | ".join(cells) + " |\n")
    return README_HEADER + "".join(rows)


def render_readme(text: str) -> str:
    """The README with the table between its markers written anew."""
    begin = text.find(README_BEGIN)
    end = text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(
            f"README.md: no {README_BEGIN!r} ... {README_END!r} around the settings table"
        )
    start = begin + len(README_BEGIN)
    return text[:start] + "\n\n" + readme_table() + "\n" + text[end:]


def _tidy(number: Any) -> Any:
    """24 rather than 24.0 in the schema."""
    if isinstance(number, float) and number.is_integer():
        return int(number)
    return number


@functools.cache
def _field_schemas() -> dict[str, Any]:
    """pydantic's JSON schema of every field."""
    properties: dict[str, Any] = Settings.model_json_schema()["properties"]
    return properties


def _value_schema(name: str) -> tuple[dict[str, Any], bool]:
    """The field's pydantic JSON schema without ``None``, and whether ``None`` is allowed."""
    properties = _field_schemas()
    # A field with alias choices is listed under the first one.
    alias = Settings.model_fields[name].validation_alias
    key = alias.choices[0] if isinstance(alias, AliasChoices) else name
    node: dict[str, Any] = properties[str(key)]
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"Settings.{name}: no chart schema rule for {node}")
        return branches[0], len(branches) < len(node["anyOf"])
    return node, False


def config_property(name: str, field: FieldInfo) -> dict[str, Any]:
    """The chart schema of one setting: YAML may give numbers and booleans as strings."""
    node, optional = _value_schema(name)
    prop: dict[str, Any] = {"description": description(name, field)}
    kind = node.get("type")
    lower = node.get("minimum", node.get("exclusiveMinimum"))
    unsigned = lower is not None and lower >= 0
    if "enum" in node:
        if not all(isinstance(choice, str) for choice in node["enum"]):
            raise ValueError(f"Settings.{name}: no chart schema rule for {node}")
        prop |= {"type": "string", "enum": node["enum"]}
    elif kind == "boolean":
        prop |= {"type": ["boolean", "string"], "enum": [True, False, "true", "false"]}
    elif kind == "integer":
        pattern = INTEGER_PATTERN if unsigned else SIGNED_INTEGER_PATTERN
        prop |= {"type": ["integer", "string"], "pattern": pattern}
    elif kind == "number":
        pattern = NUMBER_PATTERN if unsigned else SIGNED_NUMBER_PATTERN
        prop |= {"type": ["number", "string"], "pattern": pattern}
    elif kind == "string":
        prop["type"] = "string"
        string_pattern: str | None = node.get("pattern", VALIDATOR_PATTERNS.get(name))
        if string_pattern is not None:
            prop["pattern"] = string_pattern
        for key in ("minLength", "maxLength"):
            if key in node:
                prop[key] = node[key]
        # An empty optional string means unset; a required one must say something.
        if not optional and string_pattern is None and "minLength" not in prop:
            prop["minLength"] = 1
    else:
        raise ValueError(f"Settings.{name}: no chart schema rule for {node}")
    for key in BOUNDS:
        if key in node:
            prop[key] = _tidy(node[key])
    prop |= CHART_NARROWING.get(name, {})
    return {key: prop[key] for key in PROPERTY_KEYS if key in prop}


def config_properties() -> dict[str, dict[str, Any]]:
    """``sidecar.config.properties``: every setting the chart lets a user set."""
    properties: dict[str, dict[str, Any]] = {}
    for name, field in Settings.model_fields.items():
        if name in SECRET_ONLY:
            continue
        own, _ = env_names(name, field)
        for variable in own:
            properties[variable] = config_property(name, field)
    return properties


def dump_json(document: Any) -> str:
    """values.schema.json's formatting."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def render_schema(text: str) -> str:
    """values.schema.json with ``sidecar.config.properties`` written anew, the rest as is."""
    document = json.loads(text)
    config = document["properties"]["sidecar"]["properties"]["config"]
    config["properties"] = config_properties()
    return dump_json(document)


def main(argv: list[str] | None = None) -> int:
    """Write (or, with --check, compare) both files."""
    parser = argparse.ArgumentParser(prog="gen-settings", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a file is out of date"
    )
    args = parser.parse_args(argv)
    stale = []
    for path, render, what in (
        (README, render_readme, f"{len(Settings.model_fields)} settings"),
        (SCHEMA, render_schema, f"{len(config_properties())} settings in sidecar.config"),
    ):
        current = path.read_text()
        text = render(current)
        relative = path.relative_to(REPO)
        if text == current:
            state = "unchanged"
        elif args.check:
            state = "OUT OF DATE"
            stale.append(relative)
        else:
            path.write_text(text)
            state = "updated"
        print(f"gen-settings: {relative} {state}: {what}")
    if stale:
        print("gen-settings: run ./scripts/gen-settings", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
