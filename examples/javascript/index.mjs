// Calls the metering sidecar with the AWS SDK for JavaScript v3, exactly as you would call AWS.
//
// The sidecar speaks AWS Marketplace Metering's own wire protocol, so the only
// change is the client's `endpoint`. The credentials are placeholders: the
// sidecar signs each call again with its real ones. If the sidecar was started
// with METERING_AUTH_TOKEN, pass that token as the access key id.
//
//   npm ci && METERING_URL=http://127.0.0.1:8080 METERING_PRODUCT_CODE=prod-demo node index.mjs
//
// @aws-sdk/client-marketplace-metering 3.1138.0 has no *AsDecimal quantity
// fields yet, so this uses the integer ones.
//
// Settings (environment): METERING_URL, METERING_PRODUCT_CODE, METERING_DIMENSION,
// METERING_REGISTRATION_TOKEN, METERING_AUTH_TOKEN. Prints one JSON line per
// call; exits 1 on an unexpected error.
import {
  BatchMeterUsageCommand,
  InvalidTokenException,
  MarketplaceMeteringClient,
  MarketplaceMeteringServiceException,
  MeterUsageCommand,
  RegisterUsageCommand,
  ResolveCustomerCommand,
} from "@aws-sdk/client-marketplace-metering";

const env = (name, fallback) => process.env[name] || fallback;
const productCode = env("METERING_PRODUCT_CODE", "prod-demo");
const dimension = env("METERING_DIMENSION", "demo-dimension");
// A Concurrent Agreements license (from the Agreements data feed, in real life).
const licenseArn = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef";

const client = new MarketplaceMeteringClient({
  endpoint: env("METERING_URL", "http://127.0.0.1:8080"), // the sidecar instead of AWS
  region: "us-east-1",
  // Placeholders (or the sidecar's auth token as accessKeyId): nothing of them reaches AWS.
  credentials: {
    accessKeyId: env("METERING_AUTH_TOKEN", "placeholder"),
    secretAccessKey: "placeholder",
  },
});

// Print one JSON line.
const emit = (action, fields) => console.log(JSON.stringify({ action, ...fields }));
// A command's output without the SDK's $metadata.
const result = ({ $metadata, ...output }) => output;
const error = (err) => ({ error: err.name, error_type: err.constructor.name, message: err.message });

async function main() {
  const now = new Date();

  // MeterUsage: one dimension, one hour, from software in the buyer's account.
  // (The SDK fills in a ClientToken, so its own retries cannot bill twice.)
  const meter = await client.send(
    new MeterUsageCommand({
      ProductCode: productCode,
      Timestamp: now,
      UsageDimension: dimension,
      UsageQuantity: 2,
    }),
  );
  emit("MeterUsage", { result: result(meter) });

  // BatchMeterUsage (SaaS, Concurrent Agreements): each record names the buyer's
  // account and license, and no ProductCode is sent.
  const batch = await client.send(
    new BatchMeterUsageCommand({
      UsageRecords: [
        {
          Timestamp: now,
          CustomerAWSAccountId: "123456789012",
          LicenseArn: licenseArn,
          Dimension: dimension,
          Quantity: 3,
        },
      ],
    }),
  );
  emit("BatchMeterUsage", { result: result(batch) });

  // ResolveCustomer: redeem the registration token a buyer arrived with.
  const customer = await client.send(
    new ResolveCustomerCommand({
      RegistrationToken: env("METERING_REGISTRATION_TOKEN", "demo-registration-token"),
    }),
  );
  emit("ResolveCustomer", { result: result(customer) });

  // RegisterUsage: the entitlement check of a paid container product at launch.
  const registered = await client.send(
    new RegisterUsageCommand({ ProductCode: productCode, PublicKeyVersion: 1, Nonce: "demo-nonce" }),
  );
  emit("RegisterUsage", { result: result(registered) });

  // AWS's errors arrive as the SDK's own exception classes.
  try {
    await client.send(new ResolveCustomerCommand({ RegistrationToken: "invalid-demo" }));
    throw new Error("ResolveCustomer accepted an invalid registration token");
  } catch (err) {
    if (!(err instanceof InvalidTokenException)) throw err;
    emit("ResolveCustomer", error(err));
  }

  // The sidecar checks what the SDK does not, before anything reaches AWS: here,
  // allocations that do not add up to the quantity. ValidationException is not
  // in the SDK's model, so it is the service's base exception with that name.
  try {
    await client.send(
      new MeterUsageCommand({
        ProductCode: productCode,
        Timestamp: now,
        UsageDimension: dimension,
        UsageQuantity: 5,
        UsageAllocations: [
          { AllocatedUsageQuantity: 1, Tags: [{ Key: "team", Value: "a" }] },
          { AllocatedUsageQuantity: 1, Tags: [{ Key: "team", Value: "b" }] },
        ],
      }),
    );
    throw new Error("MeterUsage accepted allocations that do not add up");
  } catch (err) {
    if (!(err instanceof MarketplaceMeteringServiceException) || err.name !== "ValidationException") {
      throw err;
    }
    emit("MeterUsage", error(err));
  }
}

try {
  await main();
} catch (err) {
  console.error(`failed unexpectedly: ${err.name}: ${err.message}`);
  process.exitCode = 1;
}
