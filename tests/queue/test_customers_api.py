"""The customer registry over HTTP, in real sidecar processes: POST /v1/events, the
customers' views, the final hour sent when a leaving customer's grace ends, usage
refused after it, the two forms of one customer, and ResolveCustomer on both routes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from app.actions.sandbox import SandboxBackend
from app.actions.service import MeteringService
from app.config import Settings
from app.metering.shapes import ResolveCustomerRequest, ResolveCustomerResult
from app.runtime.metrics import Metrics
from app.runtime.retry import RetryPolicy
from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.queue.test_queue_api import QUEUE_FAST, wait_until
from tests.sidecar import Sidecar, run_sidecar

# A leaving customer's usage is taken this long after its first ending event.
GRACE = 1.5
WIRE = {"Content-Type": "application/x-amz-json-1.1"}


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def inside_an_hour() -> None:
    """Wait, if need be, until the current hour has 40 s left at least: a test's open
    hour must not close (and be sent as any closed hour is) while it runs."""
    now = datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second + now.microsecond / 1e6)
    if left < 40:
        time.sleep(left + 1)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def account() -> str:
    return str(uuid.uuid4().int)[:12].rjust(12, "1")


def license_of(account_id: str) -> str:
    return f"arn:aws:license-manager::{account_id}:license:l-{uuid.uuid4().hex[:16]}"


def ident(customer: str, quantity: int, **fields: Any) -> dict[str, Any]:
    """A record of this hour under the CustomerIdentifier form (the configured product)."""
    return {"CustomerIdentifier": customer, "Dimension": "gb", "Quantity": quantity, **fields}


def concurrent(account_id: str, license_arn: str, quantity: int, **fields: Any) -> dict[str, Any]:
    """A record of this hour under the Concurrent Agreements form."""
    return {
        "CustomerAWSAccountId": account_id,
        "LicenseArn": license_arn,
        "Dimension": "gb",
        "Quantity": quantity,
        **fields,
    }


def sns_envelope(action: str, customer: str, message_id: str | None = None) -> str:
    """An SNS notification in its envelope, as the SQS queue delivers it."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": "arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-x",
            "Message": json.dumps(
                {"action": action, "customer-identifier": customer, "product-code": PRODUCT}
            ),
            "Timestamp": _now(),
        }
    )


def eventbridge(detail_type: str, account_id: str, license_arn: str) -> str:
    """An EventBridge event of aws.agreement-marketplace."""
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": detail_type,
            "source": "aws.agreement-marketplace",
            "account": "999988887777",
            "time": _now(),
            "region": "us-east-1",
            "resources": [],
            "detail": {
                "agreement": {"id": "agmt-0123456789abcdef"},
                "product": {"code": PRODUCT},
                "license": {"arn": license_arn},
                "acceptor": {"accountId": account_id},
            },
        }
    )


def post_event(sidecar: Sidecar, body: str) -> dict[str, Any]:
    response = sidecar.client.post(
        "/v1/events", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def queue(sidecar: Sidecar, *records: dict[str, Any], **options: Any) -> httpx.Response:
    return sidecar.client.post("/v1/usage-records", json={"UsageRecords": list(records), **options})


def sent(fake: FakeAws, *customers: str) -> list[dict[str, Any]]:
    """Records of ``customers`` that the fake took in a BatchMeterUsage call."""
    return [
        record
        for request in fake.metering.requests_for("BatchMeterUsage")
        if request.status == 200
        for record in request.json()["UsageRecords"]
        if (record.get("CustomerIdentifier") or record.get("CustomerAWSAccountId")) in customers
    ]


def metric(sidecar: Sidecar, line_start: str) -> float:
    for line in sidecar.client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def customer_view(sidecar: Sidecar, customer: str) -> dict[str, Any]:
    page = sidecar.client.get("/v1/customers", params={"customer": customer})
    assert page.status_code == 200, page.text
    (item,) = page.json()["Items"]
    view = sidecar.client.get(f"/v1/customers/{item['Id']}")
    assert view.status_code == 200, view.text
    body: dict[str, Any] = view.json()
    assert "null" not in view.text
    return body


@pytest.fixture(scope="module")
def registry_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """An aws-mode sidecar whose leaving customers' usage is taken for 1.5 s."""
    env = aws_mode_env(
        fake_aws_session.url,
        static_key,
        **FAST_RETRIES,
        **QUEUE_FAST,
        METERING_CUSTOMER_END_GRACE=str(GRACE),
    )
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


def test_sns_unsubscribe_pending_sends_the_partial_hour_within_seconds_of_the_grace(
    registry_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    inside_an_hour()
    leaving, staying = unique("cust"), unique("cust")
    accepted = queue(registry_sidecar, ident(leaving, 2), ident(leaving, 3), ident(staying, 7))
    assert accepted.status_code == 202, accepted.text
    # Before the event is stamped: its grace ends GRACE after this at the earliest.
    started = time.monotonic()
    envelope = sns_envelope("unsubscribe-pending", leaving)
    applied = post_event(registry_sidecar, envelope)
    assert applied["Outcome"] == "applied"
    assert applied["Customer"]["Status"] == "ending"
    assert applied["Customer"]["CustomerIdentifier"] == leaving
    # Still taken within the grace; nothing sent early.
    assert queue(registry_sidecar, ident(leaving, 1)).status_code == 202
    assert sent(fake_aws, leaving, staying) == []

    wait_until(lambda: bool(sent(fake_aws, leaving)), timeout=GRACE + 8, message="final hour")
    took = time.monotonic() - started
    assert took >= GRACE - 0.3, took
    # Within a poll interval of the grace, give or take a busy machine.
    assert took < GRACE + 5, took
    (record,) = sent(fake_aws, leaving, staying)
    assert (record["CustomerIdentifier"], record["Quantity"]) == (leaving, 6)
    assert record["Timestamp"] >= int(time.time()) - 60

    refused = queue(registry_sidecar, ident(leaving, 1))
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert refused.headers["content-type"] == "application/problem+json"
    assert (problem["code"], problem["retryable"]) == ("CustomerSubscriptionEnded", False)
    assert f"CustomerIdentifier {leaving} + ProductCode {PRODUCT}" in problem["detail"]
    assert "usage refused since " in problem["detail"]
    partial = queue(registry_sidecar, ident(leaving, 1), ident(staying, 1), AcceptPartial=True)
    assert partial.status_code == 202, partial.text
    assert [r["Index"] for r in partial.json()["Accepted"]] == [1]
    assert partial.json()["Rejected"][0]["Reason"] == "CustomerSubscriptionEnded"

    duplicate = post_event(registry_sidecar, envelope)
    assert duplicate["Outcome"] == "duplicate"
    view = customer_view(registry_sidecar, leaving)
    assert (view["Status"], view["UsageAccepted"]) == ("ending", False)
    assert "FinalUsageSentAt" in view
    assert [(e["Type"], e["Kind"]) for e in view["Events"]] == [("unsubscribe-pending", "ending")]
    listed = registry_sidecar.client.get("/v1/customers", params={"status": "ending"}).json()
    assert view["Id"] in [item["Id"] for item in listed["Items"]]
    # The other customer's open hour waits for its end.
    time.sleep(0.5)
    assert sent(fake_aws, staying) == []
    assert (
        metric(
            registry_sidecar, 'metering_usage_refusals_total{reason="CustomerSubscriptionEnded"}'
        )
        >= 2
    )
    assert (
        metric(
            registry_sidecar,
            'metering_events_total{outcome="duplicate",type="unsubscribe-pending"}',
        )
        >= 1
    )


def test_eventbridge_ending_events_send_the_partial_hour_once_the_grace_ends(
    registry_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    inside_an_hour()
    leaving, staying = account(), account()
    license_arn, other_license = license_of(leaving), license_of(staying)
    assert (
        queue(
            registry_sidecar,
            concurrent(leaving, license_arn, 4),
            concurrent(leaving, license_arn, 5),
            concurrent(staying, other_license, 1),
        ).status_code
        == 202
    )
    started = time.monotonic()
    ended = post_event(
        registry_sidecar,
        eventbridge("Purchase Agreement Ended - Manufacturer", leaving, license_arn),
    )
    assert ended["Outcome"] == "applied"
    grace_ends = ended["Customer"]["GraceEndsAt"]
    deprovisioned = post_event(
        registry_sidecar,
        eventbridge("License Deprovisioned - Manufacturer", leaving, license_arn),
    )
    # Whichever ending event came first opened the final hour.
    assert deprovisioned["Customer"]["GraceEndsAt"] == grace_ends
    wait_until(lambda: bool(sent(fake_aws, leaving)), timeout=GRACE + 8, message="final hour")
    assert GRACE - 0.3 <= time.monotonic() - started < GRACE + 5
    (record,) = sent(fake_aws, leaving, staying)
    assert (record["LicenseArn"], record["Quantity"]) == (license_arn, 9)
    refused = queue(registry_sidecar, concurrent(leaving, license_arn, 1))
    assert refused.status_code == 409
    assert refused.json()["code"] == "CustomerSubscriptionEnded"
    assert f"CustomerAWSAccountId {leaving} + LicenseArn {license_arn}" in refused.json()["detail"]
    # Sent straight to AWS, it is refused the same way, before anything goes out.
    calls = len(fake_aws.metering.requests_for("BatchMeterUsage"))
    direct = registry_sidecar.client.post(
        "/v1/batch-meter-usage",
        json={"UsageRecords": [{**concurrent(leaving, license_arn, 1), "Timestamp": _now()}]},
    )
    assert direct.status_code == 409, direct.text
    assert direct.json()["code"] == "CustomerSubscriptionEnded"
    assert len(fake_aws.metering.requests_for("BatchMeterUsage")) == calls
    assert sent(fake_aws, staying) == []


def test_subscribe_success_within_the_grace_restores_the_customer(
    registry_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    inside_an_hour()
    customer = unique("cust")
    assert queue(registry_sidecar, ident(customer, 2)).status_code == 202
    post_event(registry_sidecar, sns_envelope("unsubscribe-pending", customer))
    back = post_event(registry_sidecar, sns_envelope("subscribe-success", customer))
    assert back["Customer"]["Status"] == "active"
    assert "GraceEndsAt" not in back["Customer"]
    time.sleep(GRACE + 1.5)
    # Nothing was sent early, and usage is taken.
    assert sent(fake_aws, customer) == []
    assert queue(registry_sidecar, ident(customer, 1)).status_code == 202
    grains = registry_sidecar.client.get("/v1/usage-grains", params={"customer": customer})
    (grain,) = grains.json()["Items"]
    assert (grain["Status"], grain["Quantity"]) == ("open", "3")


def test_unsubscribe_success_ends_the_customer(
    registry_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    inside_an_hour()
    customer = unique("cust")
    assert queue(registry_sidecar, ident(customer, 8)).status_code == 202
    ended = post_event(registry_sidecar, sns_envelope("unsubscribe-success", customer))
    assert ended["Customer"]["Status"] == "ended"
    assert ended["Customer"]["UsageAccepted"] is False
    refused = queue(registry_sidecar, ident(customer, 1))
    assert refused.status_code == 409
    assert refused.json()["code"] == "CustomerSubscriptionEnded"
    wait_until(lambda: bool(sent(fake_aws, customer)), timeout=5, message="open usage sent")
    assert [r["Quantity"] for r in sent(fake_aws, customer)] == [8]
    assert customer_view(registry_sidecar, customer)["Status"] == "ended"


def test_resolvecustomer_ties_the_forms_on_the_rest_and_the_wire_routes(
    registry_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    inside_an_hour()
    identifier, account_id = unique("cust"), account()
    license_arn = license_of(account_id)
    fake_aws.metering.registration_tokens["token-rest"] = {
        "CustomerIdentifier": identifier,
        "CustomerAWSAccountId": account_id,
        "ProductCode": PRODUCT,
        "LicenseArn": license_arn,
        "Metadata": {"AgreementId": "agmt-0123456789abcdef"},
    }
    resolved = registry_sidecar.client.post(
        "/v1/resolve-customer", json={"RegistrationToken": "token-rest"}
    )
    assert resolved.status_code == 200, resolved.text
    view = customer_view(registry_sidecar, account_id)
    assert (view["CustomerIdentifier"], view["LicenseArn"]) == (identifier, license_arn)
    assert view["AgreementId"] == "agmt-0123456789abcdef"
    assert [e["Type"] for e in view["Events"]] == ["ResolveCustomer"]

    assert queue(registry_sidecar, ident(identifier, 2)).status_code == 202
    refused = queue(registry_sidecar, concurrent(account_id, license_arn, 1))
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["code"] == "CustomerFormConflict"
    assert f"CustomerIdentifier {identifier}" in problem["detail"]
    assert f"CustomerAWSAccountId {account_id} + LicenseArn {license_arn}" in problem["detail"]
    # BatchMeterUsage sent straight to AWS: against the grain queued under the
    # identifier, and against an earlier record of the same call.
    calls = len(fake_aws.metering.requests_for("BatchMeterUsage"))
    direct = registry_sidecar.client.post(
        "/v1/batch-meter-usage",
        json={"UsageRecords": [{**concurrent(account_id, license_arn, 1), "Timestamp": _now()}]},
    )
    assert direct.status_code == 409, direct.text
    assert direct.json()["code"] == "CustomerFormConflict"
    fresh = {"Timestamp": _now(), "Dimension": "fresh", "LicenseArn": license_arn, "Quantity": 1}
    in_call = registry_sidecar.client.post(
        "/v1/batch-meter-usage",
        json={
            "UsageRecords": [
                {**fresh, "CustomerAWSAccountId": account_id},
                {**fresh, "CustomerIdentifier": identifier},
            ]
        },
    )
    assert in_call.status_code == 409, in_call.text
    assert in_call.json()["detail"].startswith("UsageRecords[1]: ")
    assert len(fake_aws.metering.requests_for("BatchMeterUsage")) == calls
    assert (
        metric(registry_sidecar, 'metering_usage_refusals_total{reason="CustomerFormConflict"}')
        >= 3
    )

    # The wire route (an AWS SDK's ResolveCustomer) registers its customer too.
    wire_account = account()
    fake_aws.metering.registration_tokens["token-wire"] = {
        "CustomerIdentifier": "",
        "CustomerAWSAccountId": wire_account,
        "ProductCode": PRODUCT,
        "LicenseArn": license_of(wire_account),
    }
    answer = registry_sidecar.client.post(
        "/",
        content=json.dumps({"RegistrationToken": "token-wire"}),
        headers={**WIRE, "X-Amz-Target": "AWSMPMeteringService.ResolveCustomer"},
    )
    assert answer.status_code == 200, answer.text
    wire_view = customer_view(registry_sidecar, wire_account)
    assert (wire_view["Status"], wire_view["ProductCode"]) == ("active", PRODUCT)
    assert "CustomerIdentifier" not in wire_view


def test_an_unreadable_event_is_refused_without_repeating_it(registry_sidecar: Sidecar) -> None:
    canary = "canary-" + uuid.uuid4().hex
    for body in ('{"Message": "' + canary + '"}', "[" + json.dumps(canary) + "]", canary):
        response = registry_sidecar.client.post(
            "/v1/events", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "UnreadableEvent"
        assert canary not in response.text
    assert canary not in registry_sidecar.log()
    missing = registry_sidecar.client.get("/v1/customers/987654321")
    assert missing.status_code == 404
    assert missing.json()["code"] == "NotFound"


def test_the_sandbox_rehearses_an_unsubscribe() -> None:
    inside_an_hour()
    env = {
        "METERING_MODE": "sandbox",
        "METERING_PRODUCT_CODE": PRODUCT,
        "METERING_CUSTOMER_END_GRACE": "1",
        "METERING_QUEUE_POLL_INTERVAL": "0.2",
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        resolved = sidecar.client.post("/v1/resolve-customer", json={"RegistrationToken": "buyer"})
        assert resolved.status_code == 200, resolved.text
        customer = resolved.json()
        account_id, license_arn = customer["CustomerAWSAccountId"], customer["LicenseArn"]
        assert queue(sidecar, concurrent(account_id, license_arn, 3)).status_code == 202
        post_event(
            sidecar,
            eventbridge("Purchase Agreement Ended - Manufacturer", account_id, license_arn),
        )

        def accepted() -> bool:
            page = sidecar.client.get("/v1/usage-grains", params={"customer": account_id})
            return [g["Status"] for g in page.json()["Items"]] == ["accepted"]

        wait_until(accepted, timeout=10, message="the final hour sent in the sandbox")
        refused = queue(sidecar, concurrent(account_id, license_arn, 1))
        assert refused.status_code == 409
        assert refused.json()["code"] == "CustomerSubscriptionEnded"
        assert customer_view(sidecar, account_id)["FinalUsageSentAt"]


class _BrokenRegistry:
    """A registry whose store cannot be written."""

    async def record_resolved(self, answer: ResolveCustomerResult) -> None:
        raise OSError("the registry's disk is gone")

    async def check_batch(self, payload: Any) -> None:
        return None


async def test_a_registry_that_cannot_be_written_never_fails_resolvecustomer() -> None:
    settings = Settings(mode="sandbox", product_code=PRODUCT)
    metrics = Metrics()
    service = MeteringService(
        SandboxBackend(product_code=PRODUCT),
        settings,
        metrics,
        RetryPolicy.from_settings(settings),
    )
    service.use_registry(_BrokenRegistry())
    answer = await service.resolve_customer(ResolveCustomerRequest(RegistrationToken="buyer"))
    assert answer.result.CustomerAWSAccountId
    failed = metrics.registry.get_sample_value(
        "metering_events_total", {"type": "ResolveCustomer", "outcome": "failed"}
    )
    assert failed == 1
