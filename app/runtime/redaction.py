"""Secrets kept out of every text the sidecar shows: log lines, ``/readyz`` details, errors.

The sidecar never puts a secret into a message itself, but libraries do: psycopg
quotes the offending part of a DSN it cannot parse (the password, when that is
the part), and connection errors may carry a conninfo. So every log line (the
JSON formatter in ``app.runtime.logs``) and every readiness detail passes through
``redact``, which replaces

- each secret registered at start (``register``): the token, the DSN, and the
  DSN's password both as written and percent-decoded;
- a URL's password (``scheme://user:PASSWORD@``), whatever URL it is;
- a libpq ``password=...`` pair;
- a presigned AWS request's signature and session token (``X-Amz-Signature=``,
  ``X-Amz-Security-Token=``): an RDS IAM token (``app.aws.rds_auth``) is one, a
  credential while it lives, and a new one is made for every connection, too many
  to register one by one.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote

MASK = "***"
# Shorter strings would mask ordinary words; a real secret is longer.
_MIN_SECRET = 4
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s@/]*@")
_CONNINFO_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)
_PRESIGNED = re.compile(r"(?P<head>X-Amz-(?:Signature|Security-Token)=)[^&\s'\"]+", re.I)

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()


def register(secret: str | None) -> None:
    """Mask ``secret`` (and, for a URL, its password in both spellings) from now on."""
    if not secret:
        return
    found = {secret}
    if "://" in secret:
        password = _password_of(secret)
        if password:
            found |= {password, unquote(password)}
    global _secrets
    with _lock:
        # Longest first, so that a secret containing another is masked whole.
        known = set(_secrets) | {s for s in found if len(s) >= _MIN_SECRET}
        _secrets = tuple(sorted(known, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with every secret, URL password and conninfo password masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    if "assword" in text or "ASSWORD" in text:
        text = _CONNINFO_PASSWORD.sub(rf"\g<head>{MASK}", text)
    if "-Amz-" in text or "-amz-" in text:
        text = _PRESIGNED.sub(rf"\g<head>{MASK}", text)
    return text


def _password_of(url: str) -> str | None:
    # The raw text between "user:" and the last "@" before any query: a password
    # may hold "/" or "@" unencoded, which urlsplit would read otherwise.
    rest = url.split("://", 1)[1].split("?", 1)[0]
    if "@" not in rest:
        return None
    userinfo = rest.rsplit("@", 1)[0]
    return userinfo.split(":", 1)[1] if ":" in userinfo else None
