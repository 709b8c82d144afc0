// Command metering-example-rest meters usage through the sidecar's REST API with
// net/http and encoding/json: no AWS SDK, no signing, the standard library only.
//
//  1. The durable queue (what the README recommends for SaaS usage): POST one usage
//     record to /v1/usage-records. The sidecar stores it (202 means on disk), sums it
//     with the rest of its customer's hour and sends that grain to AWS once, after
//     the hour has closed. The IdempotencyKey makes a resend of the same record
//     harmless. Then GET /v1/usage-records/{id} shows where the record stands.
//  2. One direct call: POST /v1/batch-meter-usage, answered with AWS's result.
//  3. Usage the sidecar refuses (too late for AWS), to show a problem document.
//
// Records are in the Concurrent Agreements form: the buyer's CustomerAWSAccountId
// and the LicenseArn, no ProductCode.
//
// Errors are problem documents (application/problem+json): "code" (AWS's error code,
// or the sidecar's own), "detail", and "retryable": whether the same request may
// succeed later. A retryable one is sent again after its Retry-After.
//
//	METERING_URL=http://127.0.0.1:8080 go run main.go
//
// Settings (environment): METERING_URL (default http://127.0.0.1:8080),
// METERING_TOKEN (the sidecar's METERING_AUTH_TOKEN, sent as a bearer token),
// METERING_DIMENSION. Prints one JSON line per answer; exits 1 on an unexpected
// problem.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"strconv"
	"time"
)

// The buyer's account and license (from the Agreements data feed, in real life).
const (
	customerAccount = "123456789012"
	licenseArn      = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
	attempts        = 5
)

// Problem is a problem document the sidecar answered with (or a connection that failed).
type Problem struct {
	Status     int     `json:"status"`
	Code       string  `json:"code"`
	Detail     string  `json:"detail"`
	Retryable  bool    `json:"retryable"`
	RetryAfter float64 `json:"-"`
}

func (p *Problem) Error() string { return p.Code + ": " + p.Detail }

// Client calls one sidecar.
type Client struct {
	URL   string
	Token string
	HTTP  *http.Client
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// emit prints one JSON line: {"action": ..., plus fields}.
func emit(action string, fields map[string]any) {
	fields["action"] = action
	line, _ := json.Marshal(fields)
	fmt.Println(string(line))
}

func newKey() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return "example-" + hex.EncodeToString(b)
}

// Call sends a request and decodes the answer into out; on a retryable problem it
// waits and sends the very same request again. (For /v1/meter-usage, resend the
// ClientToken and Timestamp a retryable problem carries: AWS then answers the
// resend as the same request.)
func (c *Client) Call(action, method, path string, body, out any) error {
	var payload []byte
	if body != nil {
		var err error
		if payload, err = json.Marshal(body); err != nil {
			return err
		}
	}
	for attempt := 1; ; attempt++ {
		problem := c.send(method, path, payload, out)
		if problem == nil {
			return nil
		}
		wait := problem.RetryAfter
		if wait == 0 {
			wait = 0.5 * math.Pow(2, float64(attempt-1))
		}
		wait = math.Min(wait, 30)
		retry := problem.Retryable && attempt < attempts
		fields := map[string]any{
			"problem":   problem.Code,
			"status":    problem.Status,
			"detail":    problem.Detail,
			"retryable": problem.Retryable,
		}
		if retry {
			fields["retry_in"] = wait
		}
		emit(action, fields)
		if !retry {
			return problem
		}
		time.Sleep(time.Duration(wait * float64(time.Second)))
	}
}

// send makes one attempt: nil, with out filled in, or the problem.
func (c *Client) send(method, path string, payload []byte, out any) *Problem {
	request, err := http.NewRequest(method, c.URL+path, bytes.NewReader(payload))
	if err != nil {
		return &Problem{Code: "BadRequest", Detail: err.Error()}
	}
	request.Header.Set("Content-Type", "application/json")
	if c.Token != "" {
		request.Header.Set("Authorization", "Bearer "+c.Token)
	}
	response, err := c.HTTP.Do(request)
	if err != nil { // the sidecar not up yet, or restarting
		return &Problem{Code: "ConnectionFailed", Detail: err.Error(), Retryable: true}
	}
	defer response.Body.Close()
	if response.StatusCode >= 200 && response.StatusCode < 300 {
		if err := json.NewDecoder(response.Body).Decode(out); err != nil {
			return &Problem{Status: response.StatusCode, Code: "UnreadableAnswer", Detail: err.Error()}
		}
		return nil
	}
	problem := &Problem{Status: response.StatusCode}
	if err := json.NewDecoder(response.Body).Decode(problem); err != nil {
		problem.Code, problem.Detail = "UnreadableAnswer", err.Error()
	}
	if seconds, err := strconv.ParseFloat(response.Header.Get("Retry-After"), 64); err == nil {
		problem.RetryAfter = seconds
	}
	return problem
}

// UsageRecord is a record in the Concurrent Agreements form.
type UsageRecord struct {
	Timestamp            string `json:"Timestamp,omitempty"`
	CustomerAWSAccountId string `json:"CustomerAWSAccountId"`
	LicenseArn           string `json:"LicenseArn"`
	Dimension            string `json:"Dimension"`
	QuantityAsDecimal    string `json:"QuantityAsDecimal"`
	IdempotencyKey       string `json:"IdempotencyKey,omitempty"` // the queue's, not AWS's
}

type usageRecords struct {
	UsageRecords []UsageRecord `json:"UsageRecords"`
}

func main() {
	client := &Client{
		URL:   env("METERING_URL", "http://127.0.0.1:8080"),
		Token: os.Getenv("METERING_TOKEN"),
		HTTP:  &http.Client{Timeout: 30 * time.Second},
	}
	dimension := env("METERING_DIMENSION", "demo-dimension")
	fail := func(err error) {
		var problem *Problem
		if !errors.As(err, &problem) {
			fmt.Fprintln(os.Stderr, err)
		}
		os.Exit(1)
	}

	// 1. The durable queue. Use your own event's id as the IdempotencyKey.
	record := UsageRecord{
		CustomerAWSAccountId: customerAccount,
		LicenseArn:           licenseArn,
		Dimension:            dimension,
		QuantityAsDecimal:    "1.5",
		IdempotencyKey:       newKey(),
	}
	var queued struct {
		Accepted []struct{ Id, Status, Hour string }
	}
	if err := client.Call("QueueUsage", "POST", "/v1/usage-records",
		usageRecords{[]UsageRecord{record}}, &queued); err != nil {
		fail(err)
	}
	receipt := queued.Accepted[0]
	emit("QueueUsage", map[string]any{"id": receipt.Id, "status": receipt.Status, "hour": receipt.Hour})
	var view struct{ Id, Status string }
	if err := client.Call("GetUsageRecord", "GET", "/v1/usage-records/"+receipt.Id, nil, &view); err != nil {
		fail(err)
	}
	emit("GetUsageRecord", map[string]any{"id": view.Id, "status": view.Status})

	// 2. One direct call. The Timestamp is fixed once, so a retry is the same record.
	usage := UsageRecord{
		Timestamp:            time.Now().UTC().Format(time.RFC3339),
		CustomerAWSAccountId: customerAccount,
		LicenseArn:           licenseArn,
		Dimension:            dimension,
		QuantityAsDecimal:    "2.5",
	}
	var answer struct {
		Results []struct {
			Status           string
			MeteringRecordId *string
		}
		UnprocessedRecords []json.RawMessage
	}
	if err := client.Call("BatchMeterUsage", "POST", "/v1/batch-meter-usage",
		usageRecords{[]UsageRecord{usage}}, &answer); err != nil {
		fail(err)
	}
	result := answer.Results[0]
	emit("BatchMeterUsage", map[string]any{
		"status":             result.Status,
		"metering_record_id": result.MeteringRecordId,
		"unprocessed":        len(answer.UnprocessedRecords),
	})

	// 3. Usage from two days ago is past AWS's submission window: the sidecar refuses
	// it at once (422 ValidationError, not retryable) and sends nothing.
	late := record
	late.Timestamp = time.Now().UTC().Add(-48 * time.Hour).Format(time.RFC3339)
	late.IdempotencyKey = newKey()
	err := client.Call("QueueUsage", "POST", "/v1/usage-records",
		usageRecords{[]UsageRecord{late}}, &queued)
	var problem *Problem
	if !errors.As(err, &problem) || problem.Code != "ValidationError" {
		fail(fmt.Errorf("expected a ValidationError, got %v", err))
	}
}
