// Meter usage through the sidecar's REST API with Node's own fetch: no AWS SDK, no
// signing, no dependencies (Node 18 or later).
//
// 1. The durable queue (what the README recommends for SaaS usage): POST one usage
//    record to /v1/usage-records. The sidecar stores it (202 means on disk), sums it
//    with the rest of its customer's hour and sends that grain to AWS once, after the
//    hour has closed. The IdempotencyKey makes a resend of the same record harmless.
//    Then GET /v1/usage-records/{id} shows where the record stands.
// 2. One direct call: POST /v1/batch-meter-usage, answered with AWS's result.
// 3. Usage the sidecar refuses (too late for AWS), to show a problem document.
//
// Records are in the Concurrent Agreements form: the buyer's CustomerAWSAccountId and
// the LicenseArn, no ProductCode.
//
// Errors are problem documents (application/problem+json): `code` (AWS's error code,
// or the sidecar's own), `detail`, and `retryable`: whether the same request may
// succeed later. A retryable one is sent again after its Retry-After.
//
//   METERING_URL=http://127.0.0.1:8080 node example.mjs
//
// Settings (environment): METERING_URL (default http://127.0.0.1:8080), METERING_TOKEN
// (the sidecar's METERING_AUTH_TOKEN, sent as a bearer token), METERING_DIMENSION.
// Prints one JSON line per answer; exits 1 on an unexpected problem.
import { randomUUID } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";

const URL = process.env.METERING_URL || "http://127.0.0.1:8080";
const TOKEN = process.env.METERING_TOKEN || "";
const DIMENSION = process.env.METERING_DIMENSION || "demo-dimension";
// The buyer's account and license (from the Agreements data feed, in real life).
const CUSTOMER_ACCOUNT = "123456789012";
const LICENSE_ARN = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef";
const ATTEMPTS = 5;

// A problem document the sidecar answered with (or a connection that failed).
class Problem extends Error {
  constructor(status, body, retryAfter) {
    super(body.detail ?? "");
    this.status = status;
    this.code = String(body.code ?? "Unknown");
    this.detail = String(body.detail ?? "");
    this.retryable = Boolean(body.retryable);
    this.retryAfter = retryAfter;
  }
}

// Print one JSON line.
const emit = (action, fields) => console.log(JSON.stringify({ action, ...fields }));

// RFC 3339 in UTC, whole seconds.
const rfc3339 = (date) => date.toISOString().replace(/\.\d{3}Z$/, "Z");

// Send a request; on a retryable problem, wait and send the very same request again.
// (For /v1/meter-usage, resend the ClientToken and Timestamp a retryable problem
// carries: AWS then answers the resend as the same request.)
async function call(action, method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  for (let attempt = 1; ; attempt++) {
    let problem;
    try {
      const response = await fetch(URL + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(30_000),
      });
      if (response.ok) return await response.json();
      const retryAfter = response.headers.get("Retry-After");
      problem = new Problem(response.status, await response.json(), retryAfter && Number(retryAfter));
    } catch (err) {
      // The sidecar not up yet, or restarting.
      problem = new Problem(0, { code: "ConnectionFailed", detail: String(err.cause ?? err), retryable: true });
    }
    const wait = Math.min(problem.retryAfter || 0.5 * 2 ** (attempt - 1), 30);
    const retry = problem.retryable && attempt < ATTEMPTS;
    emit(action, {
      problem: problem.code,
      status: problem.status,
      detail: problem.detail,
      retryable: problem.retryable,
      ...(retry ? { retry_in: wait } : {}),
    });
    if (!retry) throw problem;
    await sleep(wait * 1000);
  }
}

async function main() {
  // 1. The durable queue. Use your own event's id as the IdempotencyKey.
  const record = {
    CustomerAWSAccountId: CUSTOMER_ACCOUNT,
    LicenseArn: LICENSE_ARN,
    Dimension: DIMENSION,
    QuantityAsDecimal: "1.5",
    IdempotencyKey: `example-${randomUUID()}`,
  };
  const queued = await call("QueueUsage", "POST", "/v1/usage-records", { UsageRecords: [record] });
  const [receipt] = queued.Accepted;
  emit("QueueUsage", { id: receipt.Id, status: receipt.Status, hour: receipt.Hour });
  const view = await call("GetUsageRecord", "GET", `/v1/usage-records/${receipt.Id}`);
  emit("GetUsageRecord", { id: view.Id, status: view.Status });

  // 2. One direct call. The Timestamp is fixed once, so a retry is the same record.
  const usage = {
    Timestamp: rfc3339(new Date()),
    CustomerAWSAccountId: CUSTOMER_ACCOUNT,
    LicenseArn: LICENSE_ARN,
    Dimension: DIMENSION,
    QuantityAsDecimal: "2.5",
  };
  const answer = await call("BatchMeterUsage", "POST", "/v1/batch-meter-usage", { UsageRecords: [usage] });
  const [result] = answer.Results;
  emit("BatchMeterUsage", {
    status: result.Status,
    metering_record_id: result.MeteringRecordId ?? null,
    unprocessed: answer.UnprocessedRecords.length,
  });

  // 3. Usage from two days ago is past AWS's submission window: the sidecar refuses
  // it at once (422 ValidationError, not retryable) and sends nothing.
  const late = {
    ...record,
    Timestamp: rfc3339(new Date(Date.now() - 2 * 24 * 3600 * 1000)),
    IdempotencyKey: `example-${randomUUID()}`,
  };
  try {
    await call("QueueUsage", "POST", "/v1/usage-records", { UsageRecords: [late] });
  } catch (err) {
    if (err instanceof Problem && err.code === "ValidationError") return 0;
    throw err;
  }
  return 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    if (!(err instanceof Problem)) console.error(err);
    process.exit(1);
  },
);
