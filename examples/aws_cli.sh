#!/usr/bin/env bash
# Calls the metering sidecar with the AWS CLI (v1), exactly as you would call AWS.
#
# The sidecar speaks AWS Marketplace Metering's own wire protocol, so the only
# change is --endpoint-url. The keys are placeholders: the sidecar signs each
# call again with its real credentials. If the sidecar was started with
# METERING_AUTH_TOKEN, that token goes as the access key id.
#
#   METERING_URL=http://127.0.0.1:8080 METERING_PRODUCT_CODE=prod-demo ./aws_cli.sh
#
# awscli 1.46.3 (botocore 1.43 inside) has no *AsDecimal quantity options yet,
# so this uses the integer ones. Needs `aws` on PATH and jq.
#
# Settings (environment): METERING_URL, METERING_PRODUCT_CODE, METERING_DIMENSION,
# METERING_REGISTRATION_TOKEN, METERING_AUTH_TOKEN. Prints one JSON line per
# call; exits non-zero on an unexpected error.
set -euo pipefail

url=${METERING_URL:-http://127.0.0.1:8080}
product=${METERING_PRODUCT_CODE:-prod-demo}
dimension=${METERING_DIMENSION:-demo-dimension}
registration_token=${METERING_REGISTRATION_TOKEN:-demo-registration-token}
# A Concurrent Agreements license (from the Agreements data feed, in real life).
license_arn=arn:aws:license-manager::123456789012:license:l-0123456789abcdef

# Placeholders: nothing of them reaches AWS.
export AWS_ACCESS_KEY_ID=${METERING_AUTH_TOKEN:-placeholder}
export AWS_SECRET_ACCESS_KEY=placeholder
export AWS_DEFAULT_REGION=us-east-1
unset AWS_SESSION_TOKEN AWS_PROFILE

metering() { aws meteringmarketplace "$@" --endpoint-url "$url" --output json; }

# emit ACTION: print the CLI's JSON answer (stdin) as one line.
emit() { jq -c --arg action "$1" '{action: $action, result: .}'; }

# expect_error ACTION CODE ARGS...: the call must fail with AWS error CODE.
expect_error() {
    local action=$1 want=$2 stderr status=0
    shift 2
    stderr=$(metering "$@" 2>&1 >/dev/null) || status=$?
    # When AWS (here: the sidecar) answers with an error, the CLI exits non-zero
    # and says "An error occurred (CODE) when calling the ACTION operation: MESSAGE".
    local pattern='An error occurred \(([A-Za-z]+)\) when calling the [A-Za-z]+ operation: (.*)'
    if [[ $status -eq 0 || ! $stderr =~ $pattern || ${BASH_REMATCH[1]} != "$want" ]]; then
        echo "$action: expected $want, got exit $status: $stderr" >&2
        exit 1
    fi
    jq -nc --arg action "$action" --arg code "${BASH_REMATCH[1]}" --arg message "${BASH_REMATCH[2]}" \
        '{action: $action, error: $code, error_type: "ClientError", message: $message}'
}

now=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# MeterUsage: one dimension, one hour, from software in the buyer's account.
metering meter-usage --product-code "$product" --timestamp "$now" \
    --usage-dimension "$dimension" --usage-quantity 2 | emit MeterUsage

# BatchMeterUsage (SaaS, Concurrent Agreements): each record names the buyer's
# account and license, and no --product-code is sent.
records=$(jq -nc --arg now "$now" --arg dimension "$dimension" --arg license "$license_arn" \
    '[{Timestamp: $now, CustomerAWSAccountId: "123456789012", LicenseArn: $license,
       Dimension: $dimension, Quantity: 3}]')
metering batch-meter-usage --usage-records "$records" | emit BatchMeterUsage

# ResolveCustomer: redeem the registration token a buyer arrived with.
metering resolve-customer --registration-token "$registration_token" | emit ResolveCustomer

# RegisterUsage: the entitlement check of a paid container product at launch.
metering register-usage --product-code "$product" --public-key-version 1 \
    --nonce demo-nonce | emit RegisterUsage

# AWS's errors come back as the CLI reports AWS's own.
expect_error ResolveCustomer InvalidTokenException \
    resolve-customer --registration-token invalid-demo

# The sidecar checks what the CLI does not, before anything reaches AWS: here,
# allocations that do not add up to the quantity.
expect_error MeterUsage ValidationException \
    meter-usage --product-code "$product" --timestamp "$now" \
    --usage-dimension "$dimension" --usage-quantity 5 --usage-allocations \
    'AllocatedUsageQuantity=1,Tags=[{Key=team,Value=a}]' \
    'AllocatedUsageQuantity=1,Tags=[{Key=team,Value=b}]'
