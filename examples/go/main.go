// Command metering-example-go calls the metering sidecar with the AWS SDK for Go (v1).
//
// The sidecar speaks AWS Marketplace Metering's own wire protocol, so the only
// change from calling AWS is the Endpoint. The credentials are placeholders:
// the sidecar signs each call again with its real ones. If the sidecar was
// started with METERING_AUTH_TOKEN, pass that token as the access key id.
//
// Build (Debian: apt-get install golang-go golang-github-aws-aws-sdk-go-dev):
//
//	GO111MODULE=off GOPATH=$PWD/.tools/gopath:/usr/share/gocode go build -o metering-example-go ./examples/go
//
// Debian bookworm ships aws-sdk-go 1.44.133, whose model predates the
// *AsDecimal quantities and Concurrent Agreements (LicenseArn,
// CustomerAWSAccountId). So this program uses the integer quantities and a
// BatchMeterUsage with ProductCode + CustomerIdentifier; newer SDKs can send
// the same fields as the Python and JavaScript examples.
//
// Each result is printed as one JSON line; an unexpected error exits 1.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/aws/aws-sdk-go/aws"
	"github.com/aws/aws-sdk-go/aws/awserr"
	"github.com/aws/aws-sdk-go/aws/credentials"
	"github.com/aws/aws-sdk-go/aws/session"
	"github.com/aws/aws-sdk-go/service/marketplacemetering"
)

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

// emit prints one JSON line: {"action": ..., plus fields}.
func emit(action string, fields map[string]any) {
	fields["action"] = action
	line, err := json.Marshal(fields)
	if err != nil {
		fail(action, err)
	}
	fmt.Println(string(line))
}

func fail(action string, err error) {
	fmt.Fprintf(os.Stderr, "%s failed unexpectedly: %v\n", action, err)
	os.Exit(1)
}

func main() {
	url := env("METERING_URL", "http://127.0.0.1:8080")
	product := env("METERING_PRODUCT_CODE", "prod-demo")
	dimension := env("METERING_DIMENSION", "demo-dimension")
	registrationToken := env("METERING_REGISTRATION_TOKEN", "demo-registration-token")

	sess := session.Must(session.NewSession(&aws.Config{
		Endpoint: aws.String(url), // the sidecar instead of AWS
		Region:   aws.String("us-east-1"),
		// Placeholders: nothing of them reaches AWS.
		Credentials: credentials.NewStaticCredentials(
			env("METERING_AUTH_TOKEN", "placeholder"), "placeholder", ""),
	}))
	client := marketplacemetering.New(sess)
	now := time.Now()

	// MeterUsage: one dimension, one hour, from software in the buyer's account.
	meter, err := client.MeterUsage(&marketplacemetering.MeterUsageInput{
		ProductCode:    aws.String(product),
		Timestamp:      aws.Time(now),
		UsageDimension: aws.String(dimension),
		UsageQuantity:  aws.Int64(2),
	})
	if err != nil {
		fail("MeterUsage", err)
	}
	emit("MeterUsage", map[string]any{"result": meter})

	// BatchMeterUsage (SaaS): up to 25 customer-dimension-hours of one product.
	batch, err := client.BatchMeterUsage(&marketplacemetering.BatchMeterUsageInput{
		ProductCode: aws.String(product),
		UsageRecords: []*marketplacemetering.UsageRecord{{
			Timestamp:          aws.Time(now),
			CustomerIdentifier: aws.String("demo-customer"),
			Dimension:          aws.String(dimension),
			Quantity:           aws.Int64(3),
		}},
	})
	if err != nil {
		fail("BatchMeterUsage", err)
	}
	emit("BatchMeterUsage", map[string]any{"result": batch})

	// ResolveCustomer: redeem the registration token a buyer arrived with.
	customer, err := client.ResolveCustomer(&marketplacemetering.ResolveCustomerInput{
		RegistrationToken: aws.String(registrationToken),
	})
	if err != nil {
		fail("ResolveCustomer", err)
	}
	emit("ResolveCustomer", map[string]any{"result": customer})

	// RegisterUsage: the entitlement check of a paid container product at launch.
	registered, err := client.RegisterUsage(&marketplacemetering.RegisterUsageInput{
		ProductCode:      aws.String(product),
		PublicKeyVersion: aws.Int64(1),
		Nonce:            aws.String("demo-nonce"),
	})
	if err != nil {
		fail("RegisterUsage", err)
	}
	emit("RegisterUsage", map[string]any{"result": registered})

	// AWS's errors arrive as the SDK's own types: a bad registration token
	// is a *marketplacemetering.InvalidTokenException.
	_, err = client.ResolveCustomer(&marketplacemetering.ResolveCustomerInput{
		RegistrationToken: aws.String("invalid-demo"),
	})
	var invalidToken *marketplacemetering.InvalidTokenException
	if !errors.As(err, &invalidToken) {
		fail("ResolveCustomer (invalid token)", fmt.Errorf("want InvalidTokenException, got %v", err))
	}
	emit("ResolveCustomer", map[string]any{
		"error":      invalidToken.Code(),
		"error_type": fmt.Sprintf("%T", invalidToken),
		"message":    invalidToken.Message(),
	})

	// The sidecar checks what the SDK does not, before anything reaches AWS:
	// here allocations that do not add up to the quantity. ValidationException
	// is not in the SDK's model, so it is an awserr.Error with that code.
	_, err = client.MeterUsage(&marketplacemetering.MeterUsageInput{
		ProductCode:    aws.String(product),
		Timestamp:      aws.Time(now),
		UsageDimension: aws.String(dimension),
		UsageQuantity:  aws.Int64(5),
		UsageAllocations: []*marketplacemetering.UsageAllocation{
			{AllocatedUsageQuantity: aws.Int64(1), Tags: []*marketplacemetering.Tag{
				{Key: aws.String("team"), Value: aws.String("a")}}},
			{AllocatedUsageQuantity: aws.Int64(1), Tags: []*marketplacemetering.Tag{
				{Key: aws.String("team"), Value: aws.String("b")}}},
		},
	})
	var awsErr awserr.Error
	if !errors.As(err, &awsErr) || awsErr.Code() != "ValidationException" {
		fail("MeterUsage (bad allocations)", fmt.Errorf("want ValidationException, got %v", err))
	}
	emit("MeterUsage", map[string]any{
		"error":      awsErr.Code(),
		"error_type": fmt.Sprintf("%T", awsErr),
		"message":    awsErr.Message(),
	})
}
