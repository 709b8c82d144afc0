"""Schemathesis hooks for the fuzz run of ``test_openapi.py`` (loaded by ``SCHEMATHESIS_HOOKS``).

The AWS wire protocol's bodies (``application/x-amz-json-1.1``) are JSON, and
are sent as such.

AWS accepts a usage ``Timestamp`` only inside a window around *now* (6 hours
back, a few minutes ahead), which no JSON Schema can state. So in the cases
schemathesis generates as schema-valid, every ``Timestamp`` is moved to the
present before the call; the rest of each case is left as generated, so any
other schema-valid request that the sidecar refuses still fails the run.

``X-Metering-Sandbox-Error`` asks the sandbox for an error answer on purpose (AWS's
400s and 403s, 5xx, 504 UpstreamTimeout), which the "valid data is accepted" and
"no server error" checks would count against it. So schema-valid cases are sent
without it; schema-invalid ones keep it, so a value outside its enum must still be
refused (422, or 400 on the wire route).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import schemathesis
from schemathesis.generation import GenerationMode

from app.actions.sandbox import REHEARSAL_HEADER

schemathesis.serializer.alias("application/x-amz-json-1.1", "application/json")


def _pin_timestamps(value: Any, now: str) -> Any:
    if isinstance(value, dict):
        return {
            key: now if key == "Timestamp" else _pin_timestamps(item, now)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_pin_timestamps(item, now) for item in value]
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Timestamps of schema-valid bodies to the present, and no rehearsal header on them
    (see the module docstring)."""
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return
    if case.headers:
        case.headers = {k: v for k, v in case.headers.items() if k != REHEARSAL_HEADER}
    if isinstance(case.body, dict | list):
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        case.body = _pin_timestamps(case.body, now)
