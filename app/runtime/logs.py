"""JSON log lines, one object per line, carrying the request id of the request being served.

Only fields named in ``extra=`` and the message reach a line: request and
response bodies, headers and credentials are never passed to a logger. What
libraries log (psycopg quotes parts of a DSN it cannot use) passes through
``app.runtime.redaction`` like everything else: every string of a line is redacted.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any

from app.runtime.redaction import redact

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of msg
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` with its time, level, logger, message, request id and extras."""
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = _scrub(value)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=_redacted_text, separators=(",", ":"))


def _scrub(value: object) -> object:
    """``value`` with every string in it redacted (containers walked)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item) for item in value]
    return value


def _redacted_text(value: object) -> str:
    return redact(str(value))


def configure_logging(level: str) -> None:
    """Send every logger (uvicorn's included) to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # The sidecar writes its own access line; uvicorn's would be a second one.
    logging.getLogger("uvicorn.access").disabled = True
    # botocore logs request details at debug, httpx a line per request at
    # info: the sidecar's own lines say all of that once, and cheaper.
    for name in ("botocore", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
