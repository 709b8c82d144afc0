"""What an AWS answer means for the usage behind it: one classifier, by error code.

AWS's JSON 1.1 services do not keep HTTP statuses apart: credential problems
come back with 400 as often as 403, throttling with 400 or 429, under several
codes. So every answer is sorted here by its *code* (the status only decides
for codes nobody knows), and every path (the REST routes, the wire route, the
queue) acts on the same verdict::

    Fault           what it says                       sync call                queue
    CREDENTIALS     our credentials were refused       refresh, re-sign, retry  keep, retry
    THROTTLING      a request quota is used up         back off, retry          keep, retry
    TRANSIENT       AWS fault, lost connection, timeout back off, retry         keep, retry
    CONFIGURATION   access denied, API disabled, wrong  final (fix the setup)    keep, retry
                    product or region: our setup
    REQUEST         about the request or record itself  final                    final
    UNKNOWN         a code nobody knows                 final, retryable         keep, retry

Only ``REQUEST`` is final for queued usage: anything that may be our fault
keeps the usage until its submission deadline.

ResolveCustomer models its own ``ExpiredTokenException`` (an expired
*registration* token), which is also a credential code. ``ambiguous`` names
such codes: the caller refreshes the credentials once and retries, and the
same answer with fresh credentials is about the request. ``settled`` is that
verdict, for an answer that came with credentials known to be good (the
sandbox's, which has none to refuse), so both backends give a caller the same.

The throttling and transient lists are botocore's own (its standard retry
mode); botocore has no list of credential codes, so that one is ours, from
AWS's common errors, with our other lists in ``app.metering.codes``.
"""

from __future__ import annotations

import functools

from botocore.loaders import Loader
from botocore.retries import standard

from app.metering.codes import CONFIGURATION_CODES, CREDENTIAL_CODES, GENERIC_REQUEST_CODES
from app.metering.errors import Fault

SERVICE_NAME = "meteringmarketplace"
API_VERSION = "2016-01-14"


# botocore's standard retry mode: the codes it treats as throttling, and the
# codes and statuses it treats as transient.
THROTTLING_CODES = frozenset(standard.ThrottledRetryableChecker._THROTTLED_ERROR_CODES)
TRANSIENT_CODES = frozenset(
    {
        *standard.TransientRetryableChecker._TRANSIENT_ERROR_CODES,
        # The metering model's own fault, and the generic ones of AWS's front ends.
        "InternalServiceErrorException",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
    }
)
TRANSIENT_STATUSES = frozenset(standard.TransientRetryableChecker._TRANSIENT_STATUS_CODES)


@functools.cache
def modelled_errors() -> dict[str, frozenset[str]]:
    """The error codes botocore's service model lists for each action."""
    model = Loader().load_service_model(SERVICE_NAME, "service-2", API_VERSION)
    return {
        action: frozenset(error["shape"] for error in operation.get("errors", []))
        for action, operation in model["operations"].items()
    }


@functools.cache
def modelled_faults() -> frozenset[str]:
    """The modelled errors that are AWS's own faults (``"fault": true`` in the model):
    AWS answers them with HTTP 500, every other modelled error with 400 (JSON 1.1)."""
    model = Loader().load_service_model(SERVICE_NAME, "service-2", API_VERSION)
    modelled = frozenset().union(*modelled_errors().values())
    return frozenset(code for code in modelled if model["shapes"][code].get("fault"))


def modelled_status(code: str) -> int:
    """The HTTP status AWS answers a modelled error ``code`` with."""
    return 500 if code in modelled_faults() else 400


@functools.cache
def request_codes() -> frozenset[str]:
    """Codes that are about the request or record: every modelled error that is not
    throttling, transient or our configuration, and the generic validation errors."""
    modelled = frozenset().union(*modelled_errors().values())
    others = THROTTLING_CODES | TRANSIENT_CODES | CONFIGURATION_CODES | CREDENTIAL_CODES
    return (modelled - others) | GENERIC_REQUEST_CODES


def classify(code: str, status: int) -> Fault:
    """Sort one AWS error answer by its code; the HTTP status decides only for unknown codes."""
    if code in THROTTLING_CODES or status == 429:
        return Fault.THROTTLING
    if code in CREDENTIAL_CODES:
        return Fault.CREDENTIALS
    if code in CONFIGURATION_CODES:
        return Fault.CONFIGURATION
    if code in TRANSIENT_CODES:
        return Fault.TRANSIENT
    if code in request_codes():
        return Fault.REQUEST
    if status in TRANSIENT_STATUSES or status >= 500:
        return Fault.TRANSIENT
    return Fault.UNKNOWN


def ambiguous(code: str, action: str) -> bool:
    """A credential code that ``action`` also models as its own error about the request
    (ResolveCustomer's ``ExpiredTokenException``): refresh once, then believe it."""
    return code in CREDENTIAL_CODES and code in modelled_errors().get(action, frozenset())


def settled(code: str, status: int, action: str) -> Fault:
    """What an answer to ``action`` means once the credentials it was signed with are
    known to be good: ``classify``, except that an ``ambiguous`` code is then about the
    request (ResolveCustomer's ``ExpiredTokenException``: 400, not retryable). The
    AWS backend reaches this verdict after refreshing and resending; the sandbox, which
    has no credentials to refuse, starts there."""
    fault = classify(code, status)
    if fault is Fault.CREDENTIALS and ambiguous(code, action):
        return Fault.REQUEST
    return fault
