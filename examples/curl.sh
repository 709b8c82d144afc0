#!/usr/bin/env bash
# Calls the metering sidecar's REST API with curl: plain JSON in AWS's field
# names, no SDK and no signing (the sidecar signs with its real credentials).
#
#   METERING_URL=http://127.0.0.1:8080 METERING_PRODUCT_CODE=prod-demo ./curl.sh
#
# Errors are problem documents (application/problem+json) whose "code" is
# AWS's error code, or the sidecar's own (e.g. ValidationError, HTTP 422).
# Needs curl and jq.
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

# A sidecar started with METERING_AUTH_TOKEN wants it as a bearer token.
auth=()
if [[ -n ${METERING_AUTH_TOKEN:-} ]]; then
    auth=(-H "Authorization: Bearer $METERING_AUTH_TOKEN")
fi

# post ROUTE JSON: POST JSON to the sidecar; print the answer (status and body).
post() {
    curl -sS "${auth[@]}" -H 'Content-Type: application/json' -d "$2" \
        -w '\n%{http_code}' "$url$1"
}

# call ACTION ROUTE JSON: the call must succeed; print its result as one line.
call() {
    local answer
    answer=$(post "$2" "$3")
    if [[ ${answer##*$'\n'} != 200 ]]; then
        echo "$1 failed unexpectedly: ${answer//$'\n'/ }" >&2
        exit 1
    fi
    jq -c --arg action "$1" '{action: $action, result: .}' <<<"${answer%$'\n'*}"
}

# expect_error ACTION CODE ROUTE JSON: the call must fail with problem code CODE.
expect_error() {
    local answer body
    answer=$(post "$3" "$4")
    body=${answer%$'\n'*}
    if [[ $(jq -r .code <<<"$body" 2>/dev/null) != "$2" ]]; then
        echo "$1: expected $2, got ${answer//$'\n'/ }" >&2
        exit 1
    fi
    jq -c --arg action "$1" --argjson status "${answer##*$'\n'}" \
        '{action: $action, error: .code, status: $status, message: .detail}' <<<"$body"
}

now=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# MeterUsage: one dimension, one hour, from software in the buyer's account.
# (ProductCode and Timestamp default to the sidecar's product and now.)
call MeterUsage /v1/meter-usage "$(jq -nc --arg p "$product" --arg t "$now" --arg d "$dimension" \
    '{ProductCode: $p, Timestamp: $t, UsageDimension: $d, UsageQuantityAsDecimal: "2.5"}')"

# BatchMeterUsage (SaaS, Concurrent Agreements): each record names the buyer's
# account and license, and no ProductCode is sent.
call BatchMeterUsage /v1/batch-meter-usage "$(jq -nc --arg t "$now" --arg d "$dimension" \
    --arg l "$license_arn" '{UsageRecords: [{Timestamp: $t, CustomerAWSAccountId: "123456789012",
        LicenseArn: $l, Dimension: $d, QuantityAsDecimal: "3.5"}]}')"

# ResolveCustomer: redeem the registration token a buyer arrived with.
call ResolveCustomer /v1/resolve-customer \
    "$(jq -nc --arg r "$registration_token" '{RegistrationToken: $r}')"

# RegisterUsage: the entitlement check of a paid container product at launch.
call RegisterUsage /v1/register-usage \
    "$(jq -nc --arg p "$product" '{ProductCode: $p, PublicKeyVersion: 1, Nonce: "demo-nonce"}')"

# AWS's errors keep AWS's code: HTTP 400, "code": "InvalidTokenException".
expect_error ResolveCustomer InvalidTokenException /v1/resolve-customer \
    '{"RegistrationToken": "invalid-demo"}'

# The sidecar checks AWS's rules before sending anything: allocations that do
# not add up to the quantity are HTTP 422, "code": "ValidationError".
expect_error MeterUsage ValidationError /v1/meter-usage "$(jq -nc --arg d "$dimension" \
    '{UsageDimension: $d, UsageQuantityAsDecimal: "5", UsageAllocations: [
        {AllocatedUsageQuantityAsDecimal: "1", Tags: [{Key: "team", Value: "a"}]},
        {AllocatedUsageQuantityAsDecimal: "1", Tags: [{Key: "team", Value: "b"}]}]}')"
