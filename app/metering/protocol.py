"""AWS JSON 1.1, as AWS Marketplace Metering speaks it: targets, bodies, errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

TARGET_PREFIX = "AWSMPMeteringService"
CONTENT_TYPE = "application/x-amz-json-1.1"
SIGNING_NAME = "aws-marketplace"
ACTIONS = ("MeterUsage", "BatchMeterUsage", "ResolveCustomer", "RegisterUsage")


def epoch_seconds(value: datetime) -> int | float:
    """A datetime as AWS's JSON timestamps: epoch seconds, whole when it can be."""
    seconds = value.timestamp()
    return int(seconds) if seconds.is_integer() else round(seconds, 6)


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return epoch_seconds(value)
    raise TypeError(f"cannot encode {type(value).__name__}")


def encode(payload: Mapping[str, Any]) -> bytes:
    """Serialize a request payload, datetimes as epoch seconds, compactly."""
    return json.dumps(payload, default=_default, separators=(",", ":"), ensure_ascii=False).encode()


def error_code(raw: str) -> str:
    """Strip AWS's decorations: ``ns#Code`` and ``Code:http://...`` both mean ``Code``."""
    code = raw.split("#")[-1]
    return code.split(":", 1)[0].strip()


_XML_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_XML_MESSAGE = re.compile(rb"<Message>([^<]{0,1024})</Message>")


def parse_error(status: int, headers: Mapping[str, str], body: bytes) -> tuple[str, str]:
    """(code, message) of an AWS error response: JSON 1.1, or the XML some front ends
    (signature checks among them) answer with; tolerant of anything else."""
    code = ""
    message = ""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw_type = data.get("__type") or data.get("code") or ""
        code = error_code(str(raw_type)) if raw_type else ""
        raw_message = data.get("message", data.get("Message"))
        message = str(raw_message) if raw_message is not None else ""
    else:
        code_match = _XML_CODE.search(body)
        message_match = _XML_MESSAGE.search(body)
        code = code_match.group(1).decode("utf-8", "replace").strip() if code_match else ""
        message = message_match.group(1).decode("utf-8", "replace").strip() if message_match else ""
    if not code:
        header = headers.get("x-amzn-errortype", "")
        code = error_code(header) if header else ""
    if not code:
        code = "InternalServiceErrorException" if status >= 500 else f"Http{status}"
    if not message:
        message = f"AWS answered HTTP {status} ({code})"
    return code, message
