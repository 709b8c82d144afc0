"""Validate JSON values against botocore's ``meteringmarketplace`` service model.

AWS validates every request against the same Smithy/Coral model botocore ships,
so using the model as data (not botocore's client-side validator, which skips
patterns and maxima) gives the fake AWS's constraints without restating them.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, NamedTuple

import botocore.loaders
import botocore.model

__all__ = [
    "API_VERSION",
    "SERVICE_NAME",
    "Violation",
    "format_violations",
    "modelled_errors",
    "operation_names",
    "service_model",
    "validate_input",
    "validate_shape",
]

SERVICE_NAME = "meteringmarketplace"
API_VERSION = "2016-01-14"


class Violation(NamedTuple):
    """One constraint failure: AWS-style member ``path`` and the full AWS-style clause."""

    path: str
    message: str


@functools.cache
def service_model() -> Any:
    """Load (once) the botocore ``ServiceModel`` for Marketplace Metering 2016-01-14."""
    loader = botocore.loaders.create_loader()
    raw = loader.load_service_model(SERVICE_NAME, "service-2", api_version=API_VERSION)
    return botocore.model.ServiceModel(raw, service_name=SERVICE_NAME)


@functools.cache
def modelled_errors(operation: str) -> dict[str, int]:
    """The errors the model lists for ``operation``, each with the HTTP status AWS
    answers it with: 500 for a shape marked ``"fault": true`` (AWS's own failure),
    400 for the rest (AWS JSON 1.1 carries no other status in this model)."""
    loader = botocore.loaders.create_loader()
    raw = loader.load_service_model(SERVICE_NAME, "service-2", api_version=API_VERSION)
    errors = raw["operations"][operation].get("errors", [])
    return {
        error["shape"]: 500 if raw["shapes"][error["shape"]].get("fault") else 400
        for error in errors
    }


def operation_names() -> list[str]:
    """Names of the operations in the model (``MeterUsage``, ...)."""
    return list(service_model().operation_names)


def validate_input(operation: str, value: object) -> list[Violation]:
    """Validate a decoded JSON request body against an operation's input shape."""
    shape = service_model().operation_model(operation).input_shape
    if shape is None:
        return []
    return validate_shape(shape, value, "")


def _member_path(parent: str, member: str) -> str:
    # AWS reports members in lowerCamelCase ("usageRecords.1.member.quantity").
    name = member[:1].lower() + member[1:]
    return f"{parent}.{name}" if parent else name


def _show(value: object) -> str:
    """Render a value the way AWS's messages quote it (null unquoted, others in quotes)."""
    if value is None:
        return "null"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if len(text) > 200:
        # AWS echoes whole values; truncating keeps giant test payloads readable.
        text = text[:200] + "..."
    return f"'{text}'"


def _violation(path: str, value: object, constraint: str) -> Violation:
    return Violation(
        path, f"Value {_show(value)} at '{path}' failed to satisfy constraint: {constraint}"
    )


_NUMERIC_TYPES = frozenset({"integer", "long", "double", "float"})


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python but a distinct JSON type.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _check_type(shape: Any, value: object, path: str) -> list[Violation]:
    """Return a violation if ``value`` is not of the shape's JSON type."""
    type_name: str = shape.type_name
    ok = {
        "structure": isinstance(value, dict),
        "map": isinstance(value, dict),
        "list": isinstance(value, list),
        "string": isinstance(value, str),
        "blob": isinstance(value, str),
        "integer": _is_int(value),
        "long": _is_int(value),
        "boolean": isinstance(value, bool),
        # JSON protocols send timestamps as epoch seconds, possibly fractional.
        "timestamp": _is_number(value),
        "double": _is_number(value),
        "float": _is_number(value),
    }.get(type_name, True)
    if ok:
        return []
    return [_violation(path, value, f"Member must be of type {type_name}")]


def _check_range(shape: Any, value: object, path: str) -> list[Violation]:
    """Check min/max: length for strings and lists, value for numbers."""
    meta: dict[str, Any] = shape.metadata
    minimum, maximum = meta.get("min"), meta.get("max")
    size: float
    if isinstance(value, str | list | dict):
        size, what = len(value), "length"
    elif isinstance(value, int | float) and shape.type_name in _NUMERIC_TYPES:
        size, what = value, "value"
    else:
        return []
    out: list[Violation] = []
    if minimum is not None and size < minimum:
        out.append(
            _violation(path, value, f"Member must have {what} greater than or equal to {minimum}")
        )
    if maximum is not None and size > maximum:
        out.append(
            _violation(path, value, f"Member must have {what} less than or equal to {maximum}")
        )
    return out


def _check_string(shape: Any, value: str, path: str) -> list[Violation]:
    meta: dict[str, Any] = shape.metadata
    out: list[Violation] = []
    pattern = meta.get("pattern")
    # AWS anchors its patterns where it means to, hence search, not fullmatch.
    if pattern is not None and not _compiled(pattern).search(value):
        out.append(
            _violation(path, value, f"Member must satisfy regular expression pattern: {pattern}")
        )
    enum = meta.get("enum")
    if enum and value not in enum:
        out.append(
            _violation(path, value, f"Member must satisfy enum value set: [{', '.join(enum)}]")
        )
    return out


def validate_shape(shape: Any, value: object, path: str) -> list[Violation]:
    """Validate ``value`` against a botocore ``Shape``; ``path`` names it in messages."""
    type_errors = _check_type(shape, value, path)
    if type_errors:
        return type_errors
    out = _check_range(shape, value, path)
    if isinstance(value, str):
        out += _check_string(shape, value, path)
    elif shape.type_name == "structure" and isinstance(value, dict):
        members: dict[str, Any] = shape.members
        for name in shape.required_members:
            # JSON null counts as absent, as in AWS's deserialisers.
            if value.get(name) is None:
                out.append(_violation(_member_path(path, name), None, "Member must not be null"))
        for name, member_shape in members.items():
            # Unknown members are ignored, like AWS's JSON 1.1 services do.
            if value.get(name) is not None:
                out += validate_shape(member_shape, value[name], _member_path(path, name))
    elif shape.type_name == "list" and isinstance(value, list):
        for index, item in enumerate(value, start=1):
            item_path = f"{path}.{index}.member"
            if item is None:
                out.append(_violation(item_path, None, "Member must not be null"))
            else:
                out += validate_shape(shape.member, item, item_path)
    elif shape.type_name == "map" and isinstance(value, dict):
        for key, item in value.items():
            out += validate_shape(shape.key, key, f"{path}.{key}.key")
            out += validate_shape(shape.value, item, f"{path}.{key}.value")
    return out


def format_violations(violations: list[Violation]) -> str:
    """Join violations into AWS's ``N validation error(s) detected: ...`` message."""
    count = len(violations)
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun} detected: " + "; ".join(v.message for v in violations)
