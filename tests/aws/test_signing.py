"""The sidecar's own SigV4 signer signs exactly as botocore does, for every request it sends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from unittest.mock import patch

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from app.aws.signing import RequestSigner

ENDPOINTS = [
    (
        "https://metering.marketplace.us-east-1.amazonaws.com/",
        "metering.marketplace.us-east-1.amazonaws.com",
    ),
    ("http://127.0.0.1:4566/", "127.0.0.1:4566"),
    (
        "https://vpce-0abc.metering.eu-west-1.vpce.amazonaws.com/prefix/x y/",
        "vpce-0abc.metering.eu-west-1.vpce.amazonaws.com",
    ),
]


def _botocore(
    url: str,
    host: str,
    region: str,
    action: str,
    body: bytes,
    credentials: ReadOnlyCredentials,
    now: datetime,
) -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=url,
        data=body,
        headers={
            "Host": host,
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"AWSMPMeteringService.{action}",
        },
    )
    signer = SigV4Auth(credentials, "aws-marketplace", region)
    # add_auth itself, at a chosen time rather than the wall clock's.
    with patch("botocore.auth.get_current_datetime", lambda: now.replace(tzinfo=None)):
        signer.add_auth(request)
    return dict(request.headers.items())


@settings(max_examples=200, deadline=None)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    region=st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2"]),
    action=st.sampled_from(["MeterUsage", "BatchMeterUsage", "ResolveCustomer", "RegisterUsage"]),
    body=st.binary(max_size=300),
    key=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=16, max_size=20),
    secrets=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
    token=st.none() | st.text("abcdefXYZ0123456789+/=", min_size=1, max_size=60),
    minutes=st.lists(st.integers(0, 60 * 24 * 3), min_size=1, max_size=4),
)
def test_signs_exactly_as_botocore(
    endpoint: tuple[str, str],
    region: str,
    action: str,
    body: bytes,
    key: str,
    secrets: list[str],
    token: str | None,
    minutes: list[int],
) -> None:
    url, host = endpoint
    signer = RequestSigner(url, host, region)
    start = datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
    # One signer across secrets and days: its cached signing key must follow both.
    for secret in secrets:
        for minute in minutes:
            now = start + timedelta(minutes=minute)
            credentials = ReadOnlyCredentials(key, secret, token)
            ours = signer.sign(action=action, body=body, credentials=credentials, now=now)
            theirs = _botocore(url, host, region, action, body, credentials, now)
            assert ours == theirs
