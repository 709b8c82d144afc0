"""``POST /`` on the wire, byte by byte: AWS's JSON 1.1 protocol as raw HTTP against a real
sidecar process, forwarding to the signature-verifying fake (or answering in sandbox mode)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.conftest import PRODUCT, FakeAws
from tests.fakes import IssuedKey, RecordedRequest
from tests.sidecar import Sidecar
from tests.wire.conftest import AUTH_TOKEN, WIRE_MAX_ATTEMPTS

CONTENT_TYPE = "application/x-amz-json-1.1"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
# What an SDK pointed at the sidecar signs with; none of it may reach AWS.
PLACEHOLDER_KEY = "AKIDCALLERPLACEHOLDER"
PLACEHOLDER_SECRET = "caller-placeholder-secret"


def _sdk_headers(
    url: str,
    body: bytes,
    action: str | None,
    *,
    access_key_id: str = PLACEHOLDER_KEY,
    session_token: str | None = None,
) -> dict[str, str]:
    """The headers an AWS SDK sends: X-Amz-Target, JSON 1.1, and a SigV4 signature."""
    headers = {"Content-Type": CONTENT_TYPE}
    if action is not None:
        headers["X-Amz-Target"] = f"AWSMPMeteringService.{action}"
    request = AWSRequest(method="POST", url=url + "/", data=body, headers=headers)
    credentials = Credentials(access_key_id, PLACEHOLDER_SECRET, session_token)
    SigV4Auth(credentials, "aws-marketplace", "us-east-1").add_auth(request)
    return {name: str(value) for name, value in request.headers.items()}


def _call(
    sidecar: Sidecar,
    action: str | None,
    payload: dict[str, Any],
    *,
    access_key_id: str = PLACEHOLDER_KEY,
    extra_headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``payload`` to ``/`` as an SDK would."""
    body = json.dumps(payload).encode()
    headers = _sdk_headers(sidecar.url, body, action, access_key_id=access_key_id)
    return sidecar.client.post("/", content=body, headers={**headers, **(extra_headers or {})})


def _assert_aws_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is AWS's error shape: status, ``__type``, ``x-amzn-ErrorType``, request id."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(CONTENT_TYPE)
    assert response.headers["x-amzn-errortype"] == code
    assert response.headers["x-amzn-requestid"]
    body: dict[str, Any] = response.json()
    assert set(body) == {"__type", "message"}, body
    assert body["__type"] == code
    assert body["message"]
    return body


def _epoch_now() -> int:
    return int(time.time())


def _meter(dimension: str | None = None, quantity: int = 2) -> dict[str, Any]:
    """A MeterUsage body as SDKs send it: every required member, Timestamp in epoch seconds."""
    return {
        "ProductCode": PRODUCT,
        "Timestamp": _epoch_now(),
        "UsageDimension": dimension or f"dim-{uuid.uuid4().hex[:10]}",
        "UsageQuantity": quantity,
    }


def _headers_of(request: RecordedRequest) -> dict[str, str]:
    return {name.lower(): value for name, value in request.headers}


def upstream_request_ids(fake: FakeAws) -> list[str]:
    """Every ``x-amzn-RequestId`` the fake answered with, in order."""
    return [r.request_id for r in fake.metering.requests if r.request_id is not None]


# --- dispatch and local validation -------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "AWSMPMeteringService.DeleteEverything",
        "AWSMPMeteringService.",
        "OtherService.MeterUsage",
        "MeterUsage",
        None,
    ],
)
def test_unknown_or_missing_target_is_unknown_operation(
    wire_sidecar: Sidecar, fake_aws: FakeAws, target: str | None
) -> None:
    body = json.dumps(_meter()).encode()
    headers = _sdk_headers(wire_sidecar.url, body, None)
    if target is not None:
        headers["X-Amz-Target"] = target
    response = wire_sidecar.client.post("/", content=body, headers=headers)
    error = _assert_aws_error(response, 400, "UnknownOperationException")
    if target is None:
        assert "X-Amz-Target" in error["message"]
    else:
        assert target in error["message"]
    assert fake_aws.metering.requests == []


@pytest.mark.parametrize(
    ("action", "payload", "field"),
    [
        ("MeterUsage", {**_meter(), "UsageQuantity": -1}, "UsageQuantity"),
        ("MeterUsage", {"ProductCode": PRODUCT, "Timestamp": 1}, "UsageDimension"),
        (
            "MeterUsage",
            {
                **_meter(quantity=5),
                "UsageAllocations": [
                    {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "a"}]},
                    {"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "b"}]},
                ],
            },
            "UsageAllocations",
        ),
        ("MeterUsage", {**_meter(), "Timestamp": _epoch_now() - 7 * 3600}, "Timestamp"),
        (
            "BatchMeterUsage",
            {
                "UsageRecords": [
                    {
                        "Timestamp": _epoch_now(),
                        "CustomerAWSAccountId": "123456789012",
                        "LicenseArn": "not-an-arn",
                        "Dimension": "d",
                        "Quantity": 1,
                    }
                ]
            },
            "UsageRecords[0].LicenseArn",
        ),
        ("ResolveCustomer", {"RegistrationToken": ""}, "RegistrationToken"),
        ("RegisterUsage", {"ProductCode": PRODUCT, "PublicKeyVersion": 0}, "PublicKeyVersion"),
        # Edge inputs: each used to be a 500 (InternalFailure) or to name no field.
        ("MeterUsage", {**_meter(), "Timestamp": "9999-12-31T23:59:59-23:59"}, "Timestamp"),
        ("MeterUsage", {**_meter(), "Timestamp": 10**400}, "Timestamp"),
        (
            "BatchMeterUsage",
            {
                "UsageRecords": [
                    {
                        "Timestamp": "0001-01-01T00:00:00+23:59",
                        "CustomerAWSAccountId": "123456789012",
                        "LicenseArn": LICENSE,
                        "Dimension": "d",
                        "Quantity": 1,
                    }
                ]
            },
            "UsageRecords[0].Timestamp",
        ),
        ("MeterUsage", {**_meter(), "UsageDimension": "a\ud800"}, "UsageDimension"),
        ("ResolveCustomer", {"RegistrationToken": "\udfff"}, "RegistrationToken"),
        ("RegisterUsage", {"ProductCode": PRODUCT, "PublicKeyVersion": 1e308}, "PublicKeyVersion"),
    ],
    ids=[
        "negative",
        "missing",
        "allocations",
        "too-old",
        "license-arn",
        "empty",
        "version",
        "calendar-end",
        "epoch-too-big",
        "batch-calendar-start",
        "lone-surrogate",
        "token-lone-surrogate",
        "version-1e308",
    ],
)
def test_validation_failure_is_validation_exception_naming_the_field(
    wire_sidecar: Sidecar, fake_aws: FakeAws, action: str, payload: dict[str, Any], field: str
) -> None:
    response = _call(wire_sidecar, action, payload)
    error = _assert_aws_error(response, 400, "ValidationException")
    assert field in error["message"], error
    # Refused locally: AWS never sees a call it would refuse.
    assert fake_aws.metering.requests == []


def test_malformed_json_is_validation_exception(wire_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    body = b'{"UsageDimension": '
    headers = _sdk_headers(wire_sidecar.url, body, "MeterUsage")
    response = wire_sidecar.client.post("/", content=body, headers=headers)
    _assert_aws_error(response, 400, "ValidationException")
    assert fake_aws.metering.requests == []


# --- what reaches AWS -----------------------------------------------------------------------

_CALLER_DATE = "20000101T000000Z"
_CALLER_SESSION_TOKEN = "caller-session-token-must-not-travel"
_HOP_BY_HOP = {
    "Keep-Alive": "timeout=99, max=999",
    "TE": "trailers",
    "Upgrade": "h2c",
    "Proxy-Authorization": "Basic Y2FsbGVyOnByb3h5LXNlY3JldA==",
}


def _chunked(body: bytes) -> Iterator[bytes]:
    # A generator body makes httpx send Transfer-Encoding: chunked.
    yield body[:10]
    yield body[10:]


def test_caller_credentials_and_hop_by_hop_headers_never_reach_aws(
    wire_sidecar: Sidecar, fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    body = json.dumps(_meter()).encode()
    headers = _sdk_headers(
        wire_sidecar.url, body, "MeterUsage", session_token=_CALLER_SESSION_TOKEN
    )
    headers["X-Amz-Date"] = _CALLER_DATE
    headers["Connection"] = "keep-alive"
    headers.update(_HOP_BY_HOP)
    response = wire_sidecar.client.post("/", content=_chunked(body), headers=headers)
    assert response.status_code == 200, response.text

    # A real upgrade request (Connection: Upgrade): uvicorn either refuses it
    # (400, depending on how the bytes arrive) or serves it as plain HTTP/1.1;
    # either way the sidecar does not switch protocols and sends no Upgrade on.
    register = json.dumps({"ProductCode": PRODUCT, "PublicKeyVersion": 1}).encode()
    upgrade = {
        **_sdk_headers(wire_sidecar.url, register, "RegisterUsage"),
        "Connection": "Upgrade",
        "Upgrade": "h2c",
    }
    with httpx.Client(base_url=wire_sidecar.url, timeout=30.0) as fresh:
        upgraded = fresh.post("/", content=register, headers=upgrade)
    assert upgraded.status_code in (200, 400), upgraded.text

    # uvicorn may start the request before it refuses the upgrade: then the call
    # reaches AWS though the caller saw 400 (RegisterUsage is idempotent). Served,
    # it must reach AWS. (A moment for a refused one still under way to land.)
    time.sleep(0.3)
    fake_aws.metering.quiet()
    forwarded = fake_aws.metering.requests
    actions = [r.action for r in forwarded]
    assert actions[0] == "MeterUsage"
    assert actions[1:] in ([], ["RegisterUsage"])
    if upgraded.status_code == 200:
        assert actions == ["MeterUsage", "RegisterUsage"]
    for request in forwarded:
        # Only the sidecar's real key, signed afresh, reaches AWS.
        assert request.signature_valid, request
        assert request.access_key_id == static_key.access_key_id
        sent = _headers_of(request)
        assert PLACEHOLDER_KEY not in sent["authorization"]
        assert sent["x-amz-date"] != _CALLER_DATE
        assert "x-amz-security-token" not in sent
        for name in ("keep-alive", "te", "upgrade", "proxy-authorization", "transfer-encoding"):
            assert name not in sent, (name, sent)
        assert "upgrade" not in sent.get("connection", "").lower()
        everything = json.dumps(request.headers)
        for secret in (PLACEHOLDER_KEY, _CALLER_SESSION_TOKEN, "Y2FsbGVyOnByb3h5LXNlY3JldA"):
            assert secret not in everything
    # The chunked body arrived whole, and was sent on with a length.
    assert int(_headers_of(forwarded[0])["content-length"]) == len(forwarded[0].body)
    assert forwarded[0].json()["UsageDimension"] == json.loads(body)["UsageDimension"]


# --- AWS's answers, passed on as AWS gave them ---------------------------------------------


def test_success_carries_the_upstream_request_id(wire_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    response = _call(wire_sidecar, "MeterUsage", _meter())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(CONTENT_TYPE)
    assert set(response.json()) == {"MeteringRecordId"}
    assert response.headers["x-amzn-requestid"] == upstream_request_ids(fake_aws)[-1]


def test_invalid_registration_token_comes_back_as_aws_sent_it(
    wire_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    response = _call(wire_sidecar, "ResolveCustomer", {"RegistrationToken": "no-such-token"})
    error = _assert_aws_error(response, 400, "InvalidTokenException")
    assert error["message"] == "Registration token is invalid."
    assert response.headers["x-amzn-requestid"] == upstream_request_ids(fake_aws)[-1]
    # A client error is final: one attempt.
    assert len(fake_aws.metering.requests) == 1


def test_duplicate_request_comes_back_as_aws_sent_it(
    wire_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    dimension = f"dim-{uuid.uuid4().hex[:10]}"
    first = _call(wire_sidecar, "MeterUsage", _meter(dimension, 1))
    assert first.status_code == 200, first.text
    again = _call(wire_sidecar, "MeterUsage", _meter(dimension, 2))
    _assert_aws_error(again, 400, "DuplicateRequestException")
    assert again.headers["x-amzn-requestid"] == upstream_request_ids(fake_aws)[-1]
    assert len(fake_aws.metering.requests) == 2


def test_not_entitled_comes_back_as_aws_sent_it(wire_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    fake_aws.metering.unentitled = True
    response = _call(wire_sidecar, "RegisterUsage", {"ProductCode": PRODUCT, "PublicKeyVersion": 1})
    (request,) = fake_aws.metering.requests
    _assert_aws_error(response, request.status, "CustomerNotEntitledException")
    assert response.headers["x-amzn-requestid"] == upstream_request_ids(fake_aws)[-1]


def test_throttled_once_is_retried_and_answers_200(
    own_wire_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.throttle(1, action="MeterUsage")
    response = _call(own_wire_sidecar, "MeterUsage", _meter())
    assert response.status_code == 200, response.text
    assert response.json()["MeteringRecordId"]
    attempts = fake_aws.metering.requests
    assert [r.error_code for r in attempts] == ["ThrottlingException", None]
    # The retry resent the very same body (same ClientToken), freshly signed.
    assert len({r.body for r in attempts}) == 1
    assert all(r.signature_valid for r in attempts)


def test_throttled_throughout_is_throttling_after_wire_max_attempts(
    own_wire_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    fake_aws.metering.faults.throttle(100)
    started = time.monotonic()
    response = _call(own_wire_sidecar, "MeterUsage", _meter())
    elapsed = time.monotonic() - started
    # AWS's own answer (400, not the REST API's 429), so the SDK's retry logic applies.
    _assert_aws_error(response, 400, "ThrottlingException")
    assert len(fake_aws.metering.requests) == WIRE_MAX_ATTEMPTS
    assert response.headers["x-amzn-requestid"] == upstream_request_ids(fake_aws)[-1]
    assert elapsed < 5


def test_dry_run_is_412_dry_run_operation_like_aws(
    wire_sidecar: Sidecar, sandbox: Sidecar, fake_aws: FakeAws
) -> None:
    forwarded = _call(wire_sidecar, "MeterUsage", {**_meter(), "DryRun": True})
    _assert_aws_error(forwarded, 412, "DryRunOperation")
    assert fake_aws.metering.requests[0].json()["DryRun"] is True
    assert fake_aws.metering.meter_usage_records == {}

    local = _call(sandbox, "MeterUsage", {**_meter(), "DryRun": True})
    _assert_aws_error(local, 412, "DryRunOperation")


# --- timestamps -------------------------------------------------------------------------------


def test_timestamps_are_epoch_seconds(wire_sidecar: Sidecar, fake_aws: FakeAws) -> None:
    sent_at = _epoch_now()
    batch = _call(
        wire_sidecar,
        "BatchMeterUsage",
        {
            "UsageRecords": [
                {
                    "Timestamp": sent_at,
                    "CustomerAWSAccountId": "123456789012",
                    "LicenseArn": LICENSE,
                    "Dimension": f"dim-{uuid.uuid4().hex[:10]}",
                    "QuantityAsDecimal": "1.5",
                }
            ]
        },
    )
    assert batch.status_code == 200, batch.text
    (result,) = batch.json()["Results"]
    assert result["Status"] == "Success"
    echoed = result["UsageRecord"]["Timestamp"]
    assert isinstance(echoed, int | float)
    assert not isinstance(echoed, bool)
    assert echoed == sent_at
    assert fake_aws.metering.requests[0].json()["UsageRecords"][0]["Timestamp"] == sent_at

    registered = _call(
        wire_sidecar, "RegisterUsage", {"ProductCode": PRODUCT, "PublicKeyVersion": 1}
    )
    assert registered.status_code == 200, registered.text
    rotation = registered.json()["PublicKeyRotationTimestamp"]
    assert isinstance(rotation, int | float)
    assert not isinstance(rotation, bool)
    assert datetime.fromtimestamp(rotation, UTC) > datetime.now(UTC)


# --- the sidecar's own auth token -----------------------------------------------------------


def test_auth_token_as_sdk_access_key_id_is_accepted(
    token_sidecar: Sidecar, fake_aws: FakeAws, static_key: IssuedKey
) -> None:
    response = _call(token_sidecar, "MeterUsage", _meter(), access_key_id=AUTH_TOKEN)
    assert response.status_code == 200, response.text
    (request,) = fake_aws.metering.requests
    assert request.signature_valid
    assert request.access_key_id == static_key.access_key_id
    assert AUTH_TOKEN not in json.dumps(request.headers)


def test_auth_token_as_bearer_is_accepted_on_the_wire_route(
    token_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    response = token_sidecar.client.post(
        "/",
        content=json.dumps({"RegistrationToken": "no-such-token"}).encode(),
        headers={
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": "AWSMPMeteringService.ResolveCustomer",
            "Authorization": f"Bearer {AUTH_TOKEN}",
        },
    )
    _assert_aws_error(response, 400, "InvalidTokenException")
    assert len(fake_aws.metering.requests) == 1


@pytest.mark.parametrize("access_key_id", ["AKIDWRONGTOKEN", AUTH_TOKEN + "x", None])
def test_wrong_or_missing_token_is_unrecognized_client(
    token_sidecar: Sidecar, fake_aws: FakeAws, access_key_id: str | None
) -> None:
    if access_key_id is None:
        response = token_sidecar.client.post(
            "/",
            content=json.dumps(_meter()).encode(),
            headers={
                "Content-Type": CONTENT_TYPE,
                "X-Amz-Target": "AWSMPMeteringService.MeterUsage",
            },
        )
    else:
        response = _call(token_sidecar, "MeterUsage", _meter(), access_key_id=access_key_id)
    _assert_aws_error(response, 403, "UnrecognizedClientException")
    assert fake_aws.metering.requests == []
