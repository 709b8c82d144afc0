"""Call the metering sidecar with boto3, exactly as you would call AWS.

The sidecar speaks AWS Marketplace Metering's own wire protocol, so the only
change is ``endpoint_url``. The keys are placeholders: the sidecar signs each
call again with its real credentials. If the sidecar was started with
METERING_AUTH_TOKEN, pass that token as the access key id.

    pip install boto3   # 1.44 or later, for the *AsDecimal quantities
    METERING_URL=http://127.0.0.1:8080 METERING_PRODUCT_CODE=prod-demo python3 python_boto3.py

Settings (environment): METERING_URL, METERING_PRODUCT_CODE, METERING_DIMENSION,
METERING_REGISTRATION_TOKEN, METERING_AUTH_TOKEN. Prints one JSON line per
call; exits 1 on an unexpected error.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.exceptions import ClientError

# A Concurrent Agreements license (from the Agreements data feed, in real life).
LICENSE_ARN = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
CUSTOMER_ACCOUNT = "123456789012"
PLACEHOLDER = "placeholder"


def make_client(url: str, access_key_id: str = PLACEHOLDER) -> Any:
    """A boto3 Marketplace Metering client that talks to the sidecar."""
    return boto3.session.Session().client(
        "meteringmarketplace",
        endpoint_url=url,  # the sidecar instead of AWS
        region_name="us-east-1",
        aws_access_key_id=access_key_id,  # a placeholder, or the sidecar's auth token
        aws_secret_access_key=PLACEHOLDER,
    )


def emit(action: str, **fields: Any) -> dict[str, Any]:
    """Print one JSON line and return it."""
    line = {"action": action, **fields}
    print(json.dumps(line, default=_json_default), flush=True)
    return line


def _json_default(value: object) -> str:
    # boto3 returns timestamps as datetimes.
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _result(response: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def _error(action: str, exc: ClientError) -> dict[str, Any]:
    error = exc.response["Error"]
    return emit(
        action, error=error["Code"], error_type=type(exc).__name__, message=error["Message"]
    )


def run(
    url: str,
    product_code: str,
    *,
    dimension: str,
    registration_token: str,
    access_key_id: str = PLACEHOLDER,
) -> list[dict[str, Any]]:
    """Call all four actions and the two expected errors; return the printed lines."""
    client = make_client(url, access_key_id)
    now = datetime.now(UTC)
    lines: list[dict[str, Any]] = []

    # MeterUsage: one dimension, one hour, from software in the buyer's account.
    # (boto3 fills in a ClientToken, so its own retries cannot bill twice.)
    meter = client.meter_usage(
        ProductCode=product_code,
        Timestamp=now,
        UsageDimension=dimension,
        UsageQuantityAsDecimal="2.5",
    )
    lines.append(emit("MeterUsage", result=_result(meter)))

    # BatchMeterUsage (SaaS, Concurrent Agreements): each record names the buyer's
    # account and license, and no ProductCode is sent.
    batch = client.batch_meter_usage(
        UsageRecords=[
            {
                "Timestamp": now,
                "CustomerAWSAccountId": CUSTOMER_ACCOUNT,
                "LicenseArn": LICENSE_ARN,
                "Dimension": dimension,
                "QuantityAsDecimal": "3.5",
            }
        ]
    )
    lines.append(emit("BatchMeterUsage", result=_result(batch)))

    # ResolveCustomer: redeem the registration token a buyer arrived with.
    customer = client.resolve_customer(RegistrationToken=registration_token)
    lines.append(emit("ResolveCustomer", result=_result(customer)))

    # RegisterUsage: the entitlement check of a paid container product at launch.
    registered = client.register_usage(
        ProductCode=product_code, PublicKeyVersion=1, Nonce="demo-nonce"
    )
    lines.append(emit("RegisterUsage", result=_result(registered)))

    # AWS's errors arrive as boto3's own exceptions.
    try:
        client.resolve_customer(RegistrationToken="invalid-demo")
    except client.exceptions.InvalidTokenException as exc:
        lines.append(_error("ResolveCustomer", exc))
    else:
        raise RuntimeError("ResolveCustomer accepted an invalid registration token")

    # The sidecar checks what boto3 does not, before anything reaches AWS: here,
    # allocations that do not add up to the quantity.
    try:
        client.meter_usage(
            ProductCode=product_code,
            Timestamp=now,
            UsageDimension=dimension,
            UsageQuantityAsDecimal="5",
            UsageAllocations=[
                {"AllocatedUsageQuantityAsDecimal": "1", "Tags": [{"Key": "team", "Value": "a"}]},
                {"AllocatedUsageQuantityAsDecimal": "1", "Tags": [{"Key": "team", "Value": "b"}]},
            ],
        )
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ValidationException":
            raise
        lines.append(_error("MeterUsage", exc))
    else:
        raise RuntimeError("MeterUsage accepted allocations that do not add up")
    return lines


def main() -> int:
    """Run against the sidecar named by the environment."""
    env = os.environ
    try:
        run(
            env.get("METERING_URL", "http://127.0.0.1:8080"),
            env.get("METERING_PRODUCT_CODE", "prod-demo"),
            dimension=env.get("METERING_DIMENSION", "demo-dimension"),
            registration_token=env.get("METERING_REGISTRATION_TOKEN", "demo-registration-token"),
            access_key_id=env.get("METERING_AUTH_TOKEN") or PLACEHOLDER,
        )
    except Exception as exc:
        print(f"failed unexpectedly: {exc!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
