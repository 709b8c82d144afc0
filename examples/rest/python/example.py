"""Meter usage through the sidecar's REST API with plain httpx: no AWS SDK, no signing.

1. The durable queue (what the README recommends for SaaS usage): POST one usage
   record to /v1/usage-records. The sidecar stores it (202 means on disk), sums it
   with the rest of its customer's hour and sends that grain to AWS once, after the
   hour has closed. The IdempotencyKey makes a resend of the same record harmless.
   Then GET /v1/usage-records/{id} shows where the record stands.
2. One direct call: POST /v1/batch-meter-usage, answered with AWS's result.
3. Usage the sidecar refuses (too late for AWS), to show a problem document.

Records are in the Concurrent Agreements form: the buyer's CustomerAWSAccountId and
the LicenseArn, no ProductCode.

Errors are problem documents (application/problem+json): ``code`` (AWS's error code,
or the sidecar's own), ``detail``, and ``retryable``: whether the same request may
succeed later. A retryable one is sent again after its Retry-After.

    pip install httpx
    METERING_URL=http://127.0.0.1:8080 python3 example.py

Settings (environment): METERING_URL (default http://127.0.0.1:8080), METERING_TOKEN
(the sidecar's METERING_AUTH_TOKEN, sent as a bearer token), METERING_DIMENSION.
Prints one JSON line per answer; exits 1 on an unexpected problem.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

URL = os.environ.get("METERING_URL", "http://127.0.0.1:8080")
TOKEN = os.environ.get("METERING_TOKEN", "")
DIMENSION = os.environ.get("METERING_DIMENSION", "demo-dimension")
# The buyer's account and license (from the Agreements data feed, in real life).
CUSTOMER_ACCOUNT = "123456789012"
LICENSE_ARN = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
ATTEMPTS = 5


class Problem(Exception):
    """A problem document the sidecar answered with (or a connection that failed)."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: float | None) -> None:
        super().__init__(body.get("detail", ""))
        self.status = status
        self.code = str(body.get("code", "Unknown"))
        self.detail = str(body.get("detail", ""))
        self.retryable = bool(body.get("retryable", False))
        self.retry_after = retry_after


def emit(action: str, **fields: Any) -> None:
    """Print one JSON line."""
    print(json.dumps({"action": action, **fields}), flush=True)


def call(
    client: httpx.Client, action: str, method: str, path: str, body: Any = None
) -> dict[str, Any]:
    """Send a request; on a retryable problem, wait and send the very same request again.

    (For /v1/meter-usage, resend the ClientToken and Timestamp a retryable problem
    carries: AWS then answers the resend as the same request.)
    """
    for attempt in range(1, ATTEMPTS + 1):
        try:
            response = client.request(method, path, json=body)
        except httpx.TransportError as exc:  # the sidecar not up yet, or restarting
            problem = Problem(
                0, {"code": "ConnectionFailed", "detail": str(exc), "retryable": True}, None
            )
        else:
            if response.is_success:
                answer: dict[str, Any] = response.json()
                return answer
            header = response.headers.get("Retry-After")
            problem = Problem(
                response.status_code, response.json(), float(header) if header else None
            )
        wait = min(problem.retry_after or 0.5 * 2 ** (attempt - 1), 30.0)
        retry = problem.retryable and attempt < ATTEMPTS
        emit(
            action,
            problem=problem.code,
            status=problem.status,
            detail=problem.detail,
            retryable=problem.retryable,
            **({"retry_in": wait} if retry else {}),
        )
        if not retry:
            raise problem
        time.sleep(wait)
    raise AssertionError("unreachable")


def main() -> int:
    """Queue a record, read it back, make one direct call and one that is refused."""
    headers = {"Authorization": f"Bearer {TOKEN}"} if TOKEN else {}
    with httpx.Client(base_url=URL, headers=headers, timeout=30) as client:
        try:
            # 1. The durable queue. Use your own event's id as the IdempotencyKey.
            record = {
                "CustomerAWSAccountId": CUSTOMER_ACCOUNT,
                "LicenseArn": LICENSE_ARN,
                "Dimension": DIMENSION,
                "QuantityAsDecimal": "1.5",
                "IdempotencyKey": f"example-{uuid.uuid4()}",
            }
            queued = call(
                client, "QueueUsage", "POST", "/v1/usage-records", {"UsageRecords": [record]}
            )
            (receipt,) = queued["Accepted"]
            emit("QueueUsage", id=receipt["Id"], status=receipt["Status"], hour=receipt["Hour"])
            view = call(client, "GetUsageRecord", "GET", f"/v1/usage-records/{receipt['Id']}")
            emit("GetUsageRecord", id=view["Id"], status=view["Status"])

            # 2. One direct call. The Timestamp is fixed once, so a retry is the same record.
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            usage = {
                "Timestamp": now,
                "CustomerAWSAccountId": CUSTOMER_ACCOUNT,
                "LicenseArn": LICENSE_ARN,
                "Dimension": DIMENSION,
                "QuantityAsDecimal": "2.5",
            }
            batch = {"UsageRecords": [usage]}
            answer = call(client, "BatchMeterUsage", "POST", "/v1/batch-meter-usage", batch)
            (result,) = answer["Results"]
            emit(
                "BatchMeterUsage",
                status=result["Status"],
                metering_record_id=result.get("MeteringRecordId"),
                unprocessed=len(answer["UnprocessedRecords"]),
            )
        except Problem:
            return 1

        # 3. Usage from two days ago is past AWS's submission window: the sidecar
        # refuses it at once (422 ValidationError, not retryable) and sends nothing.
        two_days_ago = (datetime.now(UTC) - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
        late = {**record, "Timestamp": two_days_ago, "IdempotencyKey": f"example-{uuid.uuid4()}"}
        try:
            call(client, "QueueUsage", "POST", "/v1/usage-records", {"UsageRecords": [late]})
        except Problem as problem:
            if problem.code != "ValidationError":
                return 1
        else:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
