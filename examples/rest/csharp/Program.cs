// Meter usage through the sidecar's REST API with HttpClient and System.Text.Json:
// no AWS SDK, no signing, no packages (.NET 8 or later).
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
// Errors are problem documents (application/problem+json): "code" (AWS's error code,
// or the sidecar's own), "detail", and "retryable": whether the same request may
// succeed later. A retryable one is sent again after its Retry-After.
//
//   METERING_URL=http://127.0.0.1:8080 dotnet run
//
// Not built or run by this project's CI: no .NET SDK can be installed on its
// machines (see examples/README.md). The other examples do the same calls and are
// run against a sidecar on every CI run.
//
// Settings (environment): METERING_URL (default http://127.0.0.1:8080), METERING_TOKEN
// (the sidecar's METERING_AUTH_TOKEN, sent as a bearer token), METERING_DIMENSION.
// Prints one JSON line per answer; exits 1 on an unexpected problem.
using System.Globalization;
using System.Net.Http.Headers;
using System.Text;
using System.Text.Json.Nodes;

const string CustomerAccount = "123456789012"; // the buyer's (from the Agreements data feed)
const string LicenseArn = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef";

string Env(string name, string fallback) =>
    Environment.GetEnvironmentVariable(name) is { Length: > 0 } value ? value : fallback;

string Rfc3339(DateTime utc) =>
    utc.ToString("yyyy'-'MM'-'dd'T'HH':'mm':'ss'Z'", CultureInfo.InvariantCulture);

var dimension = Env("METERING_DIMENSION", "demo-dimension");
var sidecar = new Sidecar(Env("METERING_URL", "http://127.0.0.1:8080"), Env("METERING_TOKEN", ""));

JsonObject queuedRecord;
try
{
    // 1. The durable queue. Use your own event's id as the IdempotencyKey.
    queuedRecord = new JsonObject
    {
        ["CustomerAWSAccountId"] = CustomerAccount,
        ["LicenseArn"] = LicenseArn,
        ["Dimension"] = dimension,
        ["QuantityAsDecimal"] = "1.5",
        ["IdempotencyKey"] = $"example-{Guid.NewGuid()}",
    };
    var queued = await sidecar.Call("QueueUsage", HttpMethod.Post, "/v1/usage-records",
        new JsonObject { ["UsageRecords"] = new JsonArray(queuedRecord.DeepClone()) });
    var receipt = queued["Accepted"]![0]!;
    var id = receipt["Id"]!.GetValue<string>();
    Sidecar.Emit("QueueUsage", new JsonObject
    {
        ["id"] = receipt["Id"]!.DeepClone(),
        ["status"] = receipt["Status"]!.DeepClone(),
        ["hour"] = receipt["Hour"]!.DeepClone(),
    });
    var view = await sidecar.Call("GetUsageRecord", HttpMethod.Get, $"/v1/usage-records/{id}", null);
    Sidecar.Emit("GetUsageRecord", new JsonObject
    {
        ["id"] = view["Id"]!.DeepClone(),
        ["status"] = view["Status"]!.DeepClone(),
    });

    // 2. One direct call. The Timestamp is fixed once, so a retry is the same record.
    var usage = new JsonObject
    {
        ["Timestamp"] = Rfc3339(DateTime.UtcNow),
        ["CustomerAWSAccountId"] = CustomerAccount,
        ["LicenseArn"] = LicenseArn,
        ["Dimension"] = dimension,
        ["QuantityAsDecimal"] = "2.5",
    };
    var answer = await sidecar.Call("BatchMeterUsage", HttpMethod.Post, "/v1/batch-meter-usage",
        new JsonObject { ["UsageRecords"] = new JsonArray(usage) });
    var result = answer["Results"]![0]!;
    Sidecar.Emit("BatchMeterUsage", new JsonObject
    {
        ["status"] = result["Status"]!.DeepClone(),
        ["metering_record_id"] = result["MeteringRecordId"]?.DeepClone(),
        ["unprocessed"] = answer["UnprocessedRecords"]!.AsArray().Count,
    });
}
catch (Problem)
{
    return 1;
}

// 3. Usage from two days ago is past AWS's submission window: the sidecar refuses it
// at once (422 ValidationError, not retryable) and sends nothing.
var late = queuedRecord.DeepClone().AsObject();
late["Timestamp"] = Rfc3339(DateTime.UtcNow.AddDays(-2));
late["IdempotencyKey"] = $"example-{Guid.NewGuid()}";
try
{
    await sidecar.Call("QueueUsage", HttpMethod.Post, "/v1/usage-records",
        new JsonObject { ["UsageRecords"] = new JsonArray(late) });
    return 1;
}
catch (Problem problem)
{
    return problem.Code == "ValidationError" ? 0 : 1;
}

/// <summary>A problem document the sidecar answered with (or a connection that failed).</summary>
sealed class Problem(int status, string code, string detail, bool retryable, TimeSpan? retryAfter)
    : Exception(detail)
{
    public int Status { get; } = status;
    public string Code { get; } = code;
    public string Detail { get; } = detail;
    public bool Retryable { get; } = retryable;
    public TimeSpan? RetryAfter { get; } = retryAfter;
}

/// <summary>Calls one sidecar.</summary>
sealed class Sidecar
{
    const int Attempts = 5;
    readonly string url;
    readonly HttpClient http;

    public Sidecar(string url, string token)
    {
        this.url = url.TrimEnd('/');
        http = new HttpClient { Timeout = TimeSpan.FromSeconds(30) };
        if (token.Length > 0)
        {
            http.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        }
    }

    /// <summary>Print one JSON line.</summary>
    public static void Emit(string action, JsonObject fields)
    {
        var line = new JsonObject { ["action"] = action };
        foreach (var (key, value) in fields)
        {
            line[key] = value?.DeepClone();
        }
        Console.WriteLine(line.ToJsonString());
    }

    /// <summary>
    /// Send a request; on a retryable problem, wait and send the very same request again.
    /// (For /v1/meter-usage, resend the ClientToken and Timestamp a retryable problem
    /// carries: AWS then answers the resend as the same request.)
    /// </summary>
    public async Task<JsonNode> Call(string action, HttpMethod method, string path, JsonNode? body)
    {
        var payload = body?.ToJsonString();
        for (var attempt = 1; ; attempt++)
        {
            Problem problem;
            try
            {
                using var request = new HttpRequestMessage(method, new Uri(url + path));
                if (payload is not null)
                {
                    request.Content = new StringContent(payload, Encoding.UTF8, "application/json");
                }
                using var response = await http.SendAsync(request);
                var text = await response.Content.ReadAsStringAsync();
                if (response.IsSuccessStatusCode)
                {
                    return JsonNode.Parse(text)!;
                }
                var document = JsonNode.Parse(text)!.AsObject();
                problem = new Problem(
                    (int)response.StatusCode,
                    document["code"]?.GetValue<string>() ?? "Unknown",
                    document["detail"]?.GetValue<string>() ?? "",
                    document["retryable"]?.GetValue<bool>() ?? false,
                    response.Headers.RetryAfter?.Delta);
            }
            catch (HttpRequestException e) // the sidecar not up yet, or restarting
            {
                problem = new Problem(0, "ConnectionFailed", e.Message, true, null);
            }
            catch (TaskCanceledException e) // no answer within the client's timeout
            {
                problem = new Problem(0, "Timeout", e.Message, true, null);
            }
            var wait = Math.Min(problem.RetryAfter?.TotalSeconds ?? 0.5 * Math.Pow(2, attempt - 1), 30);
            var retry = problem.Retryable && attempt < Attempts;
            var fields = new JsonObject
            {
                ["problem"] = problem.Code,
                ["status"] = problem.Status,
                ["detail"] = problem.Detail,
                ["retryable"] = problem.Retryable,
            };
            if (retry)
            {
                fields["retry_in"] = wait;
            }
            Emit(action, fields);
            if (!retry)
            {
                throw problem;
            }
            await Task.Delay(TimeSpan.FromSeconds(wait));
        }
    }
}
