"""``CredentialsAuth`` signs with botocore's SigV4Auth, as the independent verifier in
``tests/fakes/sigv4.py`` checks it, for any service and region; its flow refreshes
refused credentials once and re-signs the resend."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import httpx
import pytest
from botocore.credentials import ReadOnlyCredentials
from hypothesis import given, settings
from hypothesis import strategies as st

from app.aws.credentials import CredentialProvider, ResolvedCredentials
from app.aws.signing import CredentialsAuth, sign
from tests.fakes import IssuedKey, KeyRegistry, SignatureFailure, verify_request

ENDPOINTS = [
    "https://metering.marketplace.us-east-1.amazonaws.com/",
    "http://127.0.0.1:4566/",
    "https://vpce-0abc.metering.eu-west-1.vpce.amazonaws.com/prefix/x y/",
    "https://sqs.eu-west-1.amazonaws.com/",
]
# (signing name, content type, target): AWS Marketplace Metering's JSON 1.1, SQS's 1.0.
PROTOCOLS = [
    ("aws-marketplace", "application/x-amz-json-1.1", "AWSMPMeteringService.MeterUsage"),
    ("aws-marketplace", "application/x-amz-json-1.1", "AWSMPMeteringService.BatchMeterUsage"),
    ("sqs", "application/x-amz-json-1.0", "AmazonSQS.SendMessage"),
]
REGISTRY = KeyRegistry()
LONG_TERM = REGISTRY.issue("arn:aws:iam::123456789012:user/signer", None)
TEMPORARY = REGISTRY.issue("arn:aws:sts::123456789012:assumed-role/r/s", 3600)


def _frozen(key: IssuedKey) -> ReadOnlyCredentials:
    return ReadOnlyCredentials(key.access_key_id, key.secret_access_key, key.session_token)


def _request(url: str, content_type: str, target: str, body: bytes) -> httpx.Request:
    # Headers the client adds besides: none of them may be signed.
    return httpx.Request(
        "POST",
        url,
        content=body,
        headers={
            "X-Amz-Target": target,
            "Content-Type": content_type,
            "User-Agent": "metering-sidecar/test",
            "Accept-Encoding": "identity",
        },
    )


def _verify(request: httpx.Request, region: str, service: str) -> IssuedKey:
    path, _, query = request.url.raw_path.decode("ascii").partition("?")
    return verify_request(
        request.method,
        path,
        query,
        request.headers.multi_items(),
        request.content,
        REGISTRY,
        region,
        service,
    )


def _signed_headers(request: httpx.Request) -> str:
    return request.headers["Authorization"].split("SignedHeaders=")[1].split(",")[0]


@settings(max_examples=150, deadline=None)
@given(
    url=st.sampled_from(ENDPOINTS),
    region=st.sampled_from(["us-east-1", "eu-west-1", "ap-southeast-2"]),
    protocol=st.sampled_from(PROTOCOLS),
    body=st.binary(max_size=300),
    key=st.sampled_from([LONG_TERM, TEMPORARY]),
)
def test_signatures_pass_the_independent_verifier(
    url: str, region: str, protocol: tuple[str, str, str], body: bytes, key: IssuedKey
) -> None:
    service, content_type, target = protocol
    request = _request(url, content_type, target, body)
    sign(request, _frozen(key), service=service, region=region)
    assert _verify(request, region, service) == key
    expected = "content-type;host;x-amz-date;x-amz-target"
    if key.session_token:
        expected = "content-type;host;x-amz-date;x-amz-security-token;x-amz-target"
        assert request.headers["X-Amz-Security-Token"] == key.session_token
    assert _signed_headers(request) == expected
    assert request.headers["Authorization"].startswith(
        f"AWS4-HMAC-SHA256 Credential={key.access_key_id}/"
    )
    assert f"/{region}/{service}/aws4_request" in request.headers["Authorization"]


def test_a_signature_covers_the_body_target_and_scope() -> None:
    request = _request("https://sqs.eu-west-1.amazonaws.com/", *PROTOCOLS[2][1:], b'{"a":1}')
    sign(request, _frozen(LONG_TERM), service="sqs", region="eu-west-1")
    with pytest.raises(SignatureFailure, match="region"):
        _verify(request, "us-east-1", "sqs")
    with pytest.raises(SignatureFailure, match="service"):
        _verify(request, "eu-west-1", "aws-marketplace")
    tampered = httpx.Request(
        "POST", request.url, content=b'{"a":2}', headers=request.headers.multi_items()
    )
    with pytest.raises(SignatureFailure) as failure:
        _verify(tampered, "eu-west-1", "sqs")
    assert failure.value.code == "InvalidSignatureException"
    request.headers["X-Amz-Target"] = "AmazonSQS.DeleteQueue"
    with pytest.raises(SignatureFailure):
        _verify(request, "eu-west-1", "sqs")


def test_re_signing_replaces_every_signature_header() -> None:
    request = _request("http://127.0.0.1:4566/", *PROTOCOLS[0][1:], b"{}")
    sign(request, _frozen(TEMPORARY), service="aws-marketplace", region="us-east-1")
    assert "X-Amz-Security-Token" in request.headers
    sign(request, _frozen(LONG_TERM), service="aws-marketplace", region="us-east-1")
    # The long-term key has no token: the temporary key's must not travel on.
    assert "X-Amz-Security-Token" not in request.headers
    assert len(request.headers.get_list("Authorization")) == 1
    assert len(request.headers.get_list("X-Amz-Date")) == 1
    assert _verify(request, "us-east-1", "aws-marketplace") == LONG_TERM


class _Chain:
    """A credential chain that hands out the next key each time it is resolved."""

    def __init__(self, *keys: IssuedKey) -> None:
        self._keys: Iterator[IssuedKey] = iter(keys)
        self.resolved = 0

    def __call__(self) -> ResolvedCredentials:
        self.resolved += 1
        return ResolvedCredentials(_frozen(next(self._keys)), None, "test", datetime.now(UTC))


@pytest.fixture
async def chain() -> AsyncIterator[tuple[_Chain, CredentialProvider]]:
    """A provider whose first key is the temporary one, then the long-term one."""
    keys = _Chain(TEMPORARY, LONG_TERM)
    provider = CredentialProvider(keys, refresh_margin=900, retry_interval=5)
    await provider.start()
    yield keys, provider
    await provider.close()


def _answer(request: httpx.Request, status: int, code: str | None = None) -> httpx.Response:
    body = {"__type": code, "message": "no"} if code else {"MeteringRecordId": "r"}
    return httpx.Response(status, json=body, request=request)


async def test_a_refused_credential_is_refreshed_once_and_the_resend_re_signed(
    chain: tuple[_Chain, CredentialProvider],
) -> None:
    keys, provider = chain
    hooks: list[str] = []

    async def before_resend() -> bool:
        hooks.append("resend")
        return True

    auth = CredentialsAuth(
        provider,
        service="aws-marketplace",
        region="us-east-1",
        before_resend=before_resend,
        on_refused=hooks.append,
    )
    flow = auth.async_auth_flow(_request("http://127.0.0.1:4566/", *PROTOCOLS[0][1:], b"{}"))
    first = await flow.__anext__()
    assert _verify(first, "us-east-1", "aws-marketplace") == TEMPORARY
    resent = await flow.asend(_answer(first, 400, "ExpiredTokenException"))
    assert hooks == ["ExpiredTokenException", "resend"]
    assert keys.resolved == 2
    assert auth.refreshed
    assert "X-Amz-Security-Token" not in resent.headers
    assert _verify(resent, "us-east-1", "aws-marketplace") == LONG_TERM
    # Refused again: the flow ends, the caller sees the answer; no second refresh.
    with pytest.raises(StopAsyncIteration):
        await flow.asend(_answer(resent, 403, "UnrecognizedClientException"))
    assert keys.resolved == 2


async def test_no_resend_when_the_call_has_no_attempt_left(
    chain: tuple[_Chain, CredentialProvider],
) -> None:
    keys, provider = chain

    async def no_attempt_left() -> bool:
        return False

    auth = CredentialsAuth(
        provider, service="aws-marketplace", region="us-east-1", before_resend=no_attempt_left
    )
    flow = auth.async_auth_flow(_request("http://127.0.0.1:4566/", *PROTOCOLS[0][1:], b"{}"))
    first = await flow.__anext__()
    # The credentials are refreshed for the next call, but nothing is resent below the
    # retry policy: the refusal is the call's answer.
    with pytest.raises(StopAsyncIteration):
        await flow.asend(_answer(first, 400, "ExpiredTokenException"))
    assert keys.resolved == 2


@pytest.mark.parametrize(
    ("status", "code"), [(200, None), (400, "ThrottlingException"), (400, "ValidationException")]
)
async def test_other_answers_end_the_flow_without_a_refresh(
    chain: tuple[_Chain, CredentialProvider], status: int, code: str | None
) -> None:
    keys, provider = chain
    auth = CredentialsAuth(provider, service="aws-marketplace", region="us-east-1")
    flow = auth.async_auth_flow(_request("http://127.0.0.1:4566/", *PROTOCOLS[0][1:], b"{}"))
    first = await flow.__anext__()
    with pytest.raises(StopAsyncIteration):
        await flow.asend(_answer(first, status, code))
    assert keys.resolved == 1
    assert not auth.refreshed
