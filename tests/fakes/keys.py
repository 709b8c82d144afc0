"""Registry of fake AWS access keys shared by every fake in this package.

The credential fakes (container endpoint, STS) issue keys here and the metering
fake looks them up to verify SigV4 signatures, so a test can revoke or expire a
key in one place and watch the sidecar's reaction end to end.
"""

from __future__ import annotations

import secrets
import string
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

__all__ = ["IssuedKey", "KeyRegistry"]

# Real access key ids are 20 upper-case alphanumerics; sticking to that shape
# keeps any sidecar-side format checks or log redaction honest.
_KEY_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class IssuedKey:
    """One access key as the fake AWS knows it.

    ``session_token`` and ``expiration`` are ``None`` for long-term (``AKIA``)
    keys and set for temporary (``ASIA``) ones.
    """

    access_key_id: str
    secret_access_key: str
    session_token: str | None
    expiration: datetime | None
    principal: str
    revoked: bool = False

    @property
    def temporary(self) -> bool:
        """Whether this is a session (``ASIA``) key that needs its token."""
        return self.session_token is not None

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the key's expiration is at or before ``now`` (default: wall clock)."""
        if self.expiration is None:
            return False
        return self.expiration <= (now or datetime.now(UTC))


class KeyRegistry:
    """Thread-safe store of issued keys.

    Fakes run inside uvicorn threads while the test thread issues, revokes and
    inspects keys, so every access goes through one lock. Keys are immutable
    snapshots; revoking or expiring replaces the stored snapshot.
    """

    def __init__(self) -> None:
        """Create an empty registry."""
        self._lock = threading.Lock()
        self._keys: dict[str, IssuedKey] = {}

    def issue(self, principal: str, lifetime: float | None) -> IssuedKey:
        """Issue a new key for ``principal``.

        ``lifetime`` is in seconds; ``None`` issues a long-term ``AKIA`` key with
        no session token and no expiration.
        """
        temporary = lifetime is not None
        prefix = "ASIA" if temporary else "AKIA"
        key = IssuedKey(
            access_key_id=prefix + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16)),
            secret_access_key=secrets.token_urlsafe(30)[:40],
            # Real session tokens are long opaque base64 blobs; length matters
            # because they travel in a header on every request.
            session_token=secrets.token_urlsafe(300) if temporary else None,
            expiration=(
                # Whole seconds: the credential endpoints serialise to second
                # precision and the expiry the client sees must be the real one.
                datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=lifetime)
                if lifetime is not None
                else None
            ),
            principal=principal,
        )
        with self._lock:
            self._keys[key.access_key_id] = key
        return key

    def revoke(self, access_key_id: str) -> None:
        """Mark one key revoked; unknown ids are ignored."""
        with self._lock:
            key = self._keys.get(access_key_id)
            if key is not None:
                self._keys[access_key_id] = replace(key, revoked=True)

    def revoke_all(self) -> None:
        """Mark every key issued so far revoked."""
        with self._lock:
            for akid, key in self._keys.items():
                self._keys[akid] = replace(key, revoked=True)

    def expire(self, access_key_id: str, at: datetime | None = None) -> None:
        """Move a temporary key's expiration to ``at`` (default: one second ago).

        Lets tests exercise ``ExpiredTokenException`` without sleeping.
        """
        when = at or (datetime.now(UTC) - timedelta(seconds=1))
        with self._lock:
            key = self._keys.get(access_key_id)
            if key is not None:
                self._keys[access_key_id] = replace(key, expiration=when)

    def lookup(self, access_key_id: str) -> IssuedKey | None:
        """Return the current snapshot of a key, or ``None`` if never issued."""
        with self._lock:
            return self._keys.get(access_key_id)

    def issued(self) -> list[IssuedKey]:
        """Return every key in issue order."""
        with self._lock:
            return list(self._keys.values())
