"""Tests proving the AWS fakes are strict: a wrong client must fail against them.

The fakes are checked against botocore's real signer and clients, which are an
independent implementation of the same protocol the fakes verify.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.session
import httpx
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import (
    CONTENT_TYPE,
    SIGNING_NAME,
    FakeContainerCredentials,
    FakeMetering,
    FakeSTS,
    IssuedKey,
    KeyRegistry,
    RunningServer,
    SignatureFailure,
    StsCall,
    isolate_aws_env,
    metering_client,
    serve,
    sign,
    signed_post,
    validate_input,
    validate_shape,
    verify_request,
)
from tests.fakes.metering_rules import month_close
from tests.fakes.model import service_model

# Business rules run on a fixed clock so hour-grain tests are deterministic;
# SigV4 skew still uses the wall clock botocore signs with.
FIXED_NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)
PRODUCT = "prod-abc123"
ACCOUNT = "123456789012"
LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
AWS_URL = "https://metering.marketplace.us-east-1.amazonaws.com/"
ROLE_ARN = "arn:aws:iam::123456789012:role/metering-sidecar"


def at(minutes: float = 0) -> datetime:
    """A timestamp relative to the fake's fixed clock."""
    return FIXED_NOW + timedelta(minutes=minutes)


def record(**fields: Any) -> dict[str, Any]:
    """A valid BatchMeterUsage record; ``fields`` override (``None`` removes a field)."""
    base: dict[str, Any] = {"Timestamp": at(), "CustomerAWSAccountId": ACCOUNT, "Dimension": "d"}
    if "Quantity" not in fields:
        base["QuantityAsDecimal"] = "1"
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def tag(key: str, value: str) -> dict[str, str]:
    """One usage-allocation tag."""
    return {"Key": key, "Value": value}


def aws_error(call: Callable[..., Any], /, **kwargs: Any) -> tuple[str, int, str]:
    """Call a botocore client method expecting ClientError; return (code, status, message)."""
    with pytest.raises(ClientError) as info:
        call(**kwargs)
    response = info.value.response
    error = response["Error"]
    return error["Code"], response["ResponseMetadata"]["HTTPStatusCode"], error["Message"]


def meter_body(**fields: Any) -> dict[str, Any]:
    """A valid raw MeterUsage JSON body for httpx-level tests."""
    base = {
        "ProductCode": PRODUCT,
        "Timestamp": FIXED_NOW.timestamp(),
        "UsageDimension": "d",
        "UsageQuantityAsDecimal": "1",
    }
    return base | fields


@pytest.fixture
def registry() -> KeyRegistry:
    """A fresh key registry."""
    return KeyRegistry()


@pytest.fixture
def key(registry: KeyRegistry) -> IssuedKey:
    """A temporary key, as the sidecar gets from a role."""
    return registry.issue("arn:aws:sts::123456789012:assumed-role/r/s", 3600)


@pytest.fixture
def fake(registry: KeyRegistry) -> FakeMetering:
    """The metering fake on the fixed clock, knowing one product."""
    return FakeMetering(registry, products={PRODUCT}, clock=lambda: FIXED_NOW)


@pytest.fixture
def server(fake: FakeMetering) -> Iterator[RunningServer]:
    """The metering fake served over real HTTP."""
    with serve(fake) as running:
        yield running


@pytest.fixture
def client(server: RunningServer, key: IssuedKey) -> Iterator[Any]:
    """botocore client without retries, so every answer is observable."""
    metering = metering_client(server.url, key)
    yield metering
    metering.close()


@pytest.fixture
def lax_client(server: RunningServer, key: IssuedKey) -> Iterator[Any]:
    """Client with botocore's parameter validation off, so the fake must catch errors."""
    metering = metering_client(server.url, key, validate=False)
    yield metering
    metering.close()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """Plain HTTP client for protocol- and fault-level tests."""
    with httpx.Client(timeout=10) as session:
        yield session


# --- SigV4 verifier against botocore's signer ----------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        AWS_URL,
        "https://example.com/a/b",
        "https://example.com/a%20b/c%2Fd/",
        "https://example.com:8443/p/./q/../r",
        "https://example.com/x?b=2&a=1&a=0&c=",
        "https://example.com/?k=v~-._%2F%20",
    ],
)
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_verifier_accepts_botocore_signatures(
    registry: KeyRegistry, key: IssuedKey, url: str, method: str
) -> None:
    body = b'{"ProductCode": "p"}' if method == "POST" else b""
    headers = sign(key, method, url, body, {"Content-Type": CONTENT_TYPE, "X-Odd": "  a   b "})
    parts = urlsplit(url)
    got = verify_request(
        method, parts.path, parts.query, headers, body, registry, "us-east-1", SIGNING_NAME
    )
    assert got == key


_SAFE_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=24)


@settings(max_examples=60, deadline=None, database=None)
@given(
    body=st.binary(max_size=256),
    params=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
    header_value=_SAFE_TEXT,
)
def test_verifier_agrees_with_botocore_on_arbitrary_requests(
    body: bytes, params: dict[str, str], header_value: str
) -> None:
    registry = KeyRegistry()
    key = registry.issue("p", None)
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in params.items())
    url = AWS_URL + (f"?{query}" if query else "")
    headers = sign(key, "POST", url, body, {"X-Value": header_value})
    parts = urlsplit(url)

    def verify(payload: bytes) -> IssuedKey:
        return verify_request(
            "POST", parts.path, parts.query, headers, payload, registry, "us-east-1", SIGNING_NAME
        )

    assert verify(body) == key
    with pytest.raises(SignatureFailure) as info:
        verify(body + b"x")
    assert info.value.code == "InvalidSignatureException"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("body", "InvalidSignatureException"),
        ("header", "InvalidSignatureException"),
        ("secret", "InvalidSignatureException"),
        ("region", "InvalidSignatureException"),
        ("service", "InvalidSignatureException"),
        ("skew", "InvalidSignatureException"),
        ("no_token", "UnrecognizedClientException"),
        ("wrong_token", "UnrecognizedClientException"),
        ("unsigned_token", "IncompleteSignatureException"),
        ("unknown_key", "UnrecognizedClientException"),
        ("revoked", "UnrecognizedClientException"),
        ("expired", "ExpiredTokenException"),
        ("no_auth", "MissingAuthenticationTokenException"),
        ("garbage_auth", "IncompleteSignatureException"),
        ("host_unsigned", "IncompleteSignatureException"),
    ],
)
def test_verifier_rejects_tampering(
    registry: KeyRegistry, key: IssuedKey, case: str, code: str
) -> None:
    body = b'{"ProductCode": "p"}'
    base = {"Content-Type": CONTENT_TYPE, "X-Amz-Target": "AWSMPMeteringService.MeterUsage"}
    options: dict[str, Any] = {
        "secret": {"secret": "not-the-secret"},
        "region": {"region": "us-west-2"},
        "service": {"service": "execute-api"},
        "wrong_token": {"token": "not-the-token"},
    }.get(case, {})
    signer = key
    if case == "unknown_key":
        signer = replace(key, access_key_id="ASIANOTISSUED0000000")
    elif case == "unsigned_token":
        signer = replace(key, session_token=None)
    headers = sign(signer, "POST", AWS_URL, body, base, **options)
    now = None
    if case == "body":
        body += b" "
    elif case == "header":
        headers["X-Amz-Target"] = "AWSMPMeteringService.BatchMeterUsage"
    elif case == "skew":
        now = datetime.now(UTC) - timedelta(minutes=6)  # request dated in the future
    elif case == "no_token":
        del headers["X-Amz-Security-Token"]
    elif case == "unsigned_token":
        headers["X-Amz-Security-Token"] = key.session_token or ""
    elif case == "revoked":
        registry.revoke(key.access_key_id)
    elif case == "expired":
        registry.expire(key.access_key_id)
    elif case == "no_auth":
        del headers["Authorization"]
    elif case == "garbage_auth":
        headers["Authorization"] = "AWS4-HMAC-SHA256 nonsense"
    elif case == "host_unsigned":
        headers["Authorization"] = headers["Authorization"].replace("host;", "")
    with pytest.raises(SignatureFailure) as info:
        verify_request("POST", "/", "", headers, body, registry, "us-east-1", SIGNING_NAME, now)
    assert info.value.code == code
    if case == "skew":
        assert info.value.message.startswith("Signature not yet current")


def test_verifier_reports_signature_expired(registry: KeyRegistry, key: IssuedKey) -> None:
    headers = sign(key, "POST", AWS_URL, b"{}", {})
    later = datetime.now(UTC) + timedelta(minutes=6)
    with pytest.raises(SignatureFailure) as info:
        verify_request("POST", "/", "", headers, b"{}", registry, "us-east-1", SIGNING_NAME, later)
    assert info.value.code == "InvalidSignatureException"
    assert info.value.message.startswith("Signature expired")


# --- Key registry -------------------------------------------------------------------------


def test_registry_issues_revokes_and_is_thread_safe(registry: KeyRegistry) -> None:
    long_term = registry.issue("user", None)
    temporary = registry.issue("role", 60)
    assert long_term.access_key_id.startswith("AKIA")
    assert long_term.session_token is None
    assert long_term.expiration is None
    assert temporary.access_key_id.startswith("ASIA")
    assert temporary.session_token
    assert temporary.expiration is not None
    assert not temporary.expired()
    registry.revoke(temporary.access_key_id)
    assert registry.lookup(temporary.access_key_id) == replace(temporary, revoked=True)
    threads = [
        threading.Thread(target=lambda: [registry.issue("t", 1) for _ in range(200)])
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({k.access_key_id for k in registry.issued()}) == 2 + 8 * 200
    registry.revoke_all()
    assert all(k.revoked for k in registry.issued())


# --- Service model validator ----------------------------------------------------------------


def test_model_validation_paths_patterns_and_types() -> None:
    bad_batch = {
        "ProductCode": "bad code!",
        "UsageRecords": [
            {
                "Timestamp": 1.5,
                "Dimension": "d",
                "Quantity": 2147483648,
                # "a=b" is legal: the TagKey pattern has the range " -=".
                "UsageAllocations": [{"Tags": [tag("a=b", "x~y")]}],
                "Unknown": "ignored",
            }
        ],
    }
    paths = {path for path, _ in validate_input("BatchMeterUsage", bad_batch)}
    assert paths == {
        "productCode",
        "usageRecords.1.member.quantity",
        "usageRecords.1.member.usageAllocations.1.member.tags.1.member.value",
    }
    missing = validate_input("MeterUsage", {})
    assert [p for p, _ in missing] == ["productCode", "timestamp", "usageDimension"]
    assert all(m.endswith("Member must not be null") for _, m in missing)
    typed = validate_input(
        "MeterUsage", {"ProductCode": 5, "Timestamp": "now", "UsageDimension": "d", "DryRun": 1}
    )
    assert {p for p, _ in typed} == {"productCode", "timestamp", "dryRun"}
    status = service_model().shape_for("UsageRecordResultStatus")
    (enum_violation,) = validate_shape(status, "Bogus", "status")
    assert "enum value set: [Success, CustomerNotSubscribed, DuplicateRecord]" in enum_violation[1]


# --- Metering through botocore's client -----------------------------------------------------


def test_botocore_client_succeeds_for_every_action(fake: FakeMetering, client: Any) -> None:
    fake.registration_tokens["reg"] = {
        "CustomerIdentifier": "cust-1",
        "CustomerAWSAccountId": ACCOUNT,
        "ProductCode": PRODUCT,
        "LicenseArn": LICENSE,
        "Metadata": {"AgreementId": "agmt-123"},
    }
    meter = client.meter_usage(
        ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d", UsageQuantityAsDecimal="2.5"
    )
    stored = fake.meter_usage_records[(PRODUCT, "d", FIXED_NOW.replace(minute=0))]
    assert stored.metering_record_id == meter["MeteringRecordId"]
    batch = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=[record()])
    assert batch["Results"][0]["Status"] == "Success"
    assert batch["UnprocessedRecords"] == []
    resolved = client.resolve_customer(RegistrationToken="reg")
    assert resolved["Metadata"] == {"AgreementId": "agmt-123"}
    registered = client.register_usage(ProductCode=PRODUCT, PublicKeyVersion=1, Nonce="n-1")
    payload_b64 = registered["Signature"].split(".")[1]
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=" * (-len(payload_b64) % 4)))
    assert payload["productCode"] == PRODUCT
    assert payload["nonce"] == "n-1"
    assert isinstance(registered["PublicKeyRotationTimestamp"], datetime)
    assert [r.action for r in fake.requests] == [
        "MeterUsage",
        "BatchMeterUsage",
        "ResolveCustomer",
        "RegisterUsage",
    ]
    assert all(r.signature_valid and r.status == 200 for r in fake.requests)


def test_long_term_key_is_accepted(registry: KeyRegistry, server: RunningServer) -> None:
    metering = metering_client(server.url, registry.issue("user", None))
    try:
        code, status, _ = aws_error(metering.resolve_customer, RegistrationToken="nope")
    finally:
        metering.close()
    assert (code, status) == ("InvalidTokenException", 400)


@pytest.mark.parametrize(
    ("spoil", "code"),
    [
        ("secret", "InvalidSignatureException"),
        ("revoke", "UnrecognizedClientException"),
        ("expire", "ExpiredTokenException"),
    ],
)
def test_bad_credentials_are_rejected_with_403(
    registry: KeyRegistry,
    key: IssuedKey,
    server: RunningServer,
    fake: FakeMetering,
    spoil: str,
    code: str,
) -> None:
    if spoil == "revoke":
        registry.revoke(key.access_key_id)
    elif spoil == "expire":
        registry.expire(key.access_key_id)
    secret = "x" * 40 if spoil == "secret" else None
    metering = metering_client(server.url, key, secret=secret)
    try:
        got = aws_error(metering.resolve_customer, RegistrationToken="t")
    finally:
        metering.close()
    assert got[:2] == (code, 403)
    assert fake.requests[0].signature_valid is False


def test_meter_usage_is_idempotent_per_hour_by_value(fake: FakeMetering, client: Any) -> None:
    def meter(minutes: float, **quantity: Any) -> str:
        response = client.meter_usage(
            ProductCode=PRODUCT, Timestamp=at(minutes), UsageDimension="d", **quantity
        )
        return str(response["MeteringRecordId"])

    first = meter(-29, UsageQuantity=17)
    assert meter(-1, UsageQuantityAsDecimal="17.0") == first
    assert meter(-15, UsageQuantityAsDecimal="17.00") == first
    code, status, _ = aws_error(
        client.meter_usage,
        ProductCode=PRODUCT,
        Timestamp=at(-2),
        UsageDimension="d",
        UsageQuantityAsDecimal="18",
    )
    assert (code, status) == ("DuplicateRequestException", 400)
    assert meter(-45, UsageQuantity=18) != first  # previous hour: a new grain
    assert len(fake.meter_usage_records) == 2


def test_meter_usage_client_token_conflicts(fake: FakeMetering, client: Any) -> None:
    params = {"ProductCode": PRODUCT, "Timestamp": at(), "UsageDimension": "d"}
    first = client.meter_usage(ClientToken="tok-1", UsageQuantity=3, **params)
    again = client.meter_usage(ClientToken="tok-1", UsageQuantity=3, **params)
    assert again["MeteringRecordId"] == first["MeteringRecordId"]
    # Checked before the hour grain: a different quantity is a token conflict here.
    code, _, _ = aws_error(client.meter_usage, ClientToken="tok-1", UsageQuantity=4, **params)
    assert code == "IdempotencyConflictException"
    params["UsageDimension"] = "other"
    code, _, _ = aws_error(client.meter_usage, ClientToken="tok-1", UsageQuantity=3, **params)
    assert code == "IdempotencyConflictException"


def test_meter_usage_dry_run_records_nothing(fake: FakeMetering, client: Any) -> None:
    got = aws_error(
        client.meter_usage, ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d", DryRun=True
    )
    assert got == ("DryRunOperation", 412, "Request would have succeeded, but DryRun flag is set.")
    assert fake.meter_usage_records == {}
    assert fake.client_tokens == {}


@pytest.mark.parametrize(
    ("minutes", "ok"), [(-359, True), (4, True), (-361, False), (6, False), (-60 * 24, False)]
)
def test_meter_usage_timestamp_window(client: Any, minutes: float, ok: bool) -> None:
    params = {"ProductCode": PRODUCT, "Timestamp": at(minutes), "UsageDimension": "d"}
    if ok:
        assert client.meter_usage(**params)["MeteringRecordId"]
    else:
        assert aws_error(client.meter_usage, **params)[0] == "TimestampOutOfBoundsException"


@pytest.mark.parametrize(
    ("quantity", "code", "text"),
    [
        ({"UsageQuantity": 1, "UsageQuantityAsDecimal": "1"}, "ValidationException", "both"),
        ({"UsageQuantity": 2147483648}, "ValidationException", "less than or equal to 2147483647"),
        ({"UsageQuantityAsDecimal": "10000000000"}, "ValidationException", "regular expression"),
        ({"UsageQuantityAsDecimal": "1.1234567"}, "ValidationException", "usageQuantityAsDecimal"),
        ({"UsageQuantityAsDecimal": "01"}, "ValidationException", "regular expression"),
        ({"UsageQuantity": -1}, "ValidationException", "greater than or equal to 0"),
        ({"UsageDimension": ""}, "ValidationException", "usageDimension"),
        ({"ProductCode": "other-product"}, "InvalidProductCodeException", ""),
    ],
)
def test_meter_usage_rejects_invalid_input(
    fake: FakeMetering, lax_client: Any, quantity: dict[str, Any], code: str, text: str
) -> None:
    params = {"ProductCode": PRODUCT, "Timestamp": at(), "UsageDimension": "d"} | quantity
    got_code, status, message = aws_error(lax_client.meter_usage, **params)
    assert (got_code, status) == (code, 400)
    assert text in message
    assert fake.meter_usage_records == {}


ALLOC_CASES: list[tuple[dict[str, Any], list[dict[str, Any]], str]] = [
    (
        {"UsageQuantityAsDecimal": "10"},
        [
            {"AllocatedUsageQuantityAsDecimal": "4", "Tags": [tag("t", "a")]},
            {"AllocatedUsageQuantityAsDecimal": "5"},
        ],
        "InvalidUsageAllocationsException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantityAsDecimal": "4"}],
        "InvalidUsageAllocationsException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 4, "AllocatedUsageQuantityAsDecimal": "4"}],
        "InvalidUsageAllocationsException",
    ),
    ({"UsageQuantity": 4}, [{"Tags": [tag("t", "a")]}], "InvalidUsageAllocationsException"),
    (
        {"UsageQuantity": 4},
        [
            {"AllocatedUsageQuantity": 2, "Tags": [tag("t", "a"), tag("u", "b")]},
            {"AllocatedUsageQuantity": 2, "Tags": [tag("u", "b"), tag("t", "a")]},
        ],
        "InvalidUsageAllocationsException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 2}, {"AllocatedUsageQuantity": 2}],
        "InvalidUsageAllocationsException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 4, "Tags": [tag("t", "a"), tag("t", "b")]}],
        "InvalidUsageAllocationsException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 4, "Tags": [tag("team~", "a")]}],
        "InvalidTagException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 4, "Tags": [tag("t", "v" * 257)]}],
        "InvalidTagException",
    ),
    (
        {"UsageQuantity": 4},
        [{"AllocatedUsageQuantity": 4, "Tags": [tag(f"k{i}", "v") for i in range(6)]}],
        "InvalidTagException",
    ),
]


@pytest.mark.parametrize(("quantity", "allocations", "code"), ALLOC_CASES)
def test_usage_allocation_rules(
    fake: FakeMetering,
    lax_client: Any,
    quantity: dict[str, Any],
    allocations: list[dict[str, Any]],
    code: str,
) -> None:
    params = {"ProductCode": PRODUCT, "Timestamp": at(), "UsageDimension": "d"} | quantity
    assert aws_error(lax_client.meter_usage, UsageAllocations=allocations, **params)[0] == code
    assert fake.meter_usage_records == {}


def test_usage_allocations_compared_by_value(fake: FakeMetering, client: Any) -> None:
    def meter(allocations: list[dict[str, Any]]) -> Any:
        return client.meter_usage(
            ProductCode=PRODUCT,
            Timestamp=at(),
            UsageDimension="d",
            UsageQuantityAsDecimal="10",
            UsageAllocations=allocations,
        )

    tagged: dict[str, Any] = {
        "AllocatedUsageQuantityAsDecimal": "6.000",
        "Tags": [tag("team", "a")],
    }
    untagged: dict[str, Any] = {"AllocatedUsageQuantityAsDecimal": "4"}
    first = meter([tagged, untagged])["MeteringRecordId"]
    reordered = [untagged, tagged | {"AllocatedUsageQuantityAsDecimal": "6"}]
    assert meter(reordered)["MeteringRecordId"] == first
    code, _, _ = aws_error(
        client.meter_usage,
        ProductCode=PRODUCT,
        Timestamp=at(),
        UsageDimension="d",
        UsageQuantityAsDecimal="10",
        UsageAllocations=[
            tagged | {"AllocatedUsageQuantityAsDecimal": "5"},
            {"AllocatedUsageQuantityAsDecimal": "5"},
        ],
    )
    assert code == "DuplicateRequestException"


def test_decimal_quantities_use_the_models_full_range(fake: FakeMetering, client: Any) -> None:
    # The *AsDecimal pattern allows ten integer digits; only the integer forms stop at 2^31-1.
    batch = client.batch_meter_usage(
        ProductCode=PRODUCT, UsageRecords=[record(QuantityAsDecimal="3000000000.5")]
    )
    assert batch["Results"][0]["Status"] == "Success"
    (stored_batch,) = fake.batch_records.values()
    assert stored_batch.quantity == Decimal("3000000000.5")
    assert str(stored_batch.quantity) == "3000000000.5"
    client.meter_usage(
        ProductCode=PRODUCT,
        Timestamp=at(),
        UsageDimension="d",
        UsageQuantityAsDecimal="9999999999.999999",
    )
    stored = fake.meter_usage_records[(PRODUCT, "d", FIXED_NOW.replace(minute=0))]
    assert str(stored.quantity) == "9999999999.999999"
    client.meter_usage(
        ProductCode=PRODUCT,
        Timestamp=at(),
        UsageDimension="e",
        UsageQuantityAsDecimal="9999999999.999999",
        UsageAllocations=[
            {"AllocatedUsageQuantityAsDecimal": "5000000000.5", "Tags": [tag("team", "a")]},
            {"AllocatedUsageQuantityAsDecimal": "4999999999.499999"},
        ],
    )
    allocated = fake.meter_usage_records[(PRODUCT, "e", FIXED_NOW.replace(minute=0))]
    assert allocated.allocations == frozenset(
        {
            (frozenset({("team", "a")}), Decimal("5000000000.5")),
            (frozenset(), Decimal("4999999999.499999")),
        }
    )
    split = record(
        Dimension="e",
        QuantityAsDecimal="3000000000.5",
        UsageAllocations=[
            {"AllocatedUsageQuantityAsDecimal": "2999999999", "Tags": [tag("team", "a")]},
            {"AllocatedUsageQuantityAsDecimal": "1.5"},
        ],
    )
    result = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=[split])
    assert result["Results"][0]["Status"] == "Success"
    assert fake.batch_records[(PRODUCT, ACCOUNT, "e", FIXED_NOW.replace(minute=0))].quantity == (
        Decimal("3000000000.5")
    )


# --- BatchMeterUsage ----------------------------------------------------------------------


def test_batch_duplicate_record_and_idempotency(fake: FakeMetering, client: Any) -> None:
    first = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=[record(Quantity=5)])
    (result,) = first["Results"]
    assert result["Status"] == "Success"
    same = client.batch_meter_usage(
        ProductCode=PRODUCT, UsageRecords=[record(QuantityAsDecimal="5.0", Timestamp=at(-20))]
    )
    assert same["Results"][0]["MeteringRecordId"] == result["MeteringRecordId"]
    different = client.batch_meter_usage(
        ProductCode=PRODUCT, UsageRecords=[record(QuantityAsDecimal="6")]
    )
    assert different["Results"][0]["Status"] == "DuplicateRecord"
    assert "MeteringRecordId" not in different["Results"][0]
    assert different["Results"][0]["UsageRecord"]["QuantityAsDecimal"] == "6"
    assert len(fake.batch_records) == 1


def test_batch_customer_not_subscribed(fake: FakeMetering, client: Any) -> None:
    fake.unsubscribed_customers.add("999999999999")
    response = client.batch_meter_usage(
        ProductCode=PRODUCT,
        UsageRecords=[record(), record(CustomerAWSAccountId="999999999999")],
    )
    assert [r["Status"] for r in response["Results"]] == ["Success", "CustomerNotSubscribed"]
    assert "MeteringRecordId" not in response["Results"][1]
    assert len(fake.batch_records) == 1


def test_batch_rejects_more_than_25_records(fake: FakeMetering, client: Any) -> None:
    records = [record(CustomerAWSAccountId=str(100000000000 + i)) for i in range(26)]
    code, status, message = aws_error(
        client.batch_meter_usage, ProductCode=PRODUCT, UsageRecords=records
    )
    assert (code, status) == ("ValidationException", 400)
    assert "at 'usageRecords' failed to satisfy constraint" in message
    assert "less than or equal to 25" in message
    assert fake.batch_records == {}


@pytest.mark.parametrize(
    ("product", "bad", "code"),
    [
        (PRODUCT, record(CustomerIdentifier="c-1"), "ValidationException"),
        (PRODUCT, record(CustomerAWSAccountId=None), "InvalidCustomerIdentifierException"),
        (PRODUCT, record(Timestamp=at(-60 * 25)), "TimestampOutOfBoundsException"),
        (
            PRODUCT,
            record(UsageAllocations=[{"AllocatedUsageQuantityAsDecimal": "2"}]),
            "InvalidUsageAllocationsException",
        ),
        (PRODUCT, record(LicenseArn=LICENSE), "ValidationException"),
        (None, record(), "ValidationException"),
        ("other-product", record(), "InvalidProductCodeException"),
    ],
)
def test_batch_fails_whole_call_on_any_bad_record(
    fake: FakeMetering, lax_client: Any, product: str | None, bad: dict[str, Any], code: str
) -> None:
    params: dict[str, Any] = {"UsageRecords": [record(CustomerAWSAccountId="111111111111"), bad]}
    if product is not None:
        params["ProductCode"] = product
    assert aws_error(lax_client.batch_meter_usage, **params)[0] == code
    assert fake.batch_records == {}


def test_batch_license_arn_rules(fake: FakeMetering, client: Any) -> None:
    other = LICENSE.replace("l-0", "l-1")
    ok = client.batch_meter_usage(UsageRecords=[record(LicenseArn=LICENSE)])
    assert ok["Results"][0]["Status"] == "Success"
    assert (LICENSE, ACCOUNT, "d", FIXED_NOW.replace(minute=0)) in fake.batch_records
    two_products = [record(LicenseArn=LICENSE), record(LicenseArn=other)]
    code, _, _ = aws_error(client.batch_meter_usage, UsageRecords=two_products)
    assert code == "ValidationException"
    mixed = [record(LicenseArn=LICENSE), record()]
    assert aws_error(client.batch_meter_usage, UsageRecords=mixed)[0] == "ValidationException"
    fake.license_products.update({LICENSE: PRODUCT, other: PRODUCT})
    both = client.batch_meter_usage(UsageRecords=[record(LicenseArn=other, Dimension="e")])
    assert both["Results"][0]["Status"] == "Success"
    fake.invalid_licenses.add(other)
    code, _, _ = aws_error(client.batch_meter_usage, UsageRecords=[record(LicenseArn=other)])
    assert code == "InvalidLicenseException"


def test_batch_request_must_be_under_1mb(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    tags = [tag(f"{i}" + "k" * 99, "v" * 256) for i in range(5)]
    allocations = [{"AllocatedUsageQuantity": 0, "Tags": tags} for _ in range(600)]
    big = record(Timestamp=FIXED_NOW.timestamp(), Quantity=0, UsageAllocations=allocations)
    response = signed_post(
        http, server.url, key, "BatchMeterUsage", {"ProductCode": PRODUCT, "UsageRecords": [big]}
    )
    assert len(fake.requests[0].body) >= 1_000_000
    assert response.status_code == 400
    assert response.json()["__type"] == "ValidationException"
    assert "1MB" in response.json()["message"]


@pytest.mark.parametrize(
    ("minutes", "ok"), [(-60 * 7, True), (-60 * 24 + 1, True), (-60 * 25, False)]
)
def test_batch_window_is_24_hours(
    fake: FakeMetering, client: Any, minutes: float, ok: bool
) -> None:
    records = [record(Timestamp=at(minutes))]
    if ok:
        response = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=records)
        assert response["Results"][0]["Status"] == "Success"
        assert len(fake.batch_records) == 1
    else:
        code, status, _ = aws_error(
            client.batch_meter_usage, ProductCode=PRODUCT, UsageRecords=records
        )
        assert (code, status) == ("TimestampOutOfBoundsException", 400)
        assert fake.batch_records == {}
    # MeterUsage keeps its 6-hour window.
    code, _, _ = aws_error(
        client.meter_usage, ProductCode=PRODUCT, Timestamp=at(-60 * 7), UsageDimension="d"
    )
    assert code == "TimestampOutOfBoundsException"


def test_batch_records_refused_after_their_month_closes(
    registry: KeyRegistry, key: IssuedKey
) -> None:
    now = datetime(2026, 11, 1, 5, 59, tzinfo=UTC)
    fake = FakeMetering(registry, products={PRODUCT}, clock=lambda: now)
    october = record(Timestamp=datetime(2026, 10, 31, 23, 30, tzinfo=UTC))
    november = record(Timestamp=datetime(2026, 11, 1, 0, 30, tzinfo=UTC), Dimension="e")
    with serve(fake) as running:
        metering = metering_client(running.url, key)
        try:
            before = metering.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=[october])
            assert before["Results"][0]["Status"] == "Success"
            now = datetime(2026, 11, 1, 6, 0, tzinfo=UTC)
            # 6.5 hours old, well inside 24 hours, but October has closed.
            code, status, _ = aws_error(
                metering.batch_meter_usage, ProductCode=PRODUCT, UsageRecords=[october]
            )
            assert (code, status) == ("TimestampOutOfBoundsException", 400)
            mixed = [november, october | {"CustomerAWSAccountId": "111111111111"}]
            code, _, _ = aws_error(
                metering.batch_meter_usage, ProductCode=PRODUCT, UsageRecords=mixed
            )
            assert code == "TimestampOutOfBoundsException"
            after = metering.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=[november])
            assert after["Results"][0]["Status"] == "Success"
        finally:
            metering.close()
    assert len(fake.batch_records) == 2


@pytest.mark.parametrize(
    ("when", "closes"),
    [
        (datetime(2026, 10, 31, 23, 30, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC)),
        (datetime(2026, 12, 1, 0, 0, tzinfo=UTC), datetime(2027, 1, 1, 6, tzinfo=UTC)),
        (datetime(2028, 2, 29, 12, 0, tzinfo=UTC), datetime(2028, 3, 1, 6, tzinfo=UTC)),
    ],
)
def test_month_close_is_six_am_utc_on_the_first(when: datetime, closes: datetime) -> None:
    assert month_close(when) == closes


def test_resolve_customer_and_register_usage_errors(fake: FakeMetering, client: Any) -> None:
    fake.expired_tokens.add("old")
    assert aws_error(client.resolve_customer, RegistrationToken="old")[:2] == (
        "ExpiredTokenException",
        400,
    )
    assert aws_error(client.resolve_customer, RegistrationToken="?")[0] == "InvalidTokenException"
    register = client.register_usage
    assert aws_error(register, ProductCode=PRODUCT, PublicKeyVersion=2)[0] == (
        "InvalidPublicKeyVersionException"
    )
    assert aws_error(register, ProductCode="nope", PublicKeyVersion=1)[0] == (
        "InvalidProductCodeException"
    )
    fake.unentitled = True
    assert aws_error(register, ProductCode=PRODUCT, PublicKeyVersion=1)[0] == (
        "CustomerNotEntitledException"
    )


# --- Protocol details over raw HTTP ---------------------------------------------------------


def test_error_responses_look_like_aws(
    server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    response = signed_post(http, server.url, key, "NoSuchAction", {})
    assert response.status_code == 400
    assert response.headers["content-type"] == CONTENT_TYPE
    assert response.headers["x-amzn-errortype"] == "UnknownOperationException"
    assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["x-amzn-requestid"])
    assert response.json()["__type"] == "UnknownOperationException"
    wrong_type = signed_post(
        http, server.url, key, "MeterUsage", meter_body(), headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.json()["__type"] == "UnknownOperationException"
    garbage = signed_post(http, server.url, key, "MeterUsage", b"{not json")
    assert garbage.json()["__type"] == "SerializationException"
    invalid = signed_post(
        http,
        server.url,
        key,
        "BatchMeterUsage",
        {"ProductCode": PRODUCT, "UsageRecords": [record(Timestamp=1.0, Quantity=-1)]},
    )
    assert invalid.json()["message"] == (
        "1 validation error detected: Value '-1' at 'usageRecords.1.member.quantity' failed "
        "to satisfy constraint: Member must have value greater than or equal to 0"
    )
    ok = signed_post(http, server.url, key, "MeterUsage", meter_body())
    assert ok.status_code == 200
    assert ok.headers["x-amzn-requestid"]
    unsigned = http.post(server.url + "/", content=b"{}", headers={"X-Amz-Target": "x"})
    assert unsigned.json()["__type"] == "MissingAuthenticationTokenException"


# --- Fault injection ------------------------------------------------------------------------


def test_throttle_faults_are_consumed_in_order_and_record_nothing(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    fake.faults.throttle(2)
    fake.faults.server_error(1)
    answers = [signed_post(http, server.url, key, "MeterUsage", meter_body()) for _ in range(4)]
    assert [(r.status_code, r.json().get("__type")) for r in answers] == [
        (400, "ThrottlingException"),
        (400, "ThrottlingException"),
        (500, "InternalServiceErrorException"),
        (200, None),
    ]
    assert answers[0].json()["message"] == "Rate exceeded"
    assert [r.fault for r in fake.requests] == ["throttle", "throttle", "server_error", None]
    assert all(r.signature_valid for r in fake.requests)
    assert len(fake.meter_usage_records) == 1


def test_fault_action_filter(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    fake.faults.throttle(1, action="BatchMeterUsage")
    assert signed_post(http, server.url, key, "MeterUsage", meter_body()).status_code == 200
    batch = {"ProductCode": PRODUCT, "UsageRecords": [record(Timestamp=FIXED_NOW.timestamp())]}
    throttled = signed_post(http, server.url, key, "BatchMeterUsage", batch)
    assert throttled.json()["__type"] == "ThrottlingException"
    assert signed_post(http, server.url, key, "BatchMeterUsage", batch).status_code == 200


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "InternalServiceErrorException"), (503, "ServiceUnavailableException")],
)
def test_server_error_fault(fake: FakeMetering, client: Any, status: int, code: str) -> None:
    fake.faults.server_error(1, status=status)
    got = aws_error(client.meter_usage, ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d")
    assert got[:2] == (code, status)
    assert fake.meter_usage_records == {}


def test_delay_fault_answers_normally_after_sleeping(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    fake.faults.delay(0.4, 1)
    started = time.monotonic()
    response = signed_post(http, server.url, key, "MeterUsage", meter_body())
    assert time.monotonic() - started >= 0.4
    assert response.status_code == 200
    assert fake.requests[0].fault == "delay"
    assert len(fake.meter_usage_records) == 1


def test_drop_connection_fault_breaks_the_transport(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client, client: Any
) -> None:
    fake.faults.drop_connection(2)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        signed_post(http, server.url, key, "MeterUsage", meter_body())
    # botocore reads bodies without enforcing Content-Length; it must still notice.
    with pytest.raises(ConnectionClosedError):
        client.meter_usage(ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d")
    assert fake.meter_usage_records == {}
    assert signed_post(http, server.url, key, "MeterUsage", meter_body()).status_code == 200
    assert [r.fault for r in fake.requests] == ["drop_connection", "drop_connection", None]


@pytest.mark.parametrize("code", ["ExpiredTokenException", "UnrecognizedClientException"])
def test_auth_failure_fault_despite_valid_signature(
    fake: FakeMetering, client: Any, code: str
) -> None:
    fake.faults.auth_failure(1, code=code)
    assert aws_error(client.resolve_customer, RegistrationToken="t")[:2] == (code, 403)
    assert fake.requests[0].signature_valid
    assert fake.requests[0].fault == "auth_failure"
    assert aws_error(client.resolve_customer, RegistrationToken="t")[0] == "InvalidTokenException"


AUTH_MESSAGES = {
    "ExpiredTokenException": "The security token included in the request is expired",
    "UnrecognizedClientException": "The security token included in the request is invalid.",
    "InvalidSignatureException": "The request signature we calculated does not match",
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "IncompleteSignature": "Authorization header requires 'Credential' parameter.",
    "AccessDeniedException": "User is not authorized to perform this action.",
}


@pytest.mark.parametrize("status", [400, 403])
@pytest.mark.parametrize("code", sorted(AUTH_MESSAGES))
def test_auth_failure_fault_with_either_status(
    fake: FakeMetering, client: Any, code: str, status: int
) -> None:
    fake.faults.auth_failure(1, code=code, action="MeterUsage", status=status)
    got_code, got_status, message = aws_error(
        client.meter_usage, ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d"
    )
    assert (got_code, got_status) == (code, status)
    assert message.startswith(AUTH_MESSAGES[code])
    assert (fake.requests[0].status, fake.requests[0].error_code) == (status, code)
    assert fake.meter_usage_records == {}


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ThrottlingException", 429),
        ("TooManyRequestsException", 429),
        ("RequestLimitExceeded", 400),
        ("Throttling", 400),
    ],
)
def test_throttle_fault_with_any_code_and_status(
    fake: FakeMetering, client: Any, code: str, status: int
) -> None:
    fake.faults.throttle(1, action="MeterUsage", code=code, status=status)
    params = {"ProductCode": PRODUCT, "Timestamp": at(), "UsageDimension": "d"}
    assert aws_error(client.meter_usage, **params) == (code, status, "Rate exceeded")
    assert fake.requests[0].fault == "throttle"
    assert fake.meter_usage_records == {}
    assert client.meter_usage(**params)["MeteringRecordId"]


def test_fault_statuses_are_checked(fake: FakeMetering) -> None:
    with pytest.raises(ValueError, match="status"):
        fake.faults.auth_failure(1, status=401)
    with pytest.raises(ValueError, match="status"):
        fake.faults.throttle(1, status=503)
    assert fake.faults.pending() == []


def test_unprocessed_fault_spans_calls(fake: FakeMetering, client: Any) -> None:
    fake.faults.unprocessed(2)
    records = [record(CustomerAWSAccountId=str(100000000000 + i)) for i in range(3)]
    first = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=records)
    unprocessed = first["UnprocessedRecords"]
    assert [r["CustomerAWSAccountId"] for r in unprocessed] == ["100000000000", "100000000001"]
    assert [r["Status"] for r in first["Results"]] == ["Success"]
    assert len(fake.batch_records) == 1
    retry = client.batch_meter_usage(ProductCode=PRODUCT, UsageRecords=unprocessed)
    assert [r["Status"] for r in retry["Results"]] == ["Success", "Success"]
    assert len(fake.batch_records) == 3


def test_clear_and_reset(fake: FakeMetering, client: Any) -> None:
    fake.faults.throttle(5)
    fake.faults.unprocessed(5)
    fake.faults.clear()
    assert fake.faults.pending() == []
    client.meter_usage(ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d")
    fake.faults.throttle(1)
    fake.registration_tokens["t"] = {}
    fake.reset()
    assert fake.requests == []
    assert fake.meter_usage_records == {}
    assert fake.registration_tokens == {}
    assert fake.faults.pending() == []


# --- Request quotas -------------------------------------------------------------------------


def test_quota_is_a_token_bucket(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    fake.set_quota("MeterUsage", rate=5, burst=5)
    answers = [signed_post(http, server.url, key, "MeterUsage", meter_body()) for _ in range(12)]
    statuses = [r.status_code for r in answers]
    # The bucket starts full; refill during the burst may add one more success.
    assert statuses[:5] == [200] * 5
    throttled = [r for r in answers if r.status_code != 200]
    assert len(throttled) >= 6
    assert all(
        r.status_code == 400
        and r.json() == {"__type": "ThrottlingException", "message": "Rate exceeded"}
        for r in throttled
    )
    assert fake.throttled_by_quota("MeterUsage") == len(throttled)
    assert fake.throttled_by_quota() == len(throttled)
    assert fake.throttled_by_quota("BatchMeterUsage") == 0
    refused = [r for r in fake.requests if r.fault == "quota"]
    assert len(refused) == len(throttled)
    assert all(
        (r.status, r.error_code, r.signature_valid) == (400, "ThrottlingException", True)
        for r in refused
    )
    # Other actions have no quota.
    batch = {"ProductCode": PRODUCT, "UsageRecords": [record(Timestamp=FIXED_NOW.timestamp())]}
    assert signed_post(http, server.url, key, "BatchMeterUsage", batch).status_code == 200
    time.sleep(0.5)
    again = [signed_post(http, server.url, key, "MeterUsage", meter_body()) for _ in range(2)]
    assert [r.status_code for r in again] == [200, 200]


def test_quota_sits_between_signature_check_and_faults(
    fake: FakeMetering, server: RunningServer, key: IssuedKey, http: httpx.Client
) -> None:
    fake.set_quota("MeterUsage", rate=0, burst=1)  # one request, ever
    fake.faults.server_error(1, action="MeterUsage")

    def post(**kwargs: Any) -> tuple[int, str | None]:
        response = signed_post(http, server.url, key, "MeterUsage", meter_body(), **kwargs)
        return response.status_code, response.json().get("__type")

    # A bad signature is refused first and spends no token.
    assert post(secret="x" * 40) == (403, "InvalidSignatureException")
    assert post() == (500, "InternalServiceErrorException")
    fake.faults.server_error(1, action="MeterUsage")
    assert post() == (400, "ThrottlingException")
    # The quota answered before the fault could be consumed.
    assert len(fake.faults.pending()) == 1
    assert [r.fault for r in fake.requests] == [None, "server_error", "quota"]
    assert fake.meter_usage_records == {}
    fake.clear_quotas()
    assert post() == (500, "InternalServiceErrorException")
    assert post() == (200, None)
    assert fake.throttled_by_quota("MeterUsage") == 1
    fake.set_quota("MeterUsage", rate=0, burst=1)
    fake.reset()
    assert fake.throttled_by_quota() == 0
    assert [post(), post()] == [(200, None), (200, None)]


def test_quota_is_exact_under_concurrent_requests(
    fake: FakeMetering, server: RunningServer, key: IssuedKey
) -> None:
    fake.set_quota("RegisterUsage", rate=0, burst=10)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(timeout=10) as session:
            for _ in range(8):
                body = {"ProductCode": PRODUCT, "PublicKeyVersion": 1}
                response = signed_post(session, server.url, key, "RegisterUsage", body)
                with lock:
                    statuses.append(response.status_code)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 10 + [400] * 22
    assert fake.throttled_by_quota("RegisterUsage") == 22
    assert len(fake.registrations) == 10


def test_quota_arguments_are_checked(fake: FakeMetering) -> None:
    with pytest.raises(ValueError, match="unknown action"):
        fake.set_quota("MeterUsag", rate=10)
    with pytest.raises(ValueError, match="rate"):
        fake.set_quota("MeterUsage", rate=-1, burst=5)
    with pytest.raises(ValueError, match="burst"):
        fake.set_quota("MeterUsage", rate=0.5)


# --- Server ---------------------------------------------------------------------------------


def test_server_restarts_on_the_same_port(registry: KeyRegistry, key: IssuedKey) -> None:
    fake = FakeMetering(registry, clock=lambda: FIXED_NOW)
    with serve(fake) as first, httpx.Client() as http:
        assert signed_post(http, first.url, key, "MeterUsage", meter_body()).status_code == 200
    with httpx.Client() as http, pytest.raises(httpx.ConnectError):
        http.get(first.url)
    with serve(fake, port=first.port) as second, httpx.Client() as http:
        assert second.url == first.url
        response = signed_post(http, second.url, key, "MeterUsage", meter_body())
        assert response.status_code == 200
    assert len(fake.meter_usage_records) == 1


# --- Credential fakes with real botocore sessions -------------------------------------------


def test_container_credentials_feed_a_botocore_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: KeyRegistry
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    creds = FakeContainerCredentials(registry, token="auth-token")
    metering = FakeMetering(registry, clock=lambda: FIXED_NOW)
    with serve(creds) as creds_server, serve(metering) as metering_server:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", creds_server.url + "/creds")
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "auth-token")
        session = botocore.session.Session()
        frozen = session.get_credentials().get_frozen_credentials()
        (issued,) = creds.issued_keys
        assert (frozen.access_key, frozen.token) == (issued.access_key_id, issued.session_token)
        assert creds.authorizations == ["auth-token"]
        client = session.create_client(
            "meteringmarketplace", endpoint_url=metering_server.url, region_name="us-east-1"
        )
        try:
            client.meter_usage(ProductCode=PRODUCT, Timestamp=at(), UsageDimension="d")
        finally:
            client.close()
        assert metering.requests[0].access_key_id == issued.access_key_id
        assert metering.requests[0].signature_valid


def test_container_credentials_endpoint_rules(registry: KeyRegistry, http: httpx.Client) -> None:
    creds = FakeContainerCredentials(registry, token="auth-token", lifetime=120)
    with serve(creds) as running:
        url = running.url + "/creds"
        assert http.get(url).status_code == 401
        assert http.get(url, headers={"Authorization": "wrong"}).status_code == 401
        creds.fail_next(1)
        assert http.get(url, headers={"Authorization": "auth-token"}).status_code == 500
        body = http.get(url, headers={"Authorization": "auth-token"}).json()
    assert creds.fetch_count == 4
    assert set(body) >= {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["Expiration"])
    expires = datetime.strptime(body["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((expires - datetime.now(UTC)).total_seconds() - 120) < 5
    assert registry.lookup(body["AccessKeyId"]) is not None


def test_sts_web_identity_feeds_a_botocore_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, registry: KeyRegistry
) -> None:
    isolate_aws_env(monkeypatch, tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("jwt-1")
    sts = FakeSTS(registry, accepted_tokens={"jwt-1"})
    with serve(sts) as running:
        monkeypatch.setenv("AWS_ROLE_ARN", ROLE_ARN)
        monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "sidecar-session")
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", running.url)
        frozen = botocore.session.Session().get_credentials().get_frozen_credentials()
    issued = registry.lookup(frozen.access_key)
    assert issued is not None
    assert issued.principal == ROLE_ARN
    assert (frozen.secret_key, frozen.token) == (issued.secret_access_key, issued.session_token)
    assert sts.calls == [StsCall(ROLE_ARN, "sidecar-session", "jwt-1", True)]


def test_sts_responses_match_the_wire_format(registry: KeyRegistry, http: httpx.Client) -> None:
    sts = FakeSTS(registry, accepted_tokens={"good"})
    form = {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": "2011-06-15",
        "RoleArn": ROLE_ARN,
        "RoleSessionName": "s1",
    }
    ns = {"sts": "https://sts.amazonaws.com/doc/2011-06-15/"}
    with serve(sts) as running:
        bad = http.post(running.url + "/", data=form | {"WebIdentityToken": "bad"})
        good = http.post(running.url + "/", data=form | {"WebIdentityToken": "good"})
    assert bad.status_code == 400
    # Trusted input: the XML comes from the fake under test.
    error = ET.fromstring(bad.text)  # noqa: S314
    assert error.findtext("sts:Error/sts:Code", namespaces=ns) == "InvalidIdentityToken"
    root = ET.fromstring(good.text)  # noqa: S314
    assert (
        root.tag == "{https://sts.amazonaws.com/doc/2011-06-15/}AssumeRoleWithWebIdentityResponse"
    )
    result = "sts:AssumeRoleWithWebIdentityResult/"
    for path in [
        "sts:Credentials/sts:AccessKeyId",
        "sts:Credentials/sts:SecretAccessKey",
        "sts:Credentials/sts:SessionToken",
        "sts:Credentials/sts:Expiration",
        "sts:SubjectFromWebIdentityToken",
        "sts:AssumedRoleUser/sts:Arn",
        "sts:AssumedRoleUser/sts:AssumedRoleId",
        "sts:Provider",
        "sts:Audience",
    ]:
        assert root.findtext(result + path, namespaces=ns), path
    assert root.findtext(result + "sts:AssumedRoleUser/sts:Arn", namespaces=ns) == (
        "arn:aws:sts::123456789012:assumed-role/metering-sidecar/s1"
    )
    assert root.findtext("sts:ResponseMetadata/sts:RequestId", namespaces=ns)
