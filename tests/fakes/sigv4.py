"""Independent AWS Signature Version 4 verifier.

Written from AWS's published algorithm on purpose, without importing botocore's
signer: a verifier that shares code with the signer under test would agree with
its bugs. ``tests/test_fakes.py`` cross-checks this module against botocore.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote_to_bytes

from .keys import IssuedKey, KeyRegistry

__all__ = ["ALGORITHM", "MAX_SKEW", "SignatureFailure", "signing_key", "verify_request"]

ALGORITHM = "AWS4-HMAC-SHA256"
# AWS allows 15 minutes; the fake is stricter so a sidecar that caches signed
# requests for long (e.g. across a retry back-off) is caught.
MAX_SKEW = timedelta(minutes=5)

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. "
    "Consult the service documentation for details."
)
_INVALID_TOKEN = "The security token included in the request is invalid."

HeadersArg = Sequence[tuple[str, str]] | Mapping[str, str]


class SignatureFailure(Exception):
    """A request failed authentication; ``code`` is AWS's error code.

    ``detail`` carries the canonical request and string to sign the fake
    computed, which AWS does not reveal but which makes a failing test readable.
    """

    def __init__(self, code: str, message: str, detail: str = "") -> None:
        """Store AWS's error ``code`` and ``message``."""
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail

    @property
    def status(self) -> int:
        """HTTP status AWS JSON services use for this failure."""
        if self.code in ("MissingAuthenticationTokenException", "IncompleteSignatureException"):
            return 400
        return 403


def _uri_encode(value: str | bytes, *, keep_slash: bool = False) -> str:
    """Percent-encode per AWS's UriEncode: everything but unreserved, upper-case hex."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    out: list[str] = []
    for byte in raw:
        if byte in _UNRESERVED or (keep_slash and byte == ord("/")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def _canonical_uri(raw_path: str) -> str:
    """Canonical URI for non-S3 services: normalised, then each segment encoded again.

    ``raw_path`` is the path as sent on the wire, so encoding it once more yields
    the "double encoding" AWS documents for every service except S3.
    """
    segments: list[str] = []
    for segment in raw_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    if raw_path.endswith("/") and path != "/":
        path += "/"
    return _uri_encode(path, keep_slash=True)


def _canonical_query(query_string: str) -> str:
    """Decode each name/value as sent, re-encode strictly, sort by name then value."""
    pairs: list[tuple[str, str]] = []
    for part in query_string.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        # Decode to bytes, not str, so non-UTF-8 escapes survive the round trip.
        pairs.append((_uri_encode(unquote_to_bytes(name)), _uri_encode(unquote_to_bytes(value))))
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _header_pairs(headers: HeadersArg) -> list[tuple[str, str]]:
    """Lower-case header names, keeping repeats (they are joined with commas later)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(name.lower(), value) for name, value in items]


def _values(pairs: list[tuple[str, str]], name: str) -> list[str]:
    return [value for key, value in pairs if key == name]


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """Derive the SigV4 signing key (kSigning) for one scope."""
    k_date = _hmac(("AWS4" + secret).encode("utf-8"), date)
    k_region = _hmac(k_date, region)
    k_service = _hmac(k_region, service)
    return _hmac(k_service, "aws4_request")


def _parse_authorization(value: str) -> dict[str, str]:
    """Split ``AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...``."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise SignatureFailure(
            "IncompleteSignatureException", f"Unsupported AWS 'algorithm': '{algorithm}'."
        )
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if not sep:
            raise SignatureFailure(
                "IncompleteSignatureException",
                f"'{part.strip()}' not a valid key=value pair (missing equal-sign) in "
                "Authorization header.",
            )
        fields[name] = field_value
    missing = [f for f in ("Credential", "SignedHeaders", "Signature") if not fields.get(f)]
    if missing:
        raise SignatureFailure(
            "IncompleteSignatureException",
            " ".join(f"Authorization header requires '{f}' parameter." for f in missing),
        )
    return fields


def _parse_amz_date(value: str) -> datetime:
    try:
        return datetime.strptime(value, _AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise SignatureFailure(
            "IncompleteSignatureException",
            f"Date must be in ISO-8601 'basic format'. Got '{value}'.",
        ) from None


def verify_request(
    method: str,
    path: str,
    query_string: str,
    headers: HeadersArg,
    body: bytes,
    registry: KeyRegistry,
    region: str,
    service: str,
    now: datetime | None = None,
) -> IssuedKey:
    """Verify a header-signed SigV4 request and return the key that signed it.

    ``path`` and ``query_string`` are as sent on the wire (still percent-encoded).
    Raises :class:`SignatureFailure` with AWS's error code on any problem.
    """
    pairs = _header_pairs(headers)
    auth_values = _values(pairs, "authorization")
    if not auth_values:
        raise SignatureFailure(
            "MissingAuthenticationTokenException", "Missing Authentication Token"
        )
    fields = _parse_authorization(auth_values[0])

    scope_parts = fields["Credential"].split("/")
    if len(scope_parts) != 5:
        raise SignatureFailure(
            "IncompleteSignatureException",
            "Credential must have exactly 5 slash-delimited elements, e.g. "
            f"keyid/date/region/service/term, got '{fields['Credential']}'",
        )
    access_key_id, scope_date, scope_region, scope_service, terminator = scope_parts
    signed_headers = fields["SignedHeaders"].split(";")
    # The signer lists what it signed; AWS canonicalises from the sorted, lower-case
    # set, so a signer that lists headers differently gets a signature mismatch.
    canonical_names = sorted({name.lower() for name in signed_headers})
    for required in ("host", "x-amz-date"):
        if required not in canonical_names:
            raise SignatureFailure(
                "IncompleteSignatureException",
                f"'{required}' must be a signed header; SignedHeaders={fields['SignedHeaders']}",
            )
    tokens = _values(pairs, "x-amz-security-token")
    if tokens and "x-amz-security-token" not in canonical_names:
        raise SignatureFailure(
            "IncompleteSignatureException",
            "'x-amz-security-token' is present in the request but is not a signed header.",
        )
    dates = _values(pairs, "x-amz-date")
    if not dates:
        raise SignatureFailure(
            "IncompleteSignatureException",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        )
    amz_date_text = dates[0].strip()
    amz_date = _parse_amz_date(amz_date_text)

    if terminator != "aws4_request":
        raise SignatureFailure(
            "InvalidSignatureException",
            f"Credential should be scoped with a valid terminator: 'aws4_request', "
            f"not '{terminator}'.",
        )
    if scope_date != amz_date_text[:8]:
        raise SignatureFailure(
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            f"from HTTP: '{scope_date}' != '{amz_date_text[:8]}', from '{amz_date_text}'.",
        )
    if scope_region != region:
        raise SignatureFailure(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{scope_region}'.",
        )
    if scope_service != service:
        raise SignatureFailure(
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{service}'.",
        )

    key = registry.lookup(access_key_id)
    if key is None or key.revoked:
        # AWS answers identically for unknown and revoked keys.
        raise SignatureFailure("UnrecognizedClientException", _INVALID_TOKEN)
    if key.temporary:
        if len(tokens) != 1 or not hmac.compare_digest(
            tokens[0].strip().encode(), (key.session_token or "").encode()
        ):
            raise SignatureFailure("UnrecognizedClientException", _INVALID_TOKEN)
    elif tokens:
        # A long-term key never has a session token; sending one is a client bug.
        raise SignatureFailure("UnrecognizedClientException", _INVALID_TOKEN)
    current = now or datetime.now(UTC)
    if key.expired(current):
        raise SignatureFailure(
            "ExpiredTokenException", "The security token included in the request is expired"
        )

    canonical_headers = ""
    for name in canonical_names:
        values = _values(pairs, name)
        if not values:
            raise SignatureFailure(
                "InvalidSignatureException",
                f"{_BAD_SIGNATURE} (signed header '{name}' is missing from the request)",
            )
        # Trim and collapse internal whitespace runs; repeated headers join with ','.
        canonical_headers += f"{name}:{','.join(' '.join(v.split()) for v in values)}\n"
    canonical_request = "\n".join(
        [
            method.upper(),
            _canonical_uri(path or "/"),
            _canonical_query(query_string),
            canonical_headers,
            ";".join(canonical_names),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{scope_date}/{scope_region}/{scope_service}/aws4_request"
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            amz_date_text,
            scope,
            hashlib.sha256(canonical_request.encode("utf-8")).hexdigest(),
        ]
    )
    expected = hmac.new(
        signing_key(key.secret_access_key, scope_date, scope_region, scope_service),
        string_to_sign.encode("utf-8"),
        hashlib.sha256,
    ).hexdigest()
    if not hmac.compare_digest(expected.encode(), fields["Signature"].strip().encode()):
        raise SignatureFailure(
            "InvalidSignatureException",
            _BAD_SIGNATURE,
            detail=f"CanonicalRequest:\n{canonical_request}\n\nStringToSign:\n{string_to_sign}",
        )

    if amz_date < current - MAX_SKEW:
        earliest = (current - MAX_SKEW).strftime(_AMZ_DATE_FORMAT)
        raise SignatureFailure(
            "InvalidSignatureException",
            f"Signature expired: {amz_date_text} is now earlier than {earliest} "
            f"({current.strftime(_AMZ_DATE_FORMAT)} - 5 min.)",
        )
    if amz_date > current + MAX_SKEW:
        latest = (current + MAX_SKEW).strftime(_AMZ_DATE_FORMAT)
        raise SignatureFailure(
            "InvalidSignatureException",
            f"Signature not yet current: {amz_date_text} is still later than {latest} "
            f"({current.strftime(_AMZ_DATE_FORMAT)} + 5 min.)",
        )
    return key
