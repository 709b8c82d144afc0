"""The queue over HTTP, in a real sidecar process, sending to the signature-checking fake."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import FAST_RETRIES, FakeAws, aws_mode_env
from tests.fakes import IssuedKey
from tests.sidecar import Sidecar, run_sidecar

LICENSE = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
QUEUE_FAST = {
    "METERING_QUEUE_GRACE": "0",
    "METERING_QUEUE_POLL_INTERVAL": "0.2",
    "METERING_QUEUE_RETRY_BASE_DELAY": "0.2",
    "METERING_QUEUE_RETRY_MAX_DELAY": "1",
}


def last_hour(minute: int = 10) -> str:
    """A time in the previous hour: its grains are due at once with no grace."""
    when = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=minute, second=0)
    return when.isoformat().replace("+00:00", "Z")


def record(customer: str, quantity: int = 1, **fields: Any) -> dict[str, Any]:
    """A SaaS record for the previous hour."""
    return {
        "CustomerAWSAccountId": customer,
        "LicenseArn": LICENSE,
        "Dimension": "gb",
        "Quantity": quantity,
        "Timestamp": last_hour(),
        **fields,
    }


def wait_until(check: Callable[[], bool], timeout: float = 15, message: str = "") -> None:
    """Poll ``check`` until true or fail."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting: {message}")
        time.sleep(0.05)


def customer() -> str:
    """A customer id no other test uses."""
    return str(uuid.uuid4().int)[:12]


@pytest.fixture(scope="module")
def queue_sidecar(fake_aws_session: FakeAws, static_key: IssuedKey) -> Iterator[Sidecar]:
    """A SaaS-mode sidecar whose queue sends at once (no grace) to the fake."""
    env = aws_mode_env(fake_aws_session.url, static_key, **FAST_RETRIES, **QUEUE_FAST)
    with run_sidecar(env, wait_ready=True) as sidecar:
        yield sidecar


def test_records_are_summed_sent_once_and_followed(
    queue_sidecar: Sidecar, fake_aws: FakeAws
) -> None:
    buyer = customer()
    response = queue_sidecar.client.post(
        "/v1/usage-records",
        json={"UsageRecords": [record(buyer, 2), record(buyer, 3, Timestamp=last_hour(40))]},
    )
    assert response.status_code == 202, response.text
    accepted = response.json()["Accepted"]
    assert len({a["GrainId"] for a in accepted}) == 1
    record_id = accepted[0]["Id"]

    def settled() -> bool:
        view = queue_sidecar.client.get(f"/v1/usage-records/{record_id}").json()
        return bool(view["Status"] == "accepted")

    wait_until(settled, message="record accepted")
    view = queue_sidecar.client.get(f"/v1/usage-records/{record_id}").json()
    assert view["Grain"]["Quantity"] == "5"
    assert view["Grain"]["Records"] == 2
    sent = [
        r
        for call in fake_aws.metering.requests_for("BatchMeterUsage")
        for r in call.json()["UsageRecords"]
        if r["CustomerAWSAccountId"] == buyer
    ]
    assert len(sent) == 1
    assert sent[0]["Quantity"] == 5
    (fake_record,) = [r for g, r in fake_aws.metering.batch_records.items() if buyer in g]
    assert view["MeteringRecordId"] == fake_record.metering_record_id


def test_a_bad_record_refuses_the_call_unless_partial(queue_sidecar: Sidecar) -> None:
    buyer = customer()
    records = [
        record(buyer),
        record(buyer, Quantity=-1),
        {k: v for k, v in record(buyer).items() if k != "CustomerAWSAccountId"},
    ]
    refused = queue_sidecar.client.post("/v1/usage-records", json={"UsageRecords": records})
    assert refused.status_code == 422, refused.text
    fields = {e["field"] for e in refused.json()["errors"]}
    assert fields == {"UsageRecords[1].Quantity", "UsageRecords[2]"}
    listed = queue_sidecar.client.get("/v1/usage-records", params={"customer": buyer}).json()
    assert listed["Items"] == []

    partial = queue_sidecar.client.post(
        "/v1/usage-records", json={"UsageRecords": records, "AcceptPartial": True}
    )
    assert partial.status_code == 202, partial.text
    body = partial.json()
    assert [a["Index"] for a in body["Accepted"]] == [0]
    assert [r["Index"] for r in body["Rejected"]] == [1, 2]


def test_a_nul_in_a_text_is_refused_with_its_field(queue_sidecar: Sidecar) -> None:
    """AWS's patterns take any character there, but the shared store's text cannot hold
    U+0000: refused at intake on every store, so it never reaches one that cannot keep it."""
    buyer = customer()
    records = [
        record(buyer),
        record(buyer, Dimension="g\x00b"),
        {
            **record(buyer),
            "CustomerAWSAccountId": None,
            "LicenseArn": None,
            "ProductCode": "prod-\x00x",
            "CustomerIdentifier": "c\x00",
        },
    ]
    records[2] = {k: v for k, v in records[2].items() if v is not None}
    refused = queue_sidecar.client.post(
        "/v1/usage-records", json={"UsageRecords": records, "AcceptPartial": True}
    )
    assert refused.status_code == 202, refused.text
    body = refused.json()
    assert [a["Index"] for a in body["Accepted"]] == [0]
    errors = {e["field"]: e["message"] for r in body["Rejected"] for e in r["Errors"]}
    assert "UsageRecords[1].Dimension" in errors
    assert "NUL" in errors["UsageRecords[1].Dimension"]
    assert "UsageRecords[2].CustomerIdentifier" in errors


def test_idempotency_key_replay_and_conflict(queue_sidecar: Sidecar) -> None:
    buyer = customer()
    key = f"evt-{uuid.uuid4()}"
    body = {"UsageRecords": [{**record(buyer, 4), "IdempotencyKey": key}]}
    first = queue_sidecar.client.post("/v1/usage-records", json=body)
    again = queue_sidecar.client.post("/v1/usage-records", json=body)
    assert first.status_code == again.status_code == 202
    assert again.json()["Accepted"][0]["Id"] == first.json()["Accepted"][0]["Id"]
    assert again.json()["Accepted"][0]["Replayed"] is True
    grain_id = first.json()["Accepted"][0]["GrainId"]
    grain = queue_sidecar.client.get(f"/v1/usage-grains/{grain_id}").json()
    assert grain["Quantity"] == "4"
    assert grain["Records"] == 1
    conflict = queue_sidecar.client.post(
        "/v1/usage-records", json={"UsageRecords": [{**record(buyer, 5), "IdempotencyKey": key}]}
    )
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "IdempotencyKeyConflict"


def test_call_size_limits(queue_sidecar: Sidecar) -> None:
    too_many = queue_sidecar.client.post(
        "/v1/usage-records", json={"UsageRecords": [record("1")] * 1001}
    )
    assert too_many.status_code == 422
    assert too_many.json()["errors"][0]["field"] == "UsageRecords"
    empty = queue_sidecar.client.post("/v1/usage-records", json={"UsageRecords": []})
    assert empty.status_code == 422
    thousand = queue_sidecar.client.post(
        "/v1/usage-records", json={"UsageRecords": [record(customer())] * 1000}
    )
    assert thousand.status_code == 202, thousand.text
    assert len(thousand.json()["Accepted"]) == 1000


def test_listing_and_lookups(queue_sidecar: Sidecar) -> None:
    buyer = customer()
    response = queue_sidecar.client.post(
        "/v1/usage-records",
        json={"UsageRecords": [record(buyer, 1, Dimension=f"d{i}") for i in range(3)]},
    )
    assert response.status_code == 202
    page = queue_sidecar.client.get(
        "/v1/usage-records", params={"customer": buyer, "limit": 2}
    ).json()
    assert len(page["Items"]) == 2
    rest = queue_sidecar.client.get(
        "/v1/usage-records", params={"customer": buyer, "cursor": page["NextCursor"]}
    ).json()
    assert len(rest["Items"]) == 1
    hour = last_hour(0)
    by_hour = queue_sidecar.client.get(
        "/v1/usage-records", params={"customer": buyer, "hour": hour}
    ).json()
    assert len(by_hour["Items"]) == 3
    grains = queue_sidecar.client.get("/v1/usage-grains", params={"customer": buyer}).json()
    assert {g["Dimension"] for g in grains["Items"]} == {"d0", "d1", "d2"}
    wait_until(
        lambda: all(
            g["Status"] == "accepted"
            for g in queue_sidecar.client.get(
                "/v1/usage-grains", params={"customer": buyer}
            ).json()["Items"]
        ),
        message="grains accepted",
    )
    accepted = queue_sidecar.client.get(
        "/v1/usage-grains", params={"customer": buyer, "status": "accepted"}
    ).json()
    assert len(accepted["Items"]) == 3
    assert all(g["Sent"]["Quantity"] == 1 for g in accepted["Items"])
    assert queue_sidecar.client.get("/v1/usage-records/ur_nope").status_code == 404
    assert queue_sidecar.client.get("/v1/usage-grains/999999999").status_code == 404
    bad = queue_sidecar.client.get("/v1/usage-records", params={"status": "lost"})
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "status"
    bad_hour = queue_sidecar.client.get("/v1/usage-records", params={"hour": "noon"})
    assert bad_hour.status_code == 422


def test_queue_metrics(queue_sidecar: Sidecar) -> None:
    queue_sidecar.client.post("/v1/usage-records", json={"UsageRecords": [record(customer())]})
    wait_until(
        lambda: (
            'metering_queue_outcomes_total{outcome="accepted",reason="Success"}'
            in queue_sidecar.client.get("/metrics").text
        ),
        message="accepted outcome counted",
    )
    text = queue_sidecar.client.get("/metrics").text
    for name in (
        'metering_queue_records_total{status="queued"}',
        "metering_queue_pending_records",
        "metering_queue_grains_due",
        "metering_queue_oldest_pending_age_seconds",
        "metering_queue_nearest_deadline_seconds",
        "metering_queue_commits",
    ):
        assert name in text, name
    ready = queue_sidecar.client.get("/readyz").json()
    assert ready["checks"]["queue"] == {"ok": True, "detail": "writable"}


def test_container_mode_refuses_customers(fake_aws: FakeAws, static_key: IssuedKey) -> None:
    env = aws_mode_env(fake_aws.url, static_key, METERING_QUEUE_MODE="container")
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post(
            "/v1/usage-records", json={"UsageRecords": [record("123456789012")]}
        )
        assert response.status_code == 422
        fields = {e["field"] for e in response.json()["errors"]}
        assert fields == {"UsageRecords[0].CustomerAWSAccountId", "UsageRecords[0].LicenseArn"}
