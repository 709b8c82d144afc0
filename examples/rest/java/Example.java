// Meter usage through the sidecar's REST API with java.net.http: no AWS SDK, no
// signing, no dependencies (JDK 11 or later; one file, run as it is).
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
//   METERING_URL=http://127.0.0.1:8080 java Example.java
//
// The JDK has no JSON library, so the Json class at the end reads and writes the
// little JSON used here; in an application, use the one you have (Jackson, Gson...).
//
// Settings (environment): METERING_URL (default http://127.0.0.1:8080), METERING_TOKEN
// (the sidecar's METERING_AUTH_TOKEN, sent as a bearer token), METERING_DIMENSION.
// Prints one JSON line per answer; exits 1 on an unexpected problem.

import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.time.Instant;
import java.time.temporal.ChronoUnit;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;

public class Example {
    static final String URL = env("METERING_URL", "http://127.0.0.1:8080");
    static final String TOKEN = env("METERING_TOKEN", "");
    static final String DIMENSION = env("METERING_DIMENSION", "demo-dimension");
    // The buyer's account and license (from the Agreements data feed, in real life).
    static final String CUSTOMER_ACCOUNT = "123456789012";
    static final String LICENSE_ARN =
            "arn:aws:license-manager::123456789012:license:l-0123456789abcdef";
    static final int ATTEMPTS = 5;
    // The JDK's default client offers a plain-HTTP server an upgrade to HTTP/2
    // (h2c); the sidecar declines it and answers in HTTP/1.1.
    static final HttpClient HTTP = HttpClient.newBuilder()
            .connectTimeout(Duration.ofSeconds(5))
            .build();

    /** A problem document the sidecar answered with (or a connection that failed). */
    static class Problem extends Exception {
        final int status;
        final String code;
        final String detail;
        final boolean retryable;
        final Double retryAfter;

        Problem(int status, Map<String, Object> body, Double retryAfter) {
            super(String.valueOf(body.getOrDefault("detail", "")));
            this.status = status;
            this.code = String.valueOf(body.getOrDefault("code", "Unknown"));
            this.detail = String.valueOf(body.getOrDefault("detail", ""));
            this.retryable = Boolean.TRUE.equals(body.get("retryable"));
            this.retryAfter = retryAfter;
        }
    }

    public static void main(String[] args) throws Exception {
        Map<String, Object> record;
        try {
            // 1. The durable queue. Use your own event's id as the IdempotencyKey.
            record = Json.object(
                    "CustomerAWSAccountId", CUSTOMER_ACCOUNT,
                    "LicenseArn", LICENSE_ARN,
                    "Dimension", DIMENSION,
                    "QuantityAsDecimal", "1.5",
                    "IdempotencyKey", "example-" + UUID.randomUUID());
            Map<String, Object> queued = call("QueueUsage", "POST", "/v1/usage-records",
                    Json.object("UsageRecords", List.of(record)));
            Map<String, Object> receipt = Json.first(queued.get("Accepted"));
            emit("QueueUsage", Json.object(
                    "id", receipt.get("Id"), "status", receipt.get("Status"), "hour", receipt.get("Hour")));
            Map<String, Object> view = call("GetUsageRecord", "GET",
                    "/v1/usage-records/" + receipt.get("Id"), null);
            emit("GetUsageRecord", Json.object("id", view.get("Id"), "status", view.get("Status")));

            // 2. One direct call. The Timestamp is fixed once, so a retry is the same record.
            Map<String, Object> usage = Json.object(
                    "Timestamp", Instant.now().truncatedTo(ChronoUnit.SECONDS).toString(),
                    "CustomerAWSAccountId", CUSTOMER_ACCOUNT,
                    "LicenseArn", LICENSE_ARN,
                    "Dimension", DIMENSION,
                    "QuantityAsDecimal", "2.5");
            Map<String, Object> answer = call("BatchMeterUsage", "POST", "/v1/batch-meter-usage",
                    Json.object("UsageRecords", List.of(usage)));
            Map<String, Object> result = Json.first(answer.get("Results"));
            emit("BatchMeterUsage", Json.object(
                    "status", result.get("Status"),
                    "metering_record_id", result.get("MeteringRecordId"),
                    "unprocessed", ((List<?>) answer.get("UnprocessedRecords")).size()));
        } catch (Problem problem) {
            System.exit(1);
            return;
        }

        // 3. Usage from two days ago is past AWS's submission window: the sidecar
        // refuses it at once (422 ValidationError, not retryable) and sends nothing.
        Map<String, Object> late = new LinkedHashMap<>(record);
        late.put("Timestamp", Instant.now().minus(2, ChronoUnit.DAYS).truncatedTo(ChronoUnit.SECONDS).toString());
        late.put("IdempotencyKey", "example-" + UUID.randomUUID());
        try {
            call("QueueUsage", "POST", "/v1/usage-records", Json.object("UsageRecords", List.of(late)));
            System.exit(1);
        } catch (Problem problem) {
            System.exit(problem.code.equals("ValidationError") ? 0 : 1);
        }
    }

    /**
     * Send a request; on a retryable problem, wait and send the very same request again.
     * (For /v1/meter-usage, resend the ClientToken and Timestamp a retryable problem
     * carries: AWS then answers the resend as the same request.)
     */
    static Map<String, Object> call(String action, String method, String path, Object body)
            throws Problem, InterruptedException {
        HttpRequest.Builder builder = HttpRequest.newBuilder(URI.create(URL + path))
                .timeout(Duration.ofSeconds(30))
                .header("Content-Type", "application/json")
                .method(method, body == null
                        ? HttpRequest.BodyPublishers.noBody()
                        : HttpRequest.BodyPublishers.ofString(Json.write(body)));
        if (!TOKEN.isEmpty()) {
            builder.header("Authorization", "Bearer " + TOKEN);
        }
        HttpRequest request = builder.build();
        for (int attempt = 1; ; attempt++) {
            Problem problem;
            try {
                HttpResponse<String> response = HTTP.send(request, HttpResponse.BodyHandlers.ofString());
                Map<String, Object> answer = Json.readObject(response.body());
                if (response.statusCode() / 100 == 2) {
                    return answer;
                }
                Double retryAfter = response.headers().firstValue("Retry-After").map(Double::valueOf).orElse(null);
                problem = new Problem(response.statusCode(), answer, retryAfter);
            } catch (IOException e) { // the sidecar not up yet, or restarting
                problem = new Problem(0, Json.object(
                        "code", "ConnectionFailed", "detail", String.valueOf(e), "retryable", true), null);
            }
            double wait = Math.min(problem.retryAfter != null ? problem.retryAfter : 0.5 * Math.pow(2, attempt - 1), 30);
            boolean retry = problem.retryable && attempt < ATTEMPTS;
            Map<String, Object> fields = Json.object(
                    "problem", problem.code, "status", problem.status,
                    "detail", problem.detail, "retryable", problem.retryable);
            if (retry) {
                fields.put("retry_in", wait);
            }
            emit(action, fields);
            if (!retry) {
                throw problem;
            }
            Thread.sleep((long) (wait * 1000));
        }
    }

    /** Print one JSON line. */
    static void emit(String action, Map<String, Object> fields) {
        Map<String, Object> line = Json.object("action", action);
        line.putAll(fields);
        System.out.println(Json.write(line));
    }

    static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    /** Just enough JSON: objects (maps), arrays (lists), strings, numbers, booleans, null. */
    static final class Json {
        private final String text;
        private int at;

        private Json(String text) {
            this.text = text;
        }

        /** A map of alternating keys and values, in order. */
        static Map<String, Object> object(Object... keysAndValues) {
            Map<String, Object> map = new LinkedHashMap<>();
            for (int i = 0; i < keysAndValues.length; i += 2) {
                map.put((String) keysAndValues[i], keysAndValues[i + 1]);
            }
            return map;
        }

        @SuppressWarnings("unchecked")
        static Map<String, Object> first(Object list) {
            return (Map<String, Object>) ((List<?>) list).get(0);
        }

        @SuppressWarnings("unchecked")
        static Map<String, Object> readObject(String text) throws IOException {
            Json reader = new Json(text);
            Object value = reader.value();
            reader.space();
            if (!(value instanceof Map) || reader.at != text.length()) {
                throw new IOException("not a JSON object: " + text);
            }
            return (Map<String, Object>) value;
        }

        static String write(Object value) {
            StringBuilder out = new StringBuilder();
            write(value, out);
            return out.toString();
        }

        private static void write(Object value, StringBuilder out) {
            if (value == null || value instanceof Boolean || value instanceof Number) {
                out.append(value);
            } else if (value instanceof Map) {
                out.append('{');
                String comma = "";
                for (Map.Entry<?, ?> entry : ((Map<?, ?>) value).entrySet()) {
                    out.append(comma);
                    write(String.valueOf(entry.getKey()), out);
                    out.append(':');
                    write(entry.getValue(), out);
                    comma = ",";
                }
                out.append('}');
            } else if (value instanceof List) {
                out.append('[');
                String comma = "";
                for (Object item : (List<?>) value) {
                    out.append(comma);
                    write(item, out);
                    comma = ",";
                }
                out.append(']');
            } else {
                out.append('"');
                for (char c : value.toString().toCharArray()) {
                    if (c == '"' || c == '\\') {
                        out.append('\\').append(c);
                    } else if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
                out.append('"');
            }
        }

        private Object value() throws IOException {
            space();
            if (at >= text.length()) {
                throw new IOException("JSON ends early");
            }
            char c = text.charAt(at);
            if (c == '{') {
                Map<String, Object> map = new LinkedHashMap<>();
                at++;
                space();
                if (peek('}')) {
                    return map;
                }
                do {
                    space();
                    String key = string();
                    space();
                    expect(':');
                    map.put(key, value());
                    space();
                } while (peek(','));
                expect('}');
                return map;
            }
            if (c == '[') {
                List<Object> list = new ArrayList<>();
                at++;
                space();
                if (peek(']')) {
                    return list;
                }
                do {
                    list.add(value());
                    space();
                } while (peek(','));
                expect(']');
                return list;
            }
            if (c == '"') {
                return string();
            }
            for (String word : new String[] {"true", "false", "null"}) {
                if (text.startsWith(word, at)) {
                    at += word.length();
                    return word.equals("null") ? null : Boolean.valueOf(word);
                }
            }
            int start = at;
            while (at < text.length() && "+-.eE0123456789".indexOf(text.charAt(at)) >= 0) {
                at++;
            }
            if (start == at) {
                throw new IOException("unexpected '" + c + "' in JSON at " + at);
            }
            return new java.math.BigDecimal(text.substring(start, at));
        }

        private String string() throws IOException {
            expect('"');
            StringBuilder out = new StringBuilder();
            while (at < text.length() && text.charAt(at) != '"') {
                char c = text.charAt(at++);
                if (c != '\\') {
                    out.append(c);
                    continue;
                }
                char escaped = text.charAt(at++);
                switch (escaped) {
                    case 'n': out.append('\n'); break;
                    case 't': out.append('\t'); break;
                    case 'r': out.append('\r'); break;
                    case 'b': out.append('\b'); break;
                    case 'f': out.append('\f'); break;
                    case 'u': out.append((char) Integer.parseInt(text.substring(at, at + 4), 16)); at += 4; break;
                    default: out.append(escaped);
                }
            }
            expect('"');
            return out.toString();
        }

        private void space() {
            while (at < text.length() && Character.isWhitespace(text.charAt(at))) {
                at++;
            }
        }

        private boolean peek(char c) {
            if (at < text.length() && text.charAt(at) == c) {
                at++;
                return true;
            }
            return false;
        }

        private void expect(char c) throws IOException {
            if (!peek(c)) {
                throw new IOException("expected '" + c + "' in JSON at " + at);
            }
        }
    }
}
