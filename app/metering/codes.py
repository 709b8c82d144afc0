"""AWS's error codes that no service model lists, by what they say about the usage.

``app.aws.classify`` joins them with the lists botocore keeps (throttling and
transient codes) and with the codes the metering service model declares.
"""

from __future__ import annotations

# AWS's common errors by which it refuses the credentials or the signature
# rather than the request (JSON services and the XML front ends alike).
CREDENTIAL_CODES = frozenset(
    {
        "ExpiredTokenException",
        "ExpiredToken",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "IncompleteSignatureException",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "RequestExpired",
        "InvalidAccessKeyId",
        "InvalidToken",
    }
)

# Answers about our deployment, not about the usage: who we are, where we
# call from, what the account may do. A seller fixes these; the usage waits.
CONFIGURATION_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnauthorizedException",
        "UnauthorizedOperation",
        "OptInRequired",
        "DisabledApiException",
        "InvalidProductCodeException",
        "InvalidEndpointRegionException",
        "InvalidRegionException",
        "InvalidPublicKeyVersionException",
        "PlatformNotSupportedException",
        "CustomerNotEntitledException",
    }
)

# AWS's generic answers about a malformed request, beside the modelled ones.
GENERIC_REQUEST_CODES = frozenset(
    {
        "ValidationException",
        "SerializationException",
        "UnknownOperationException",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "MissingParameter",
        "DryRunOperation",
    }
)
