"""RDS IAM authentication for the shared store: a fresh token for every new connection.

With ``METERING_QUEUE_IAM_AUTH`` the DSN holds no password. Each connection the
store's pool opens asks ``RdsTokens`` for one: botocore's own RDS signer
(``botocore.signers.generate_db_auth_token``, what boto3's
``rds.generate_db_auth_token`` runs: a ``connect`` request for the database user,
presigned for the service ``rds-db`` for 15 minutes) with the sidecar's own
credentials, the ``CredentialProvider`` the metering calls sign with (IRSA on EKS,
the task role on ECS), so nothing is configured twice and a refreshed role is used
at once. A token only opens a connection; an open one stays open, and the next
connection gets a new token, so an expired token never matters.

RDS checks the token only over TLS: the settings refuse IAM authentication unless
the DSN asks for it (``sslmode`` ``require``, ``verify-ca`` or ``verify-full``).
A token is a credential while it lives: it never reaches a log line
(``app.runtime.redaction`` masks a presigned request's signature and session token
wherever they appear).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.hooks import HierarchicalEmitter
from botocore.model import ServiceId
from botocore.signers import RequestSigner, generate_db_auth_token

# The region in an RDS endpoint's name: <name>.<id>.<region>.rds.amazonaws.com, for
# instances, Aurora clusters (cluster-..., cluster-ro-...) and RDS Proxy (proxy-...).
_RDS_HOST = re.compile(r"\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)\.rds\.amazonaws\.com(?:\.cn)?$")
# PostgreSQL's port when the DSN names none.
DEFAULT_PORT = 5432


def region_of_host(host: str) -> str | None:
    """The region an RDS endpoint's name carries, or ``None`` (a CNAME, an IP address)."""
    found = _RDS_HOST.search(host.lower().rstrip("."))
    return found.group("region") if found else None


@dataclass(frozen=True, slots=True)
class RdsDatabase:
    """What a token is signed for: the endpoint as the DSN names it, the user, the region."""

    host: str
    port: int
    user: str
    region: str


def database_of(dsn: str, *, region: str | None, default_region: str) -> RdsDatabase:
    """What the tokens for ``dsn`` are signed for (the settings checked the DSN names one
    host and a user): its host, port and user, and ``region``, else the region in the
    host's name, else ``default_region``."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params["host"])
    return RdsDatabase(
        host=host,
        port=int(params.get("port") or DEFAULT_PORT),
        user=str(params["user"]),
        region=region or region_of_host(host) or default_region,
    )


class RdsTokens:
    """A callable that returns a new RDS IAM token each time (the store's password)."""

    def __init__(
        self, database: RdsDatabase, credentials: Callable[[], ReadOnlyCredentials]
    ) -> None:
        self.database = database
        self._credentials = credentials
        # The signer keeps only a weak reference to its event emitter: held here.
        self._events = HierarchicalEmitter()
        self.issued = 0

    def __call__(self) -> str:
        """A token for one new connection, signed with the credentials held now.

        Raises what ``credentials`` raises when there are none (the connection then
        fails, and the pool tries again)."""
        frozen = self._credentials()
        signer = RequestSigner(
            ServiceId("rds"),
            self.database.region,
            "rds-db",
            "v4",
            Credentials(frozen.access_key, frozen.secret_key, frozen.token),
            self._events,
        )
        # generate_db_auth_token is a method of botocore's rds client: all it uses of the
        # client is its request signer and its region.
        client = SimpleNamespace(
            _request_signer=signer, meta=SimpleNamespace(region_name=self.database.region)
        )
        token: str = generate_db_auth_token(
            client,
            DBHostname=self.database.host,
            Port=self.database.port,
            DBUsername=self.database.user,
            Region=self.database.region,
        )
        self.issued += 1
        return token
