"""The one classifier: AWS's answers sorted by code, whatever HTTP status carried them."""

from __future__ import annotations

import pytest
from botocore.retries import standard

from app.aws.classify import (
    THROTTLING_CODES,
    ambiguous,
    classify,
    modelled_errors,
    modelled_faults,
    modelled_status,
    request_codes,
    settled,
)
from app.metering.codes import CONFIGURATION_CODES, CREDENTIAL_CODES
from app.metering.errors import Fault


@pytest.mark.parametrize(
    "code",
    [
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "InvalidClientTokenId",
        "IncompleteSignature",
        "SignatureDoesNotMatch",
    ],
)
@pytest.mark.parametrize("status", [400, 403])
def test_credential_codes_are_credentials_with_either_status(code: str, status: int) -> None:
    assert classify(code, status) is Fault.CREDENTIALS


@pytest.mark.parametrize(
    "code",
    ["ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded", "Throttling"],
)
@pytest.mark.parametrize("status", [400, 429])
def test_throttling_codes_are_throttling_with_either_status(code: str, status: int) -> None:
    assert classify(code, status) is Fault.THROTTLING


def test_any_429_is_throttling_and_botocore_lists_are_used() -> None:
    assert classify("Http429", 429) is Fault.THROTTLING
    assert classify("SomethingNew", 429) is Fault.THROTTLING
    # The list is botocore's own, not a copy that would drift from it.
    assert set(standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES) <= THROTTLING_CODES


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("InternalServiceErrorException", 500),
        ("InternalServiceErrorException", 400),
        ("ServiceUnavailableException", 503),
        ("RequestTimeoutException", 400),
        ("SomethingNew", 502),
        ("Http504", 504),
    ],
)
def test_faults_on_awss_side_are_transient(code: str, status: int) -> None:
    assert classify(code, status) is Fault.TRANSIENT


@pytest.mark.parametrize(
    "code",
    [
        "AccessDeniedException",
        "DisabledApiException",
        "InvalidProductCodeException",
        "InvalidEndpointRegionException",
        "CustomerNotEntitledException",
    ],
)
def test_our_setup_is_configuration_not_the_record(code: str) -> None:
    assert classify(code, 400) is Fault.CONFIGURATION
    assert not Fault.CONFIGURATION.final_for_queue


@pytest.mark.parametrize(
    "code",
    [
        "InvalidCustomerIdentifierException",
        "InvalidUsageDimensionException",
        "InvalidUsageAllocationsException",
        "InvalidTagException",
        "InvalidLicenseException",
        "TimestampOutOfBoundsException",
        "DuplicateRequestException",
        "IdempotencyConflictException",
        "InvalidTokenException",
        "ValidationException",
    ],
)
def test_answers_about_the_record_are_final(code: str) -> None:
    assert classify(code, 400) is Fault.REQUEST
    assert Fault.REQUEST.final_for_queue


def test_unknown_codes_are_unknown_and_keep_queued_usage() -> None:
    assert classify("BrandNewException", 400) is Fault.UNKNOWN
    assert classify("Http403", 403) is Fault.UNKNOWN
    assert not Fault.UNKNOWN.final_for_queue
    assert Fault.UNKNOWN.caller_may_retry


def test_every_modelled_error_has_a_verdict_that_is_not_unknown() -> None:
    modelled = set().union(*modelled_errors().values())
    # The model of the service botocore ships (>= 1.44): four actions, 18 errors.
    assert set(modelled_errors()) == {
        "MeterUsage",
        "BatchMeterUsage",
        "ResolveCustomer",
        "RegisterUsage",
    }
    for code in modelled:
        assert classify(code, 400) is not Fault.UNKNOWN, code
    # Only ExpiredTokenException is both a credential code and a modelled error.
    assert modelled & CREDENTIAL_CODES == {"ExpiredTokenException"}
    assert not (request_codes() & (CONFIGURATION_CODES | CREDENTIAL_CODES))


def test_resolve_customers_expired_token_is_ambiguous_elsewhere_it_is_credentials() -> None:
    assert ambiguous("ExpiredTokenException", "ResolveCustomer")
    assert not ambiguous("ExpiredTokenException", "MeterUsage")
    assert not ambiguous("UnrecognizedClientException", "ResolveCustomer")
    assert not ambiguous("InvalidTokenException", "ResolveCustomer")


def test_settled_reads_an_ambiguous_code_as_the_aws_path_finally_does() -> None:
    # With good credentials, ResolveCustomer's ExpiredTokenException is about the token.
    assert settled("ExpiredTokenException", 400, "ResolveCustomer") is Fault.REQUEST
    assert not Fault.REQUEST.caller_may_retry
    # Elsewhere it is our credentials, and anything else reads as classify reads it.
    assert settled("ExpiredTokenException", 400, "MeterUsage") is Fault.CREDENTIALS
    assert settled("ThrottlingException", 400, "ResolveCustomer") is Fault.THROTTLING


def test_modelled_status_is_500_for_awss_own_faults_only() -> None:
    assert modelled_faults() == {"InternalServiceErrorException"}
    assert modelled_status("InternalServiceErrorException") == 500
    assert modelled_status("ThrottlingException") == 400
    assert modelled_status("CustomerNotEntitledException") == 400
