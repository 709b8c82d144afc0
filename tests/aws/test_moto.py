"""A second, independent opinion on BatchMeterUsage and SigV4: moto with signature checks on.

moto implements only BatchMeterUsage for this service, stores nothing (so it
cannot see duplicates) and needs CustomerIdentifier records; what it adds is
a signature check and a subscription check written by other people.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import httpx
import pytest
from moto.meteringmarketplace.models import meteringmarketplace_backends
from moto.server import ThreadedMotoServer

from tests.conftest import FAST_RETRIES
from tests.sidecar import free_port, run_sidecar

ACCOUNT = "123456789012"
PRODUCT = "prod-moto123"


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[str, dict[str, str]]]:
    """moto on loopback, an IAM user allowed aws-marketplace:*, then signatures enforced."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="sidecar")
        key = iam.create_access_key(UserName="sidecar")["AccessKey"]
        iam.put_user_policy(
            UserName="sidecar",
            PolicyName="metering",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {"Effect": "Allow", "Action": "aws-marketplace:*", "Resource": "*"}
                    ],
                }
            ),
        )
        iam.close()
        # From here on every request must carry a valid signature.
        httpx.post(f"{url}/moto-api/reset-auth", content=b"0").raise_for_status()
        backend = meteringmarketplace_backends[ACCOUNT]["us-east-1"]
        backend.customers_by_product[PRODUCT].append("cust-subscribed")
        yield (
            url,
            {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            },
        )
    finally:
        server.stop()


def _records() -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    dimension = f"d-{uuid.uuid4().hex[:8]}"
    return [
        {
            "Timestamp": now,
            "CustomerIdentifier": "cust-subscribed",
            "Dimension": dimension,
            "Quantity": 2,
        },
        {
            "Timestamp": now,
            "CustomerIdentifier": "cust-unknown",
            "Dimension": dimension,
            "Quantity": 1,
        },
    ]


def test_moto_accepts_the_sidecars_signature(moto: tuple[str, dict[str, str]]) -> None:
    url, keys = moto
    env = {"METERING_ENDPOINT_URL": url, "AWS_REGION": "us-east-1", **FAST_RETRIES, **keys}
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post(
            "/v1/batch-meter-usage", json={"ProductCode": PRODUCT, "UsageRecords": _records()}
        )
        assert response.status_code == 200, response.text
        statuses = [r["Status"] for r in response.json()["Results"]]
        assert statuses == ["Success", "CustomerNotSubscribed"]


def test_moto_refuses_a_wrong_secret(moto: tuple[str, dict[str, str]]) -> None:
    url, keys = moto
    env = {
        "METERING_ENDPOINT_URL": url,
        "AWS_REGION": "us-east-1",
        **FAST_RETRIES,
        **keys,
        "AWS_SECRET_ACCESS_KEY": "not-the-secret",
    }
    with run_sidecar(env, wait_ready=True) as sidecar:
        response = sidecar.client.post(
            "/v1/batch-meter-usage", json={"ProductCode": PRODUCT, "UsageRecords": _records()}
        )
        # moto's 403 SignatureDoesNotMatch (XML) is read as a credential refusal:
        # one forced refresh, one more attempt, then a clear 502.
        assert response.status_code == 502, response.text
        assert response.json()["code"] == "CredentialsRejected"
        assert "SignatureDoesNotMatch" in response.json()["detail"]
