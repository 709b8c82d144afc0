"""Reading AWS's error answers in every shape they come in."""

from __future__ import annotations

import pytest

from app.metering.protocol import parse_error

CASES = [
    (
        400,
        {},
        b'{"__type":"ThrottlingException","message":"Rate exceeded"}',
        "ThrottlingException",
        "Rate exceeded",
    ),
    (
        400,
        {},
        b'{"__type":"com.amazonaws.marketplace#InvalidTokenException","Message":"bad"}',
        "InvalidTokenException",
        "bad",
    ),
    (
        403,
        {"x-amzn-errortype": "UnrecognizedClientException:http://internal.amazon.com/coral/"},
        b"",
        "UnrecognizedClientException",
        "AWS answered HTTP 403 (UnrecognizedClientException)",
    ),
    (
        403,
        {},
        b"<ErrorResponse><Errors><Error><Code>SignatureDoesNotMatch</Code>"
        b"<Message>no match</Message></Error></Errors></ErrorResponse>",
        "SignatureDoesNotMatch",
        "no match",
    ),
    (
        502,
        {},
        b"<html>Bad Gateway</html>",
        "InternalServiceErrorException",
        "AWS answered HTTP 502 (InternalServiceErrorException)",
    ),
    (418, {}, b"[1, 2]", "Http418", "AWS answered HTTP 418 (Http418)"),
]


@pytest.mark.parametrize(("status", "headers", "body", "code", "message"), CASES)
def test_parse_error(
    status: int, headers: dict[str, str], body: bytes, code: str, message: str
) -> None:
    assert parse_error(status, headers, body) == (code, message)
