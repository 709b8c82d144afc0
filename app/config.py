"""Settings: one typed object, read once, validated at start-up.

Precedence is flags, then ``METERING_*`` environment variables, then defaults.
``app.__main__`` turns flags into keyword arguments, which pydantic-settings
ranks above the environment.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.metering.billing import SubmissionWindows, late_usage_horizon
from app.runtime import redaction

PRODUCT_CODE_PATTERN = re.compile(r"^[-a-zA-Z0-9/=:_.@]*$")

Mode = Literal["aws", "sandbox"]
QueueMode = Literal["saas", "container"]
LogLevel = Literal["debug", "info", "warning", "error"]


def _read_secret(name: str, path: Path) -> str:
    """A secret from a mounted file, stripped; the messages name the file, never the content."""
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {path} is not text") from None
    if not secret:
        raise ValueError(f"{name}: {path} is empty")
    return secret


def _postgresql_dsn(value: SecretStr | None) -> SecretStr | None:
    if value is None or not value.get_secret_value():
        return None
    if not re.match(r"postgres(ql)?://", value.get_secret_value()):
        raise ValueError("must be a postgresql:// URL")
    return value


class Settings(BaseSettings):
    """Every knob of the sidecar. Field descriptions are the ``--help`` text."""

    model_config = SettingsConfigDict(
        env_prefix="METERING_",
        extra="forbid",
        frozen=True,
        # Flags arrive by field name (region=...), the environment by alias.
        populate_by_name=True,
        validate_default=True,
    )

    host: str = Field(
        "127.0.0.1",
        description="Bind address. A sidecar shares its pod's network namespace, "
        "so loopback is the safe default.",
    )
    port: int = Field(8080, ge=0, le=65535, description="Port to listen on (0: any free port).")
    ops_host: str = Field(
        "0.0.0.0",
        description="Bind address of the operations listener (/healthz, /readyz, /metrics "
        "only, no token): reachable by kubelet probes and Prometheus, while the API stays "
        "on its own address.",
    )
    ops_port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="Port of the operations listener; 0 turns it off.",
    )
    max_request_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1048576,
        description="Largest request line and headers a caller may send, in bytes; more "
        "is answered 431 and the connection closed.",
    )
    request_header_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a connection may take to send a request's line and headers; "
        "a slower one is closed.",
    )
    request_body_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a connection may take to send a request's body once its headers "
        "are in (also after an early answer, such as 413); a slower one is closed, answered "
        "408 if nothing was answered yet.",
    )
    keepalive_timeout: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds an idle keep-alive connection is kept open.",
    )
    max_client_connections: int = Field(
        512,
        ge=1,
        le=65536,
        description="Connections each listener holds open at once. A newcomer past it "
        "closes the connection waiting longest on its client (idle, or sending a head or a "
        "body); only when every connection has a request being answered is it refused, 503 "
        "with Retry-After.",
    )
    region: str = Field(
        "us-east-1",
        # Only these names: a bare REGION variable must not move the sidecar.
        validation_alias=AliasChoices("METERING_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
        description="AWS region signed for and whose endpoint is used "
        "(default: AWS_REGION, then AWS_DEFAULT_REGION, then us-east-1).",
        pattern=r"^[a-z]{2}(-[a-z0-9]+)+-\d+$",
    )
    endpoint_url: str | None = Field(
        None,
        description="Upstream override (tests, VPC endpoints). Default: the region's "
        "AWS Marketplace Metering endpoint as botocore resolves it.",
    )
    product_code: str | None = Field(
        None,
        max_length=255,
        description="ProductCode used when a request leaves it out.",
    )
    mode: Mode = Field(
        "aws",
        description="'aws' forwards to AWS; 'sandbox' answers locally with AWS's validation "
        "and idempotency rules and sends nothing.",
    )
    queue_path: Path = Field(
        Path("./metering-queue.sqlite3"),
        description="The durable usage queue's SQLite file. With a shared store (queue_dsn) "
        "the local spool: usage the shared store cannot take at the moment waits there, "
        "answered 202, until it is moved into the store.",
    )
    queue_dsn: SecretStr | None = Field(
        None,
        description="postgresql://... : the queue lives in a PostgreSQL database shared by "
        "every replica (SaaS mode with several replicas), which sums usage across them and "
        "lets exactly one send each grain. Unset: SQLite at queue_path. The DSN may hold a "
        "password: it is never logged.",
    )
    queue_dsn_file: Path | None = Field(
        None,
        description="Read queue_dsn from this file at start (a mounted Secret), instead of "
        "queue_dsn. Surrounding whitespace is ignored.",
    )
    queue_pool_size: int = Field(
        4, ge=1, le=64, description="Connections to the shared PostgreSQL store, at most."
    )
    queue_statement_timeout: float = Field(
        5.0,
        gt=0,
        le=300,
        description="Seconds one statement on the shared PostgreSQL store may take, lock "
        "waits included, before the server cancels it (statement_timeout, lock_timeout); "
        "new usage then goes to the local spool.",
    )
    queue_connect_timeout: float = Field(
        3.0,
        gt=0,
        le=60,
        description="Seconds to open a connection to the shared PostgreSQL store (libpq's "
        "connect_timeout, which counts whole seconds, at least 2).",
    )
    queue_store_deadline: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds one call to the shared PostgreSQL store may take on the "
        "sidecar's side, from waiting for a connection to the commit's answer: a database "
        "that stops answering holds nothing longer. Past it, new usage goes to the local "
        "spool with the same record ids (whether the call committed is settled by id once "
        "the store answers again) and reads answer 503 QueueUnavailable.",
    )
    queue_idle_transaction_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a transaction on the shared PostgreSQL store may sit idle before "
        "the server ends it (idle_in_transaction_session_timeout): a replica that stalls "
        "mid-transaction (paused, cut off) releases the grains it locked for the rest of "
        "the fleet after this.",
    )
    queue_iam_auth: bool = Field(
        False,
        description="Connect to the shared PostgreSQL store with RDS IAM authentication: each "
        "new connection's password is a fresh token signed with the sidecar's own AWS "
        "credentials (the role needs rds-db:connect). The DSN must name the user and carry "
        "no password, and must ask for TLS (sslmode=require, verify-ca or verify-full).",
    )
    queue_iam_region: str | None = Field(
        None,
        description="The region of the RDS database the IAM tokens are signed for. Default: "
        "the region in the DSN's host name (<name>.<id>.<region>.rds.amazonaws.com), else "
        "the sidecar's region.",
        pattern=r"^[a-z]{2}(-[a-z0-9]+)+-\d+$",
    )
    queue_claim_lease: float = Field(
        30.0,
        gt=0,
        le=300,
        description="Seconds a replica holds the grains it is sending in the shared store; a "
        "replica that dies holding them (kill -9, node loss) has them taken over after this.",
    )
    queue_mode: QueueMode = Field(
        "saas",
        description="'saas': due grains go out with BatchMeterUsage; 'container': with "
        "MeterUsage, one meter per pod.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="When set, every call on the API listener but /healthz and /readyz "
        "must carry 'Authorization: Bearer <token>' or 'X-Metering-Token: <token>'. Prefer "
        "auth_token_file: a flag shows in ps.",
    )
    auth_token_file: Path | None = Field(
        None,
        description="Read the token from this file at start (a mounted Secret), instead of "
        "auth_token. Surrounding whitespace is ignored.",
    )
    register_usage: bool = Field(
        False,
        description="Paid container products: call RegisterUsage at start (retried within "
        "AWS's quota) and stay unready until it succeeds; the result is at "
        "GET /v1/entitlement.",
    )
    log_level: LogLevel = Field("info", description="Log level of the JSON log lines.")
    access_log: bool = Field(True, description="One JSON log line per request.")

    connect_timeout: float = Field(3.0, gt=0, description="Seconds to open a connection to AWS.")
    read_timeout: float = Field(10.0, gt=0, description="Seconds to wait for AWS to answer.")
    pool_timeout: float = Field(
        3.0, gt=0, description="Seconds to wait for a free pooled connection."
    )
    max_connections: int = Field(
        16, ge=1, le=1024, description="Connections kept to AWS (the pool size)."
    )

    max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per AWS call, the first included."
    )
    retry_base_delay: float = Field(
        0.1, gt=0, description="First backoff step in seconds (doubles per attempt, full jitter)."
    )
    retry_max_delay: float = Field(5.0, gt=0, description="Cap of one backoff step in seconds.")
    request_deadline: float = Field(
        20.0,
        gt=0,
        description="Overall seconds one REST call may spend on AWS, retries included.",
    )

    wire_max_attempts: int = Field(
        2,
        ge=1,
        le=20,
        description="Attempts per call on the AWS wire-protocol route (POST /). SDKs retry "
        "on their own (3 to 5 attempts), and attempts multiply, so the sidecar adds just one "
        "quick retry for a dropped connection or a fault.",
    )
    wire_request_deadline: float = Field(
        10.0,
        gt=0,
        description="Overall seconds one wire-protocol call may spend on AWS: well inside "
        "the SDKs' own timeouts (botocore's read timeout is 60 s).",
    )
    batch_window_hours: float = Field(
        24.0,
        gt=0,
        le=24,
        description="How long after the event AWS takes a BatchMeterUsage record, in hours. "
        "The current service model (botocore >= 1.44) says 24; the older API reference said "
        "6. Usage of the previous month closes at 06:00 UTC on the 1st regardless. Applies "
        "to grains already queued, too.",
    )
    meter_window_hours: float = Field(
        6.0,
        gt=0,
        le=6,
        description="How long after the event AWS takes a MeterUsage record, in hours "
        "(AWS: 6). Applies to grains already queued, too.",
    )
    future_tolerance: float = Field(
        300.0,
        ge=0,
        le=3600,
        description="Seconds a Timestamp may lie in the future (clock skew) before it is refused.",
    )

    queue_grace: float = Field(
        300.0,
        ge=0,
        le=3600,
        description="Seconds after an hour closes before its grains are sent, for late events.",
    )
    queue_poll_interval: float = Field(
        5.0, gt=0, le=300, description="Longest pause of the queue's send loop, in seconds."
    )
    queue_retry_base_delay: float = Field(
        5.0, gt=0, description="First backoff step in seconds for a grain AWS did not take yet."
    )
    queue_retry_max_delay: float = Field(
        300.0, gt=0, description="Cap of a grain's backoff step in seconds."
    )
    queue_expiry_margin: float = Field(
        300.0,
        ge=0,
        description="Seconds the queue keeps for itself to send a grain: usage is accepted "
        "only if its grain falls due at least this long before AWS's submission deadline. "
        "A grain is given up as expired only once the deadline itself has passed.",
    )
    queue_retention_hours: float = Field(
        168.0,
        gt=0,
        description="Hours settled records stay visible in the queue before they are pruned. "
        "At least the submission window of the queue mode plus an hour and future_tolerance "
        "(25.08 by default in SaaS mode): a grain is kept while late usage of its hour may "
        "still arrive, so that the usage rolls forward instead of opening a second grain.",
    )
    queue_idempotency_hours: float = Field(
        720.0,
        gt=0,
        description="Hours an IdempotencyKey keeps protecting after its record was received, "
        "even once the record itself is pruned (at least the retention plus the 24-hour "
        "submission window).",
    )
    credential_refresh_margin: float = Field(
        900.0,
        gt=0,
        description="Refresh expiring credentials this many seconds before they expire "
        "(or at half their remaining life, if sooner).",
    )
    credential_retry_interval: float = Field(
        5.0,
        gt=0,
        description="Seconds between attempts to obtain credentials while none are available.",
    )
    quota_meter_usage: float = Field(
        10.0,
        ge=0,
        description="MeterUsage requests per second sent to AWS, at most (AWS's quota: 10 per "
        "account and region). With a shared store (queue_dsn) the account's figure: every "
        "replica takes its slots from one budget in the store. With SQLite this sidecar's "
        "own. 0: no limit.",
    )
    quota_batch_meter_usage: float = Field(
        10.0,
        ge=0,
        description="BatchMeterUsage requests per second sent to AWS, at most (AWS's quota: "
        "10 per account and region). With a shared store the account's figure, shared by "
        "every replica; with SQLite this sidecar's own. 0: no limit.",
    )
    quota_register_usage: float = Field(
        5.0,
        ge=0,
        description="RegisterUsage requests per second sent to AWS, at most (AWS's quota: 5 "
        "per account and region). With a shared store the account's figure, shared by every "
        "replica; with SQLite this sidecar's own. 0: no limit.",
    )
    quota_resolve_customer: float = Field(
        5.0,
        ge=0,
        description="ResolveCustomer requests per second sent to AWS, at most. AWS publishes "
        "no quota for it; 5, the lowest of the service's published quotas, is the safe "
        "default. Shared by the fleet like the others. 0: no limit.",
    )
    quota_fallback_divisor: float = Field(
        0.0,
        ge=0,
        description="With a shared store: while the account's quota cannot be reached in the "
        "store, this replica keeps to the quotas divided by this figure (sending never stops "
        "for it). 0: the number of replicas the store last counted (each checks in every 30 "
        "s) plus one, at least 2; 4 before the store was ever reached.",
    )
    events_queue_url: str | None = Field(
        None,
        description="An SQS queue URL that receives AWS Marketplace's subscription events "
        "(EventBridge events from source aws.agreement-marketplace, and/or the SNS topics' "
        "messages, raw or in the SNS envelope). The sidecar long-polls it, applies each event "
        "to its customer registry and deletes it. Unset: no polling (POST /v1/events still "
        "applies events a seller forwards).",
    )
    events_region: str = Field(
        "us-east-1",
        description="The region the events queue is signed for (AWS Marketplace publishes its "
        "events in us-east-1).",
        pattern=r"^[a-z]{2}(-[a-z0-9]+)+-\d+$",
    )
    customer_end_grace: float = Field(
        900.0,
        ge=0,
        le=2700,
        description="Seconds a leaving customer's usage is still taken after the first "
        "ending event (SNS unsubscribe-pending; EventBridge Purchase Agreement Ended or "
        "License Deprovisioned); then every grain of that customer, the current partial hour "
        "included, is sent at once, well inside the hour AWS allows, and later usage for that "
        "customer is refused (409 CustomerSubscriptionEnded).",
    )
    shutdown_timeout: float = Field(
        25.0,
        gt=0,
        description="Seconds to drain in-flight work on SIGTERM before exiting.",
    )

    @field_validator("product_code")
    @classmethod
    def _product_code_pattern(cls, value: str | None) -> str | None:
        if value is not None and not PRODUCT_CODE_PATTERN.fullmatch(value):
            raise ValueError("must match ^[-a-zA-Z0-9/=:_.@]*$")
        return value or None

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url_scheme(cls, value: str | None) -> str | None:
        if not value:
            return None
        # The messages never repeat the value: it may hold a password.
        if not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", value):
            raise ValueError("must be an http:// or https:// URL")
        authority = value.split("://", 1)[1].split("/", 1)[0]
        if "@" in authority:
            raise ValueError(
                "must not carry a user or password (user:password@): the sidecar signs with "
                "AWS credentials, and the URL would be shown on /readyz and in the log"
            )
        if "?" in value or "#" in value:
            raise ValueError(
                "must not carry a query or fragment: AWS signs the path and query it is sent, "
                "and the sidecar sends POST / to the endpoint"
            )
        return value.rstrip("/")

    @field_validator("events_queue_url")
    @classmethod
    def _events_queue_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        # https://sqs.<region>.amazonaws.com/<account>/<name>, or a VPC endpoint's, or a
        # test's http://127.0.0.1:PORT/<account>/<name>. Never repeated: it names an account.
        if not re.fullmatch(r"https?://[^/\s@?#]+/[0-9]{1,20}/[A-Za-z0-9_-]{1,80}(\.fifo)?", value):
            raise ValueError(
                "must be an SQS queue URL: https://sqs.<region>.amazonaws.com/<account>/<name>"
            )
        return value

    @field_validator("queue_dsn")
    @classmethod
    def _dsn_is_postgresql(cls, value: SecretStr | None) -> SecretStr | None:
        return _postgresql_dsn(value)

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        # The model is frozen; a secret read from its file takes the setting's place.
        if self.auth_token_file is not None:
            if self.auth_token is not None:
                raise ValueError("give auth_token or auth_token_file, not both")
            token = _read_secret("auth_token_file", self.auth_token_file)
            object.__setattr__(self, "auth_token", SecretStr(token))
        if self.queue_dsn_file is not None:
            if self.queue_dsn is not None:
                raise ValueError("give queue_dsn or queue_dsn_file, not both")
            dsn = _read_secret("queue_dsn_file", self.queue_dsn_file)
            object.__setattr__(self, "queue_dsn", _postgresql_dsn(SecretStr(dsn)))
        return self

    @model_validator(mode="after")
    def _mask_secrets(self) -> Settings:
        # From the moment the settings hold them, no log line or readiness detail
        # shows them, whoever prints them (app.runtime.redaction).
        for secret in (self.auth_token, self.queue_dsn):
            if secret is not None:
                redaction.register(secret.get_secret_value())
        return self

    @model_validator(mode="after")
    def _delays_are_coherent(self) -> Settings:
        if self.retry_base_delay > self.retry_max_delay:
            raise ValueError("retry_base_delay must not exceed retry_max_delay")
        if self.queue_dsn is not None and self.queue_mode == "container":
            raise ValueError(
                "queue_dsn: container mode meters each pod as its own meter; a store shared "
                "by several pods would merge their usage. Use the pod's own SQLite queue."
            )
        if self.queue_idempotency_hours < self.queue_retention_hours + self.batch_window_hours:
            raise ValueError(
                "queue_idempotency_hours must be at least queue_retention_hours plus "
                "batch_window_hours: a key must outlive its record"
            )
        return self

    @model_validator(mode="after")
    def _retention_outlives_late_usage(self) -> Settings:
        # Once a settled grain is pruned, a late record of its hour finds no grain and
        # opens a fresh one, for an hour AWS has billed already: DuplicateRecord, lost
        # usage. The dispatcher keeps grains that long whatever this says; refusing a
        # shorter setting tells the operator it would not mean what it says.
        window = self.windows().of("meter" if self.queue_mode == "container" else "batch")
        horizon = late_usage_horizon(window, timedelta(seconds=self.future_tolerance))
        hours = horizon.total_seconds() / 3600
        if self.queue_retention_hours < hours:
            raise ValueError(
                f"queue_retention_hours ({self.queue_retention_hours:g}) must be at least "
                f"{hours:.4g}: AWS takes usage of an hour until {window.total_seconds() / 3600:g} "
                "hours after it closes (the submission window of this queue mode, plus "
                "future_tolerance for usage stamped ahead), and a late record that finds its "
                "hour's settled grain pruned would open a second grain for an hour already "
                "sent, which AWS refuses as a DuplicateRecord"
            )
        return self

    @model_validator(mode="after")
    def _iam_auth_dsn(self) -> Settings:
        # The messages never repeat the DSN: it is a secret.
        if not self.queue_iam_auth:
            return self
        if self.queue_dsn is None:
            raise ValueError("queue_iam_auth: needs the shared store (queue_dsn or queue_dsn_file)")
        # Imported here: psycopg costs start time a sidecar on SQLite never needs.
        from psycopg import ProgrammingError
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(self.queue_dsn.get_secret_value())
        except ProgrammingError:
            raise ValueError("queue_dsn: cannot be read as a PostgreSQL DSN") from None
        if params.get("password"):
            raise ValueError(
                "queue_iam_auth: the DSN must carry no password: every connection's password "
                "is a fresh IAM token"
            )
        if params.get("sslmode") not in ("require", "verify-ca", "verify-full"):
            raise ValueError(
                "queue_iam_auth: the DSN must ask for TLS with sslmode=require, verify-ca or "
                "verify-full (best: verify-full with the RDS CA bundle as sslrootcert); RDS "
                "takes IAM tokens over TLS only, and disable, allow or prefer (libpq's "
                "default) could send the token in the clear"
            )
        if not params.get("user"):
            raise ValueError(
                "queue_iam_auth: the DSN must name the database user the tokens are for "
                "(postgresql://USER@host/dbname)"
            )
        host = str(params.get("host") or "")
        if not host or host.startswith("/") or "," in host:
            raise ValueError(
                "queue_iam_auth: the DSN must name one host, the RDS endpoint the tokens are "
                "signed for"
            )
        return self

    def quotas(self) -> dict[str, float]:
        """Requests per second sent to AWS, per action (0: no limit)."""
        return {
            "MeterUsage": self.quota_meter_usage,
            "BatchMeterUsage": self.quota_batch_meter_usage,
            "RegisterUsage": self.quota_register_usage,
            "ResolveCustomer": self.quota_resolve_customer,
        }

    def windows(self) -> SubmissionWindows:
        """How long after the event AWS takes usage, per action."""
        return SubmissionWindows(
            meter=timedelta(hours=self.meter_window_hours),
            batch=timedelta(hours=self.batch_window_hours),
        )
