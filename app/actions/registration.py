"""The entitlement gate of a paid container product: RegisterUsage at start, unready until it
succeeds.

AWS's rule for paid container products: call RegisterUsage when the task or pod
starts, and do not run unentitled. With ``METERING_REGISTER_USAGE=true`` the
lifespan starts an ``EntitlementGate`` (in aws mode, and in sandbox mode too,
where the sandbox answers RegisterUsage locally). It calls RegisterUsage in a
background task through ``MeteringService.register_usage``, so the same checks,
the per-action rate limiter (AWS's 5 RegisterUsage a second), signing and the
one classifier of AWS's answers apply, with ``METERING_PRODUCT_CODE``,
``PublicKeyVersion`` 1 and a fresh ``Nonce`` (a UUID) per attempt.

Until an attempt succeeds ``/readyz`` has a blocking ``entitlement`` check that
fails with the reason, so a native sidecar holds the app back and a classic one
fails readiness; ``GET /v1/entitlement`` says the same. Every failure is tried
again, for ever, since a buyer may subscribe later and AWS may come back:

- one that leaves the answer open (throttling, AWS faults, connections,
  credentials, unknown codes) is retried with capped exponential backoff and
  full jitter;
- a refusal (a fault of the request or of the configuration, such as
  ``CustomerNotEntitledException``, ``PlatformNotSupportedException`` or
  ``AccessDeniedException``) is retried on the same curve but never sooner than
  half its step: it will not change within a second.

The backoff starts at ``METERING_CREDENTIAL_RETRY_INTERVAL`` (5 s by default; the
pace at which the sidecar already waits for AWS to let it in, and a knob tests
can turn down) and is capped at 60 s (``app.runtime.retry.RetryPolicy.gate_pause``: the one
retry policy decides these pauses too). Each failure is logged at
error level with its code, once a minute at most per distinct code: loud, not a
flood.

On success the result (``Signature``, ``PublicKeyRotationTimestamp``, when it
succeeded and the nonce sent) is kept and the task ends. Without a product code
nothing is sent: the gate stays unready and says so, and the sidecar keeps
serving. ``stop()`` cancels the task; the lifespan calls it at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, Field

from app.actions.service import MeteringService
from app.config import Settings
from app.metering.billing import utc_now
from app.metering.errors import Fault, MeteringError
from app.metering.shapes import AwsTimestamp, RegisterUsageRequest, format_timestamp
from app.runtime.retry import RetryPolicy
from app.runtime.supervisor import Spawn, plain_spawn

log = logging.getLogger("app.entitlement")

# The same failure code is logged once per this many seconds at most.
LOG_INTERVAL = 60.0
PUBLIC_KEY_VERSION = 1

NOT_CONFIGURED = "METERING_PRODUCT_CODE is not set"
NOT_ANSWERED = "RegisterUsage not yet answered"

# Answers about the request or our setup: AWS has decided, and only a change on
# its side (a subscription, a fixed setup) can turn them.
_REFUSALS = frozenset({Fault.REQUEST, Fault.CONFIGURATION})


class Entitlement(BaseModel):
    """Whether this product is entitled to run: the gate's state, AWS-style field names."""

    Enabled: bool = Field(
        description="Whether the sidecar calls RegisterUsage at start (METERING_REGISTER_USAGE)."
    )
    Entitled: bool | None = Field(
        None, description="Whether RegisterUsage has succeeded (only when enabled)."
    )
    Signature: str | None = Field(
        None, description="RegisterUsage's signed token (JWT), to verify with AWS's public key."
    )
    PublicKeyRotationTimestamp: AwsTimestamp | None = Field(
        None, description="When AWS next rotates the public key that verifies the Signature."
    )
    RegisteredAt: AwsTimestamp | None = Field(None, description="When RegisterUsage succeeded.")
    Nonce: str | None = Field(None, description="The Nonce sent with the successful call.")
    Reason: str | None = Field(None, description="Why the product is not entitled yet.")
    Since: AwsTimestamp | None = Field(None, description="Since when that reason holds.")


@dataclass(frozen=True, slots=True)
class Registration:
    """A successful RegisterUsage."""

    signature: str | None
    rotation: datetime | None
    registered_at: datetime
    nonce: str


class EntitlementGate:
    """Calls RegisterUsage until it succeeds; says meanwhile why the product may not run."""

    def __init__(
        self,
        service: MeteringService,
        settings: Settings,
        retry: RetryPolicy,
        *,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._service = service
        self._product_code = settings.product_code
        self._retry = retry
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._task: asyncio.Task[None] | None = None
        self.registration: Registration | None = None
        self.reason = NOT_ANSWERED if self._product_code else NOT_CONFIGURED
        self.since = clock()
        self._code: str | None = None
        self._logged: dict[str, float] = {}

    def start(self, spawn: Spawn = plain_spawn) -> None:
        """Start registering in the background, through ``spawn`` (the sidecar's
        supervisor); without a product code, only say so."""
        self.since = self._clock()
        if not self._product_code:
            log.error(
                "METERING_REGISTER_USAGE is on but METERING_PRODUCT_CODE is not set: "
                "RegisterUsage cannot be called and the sidecar stays unready"
            )
            return
        self._task = spawn("entitlement-gate", self._run(self._product_code), finishes=True)

    async def stop(self) -> None:
        """Cancel the attempts under way, if any; return once the task has ended."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def __aenter__(self) -> EntitlementGate:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def entitled(self) -> bool:
        """Whether RegisterUsage has succeeded."""
        return self.registration is not None

    def status(self) -> tuple[bool, str]:
        """``(ok, detail)`` for ``/readyz``."""
        registration = self.registration
        if registration is not None:
            return (
                True,
                f"RegisterUsage succeeded at {format_timestamp(registration.registered_at)}",
            )
        if self.reason == NOT_CONFIGURED:
            return False, self.reason
        return False, f"{self.reason} (since {format_timestamp(self.since)})"

    def view(self) -> Entitlement:
        """What ``GET /v1/entitlement`` answers."""
        registration = self.registration
        if registration is None:
            return Entitlement(Enabled=True, Entitled=False, Reason=self.reason, Since=self.since)
        return Entitlement(
            Enabled=True,
            Entitled=True,
            Signature=registration.signature,
            PublicKeyRotationTimestamp=registration.rotation,
            RegisteredAt=registration.registered_at,
            Nonce=registration.nonce,
        )

    async def _run(self, product_code: str) -> None:
        failures = 0
        while True:
            nonce = str(uuid.uuid4())
            request = RegisterUsageRequest(
                ProductCode=product_code, PublicKeyVersion=PUBLIC_KEY_VERSION, Nonce=nonce
            )
            try:
                answer = await self._service.register_usage(request)
            except MeteringError as exc:
                failures += 1
                refused = self._failed(exc.code, exc.fault, exc.detail, failures)
            except Exception as exc:  # a surprise must not end the gate unready for good
                failures += 1
                refused = self._failed(type(exc).__name__, Fault.UNKNOWN, repr(exc), failures)
            else:
                result = answer.result
                self.registration = Registration(
                    signature=result.Signature,
                    rotation=result.PublicKeyRotationTimestamp,
                    registered_at=self._clock(),
                    nonce=nonce,
                )
                log.info(
                    "RegisterUsage succeeded: entitled",
                    extra={
                        "product_code": product_code,
                        "nonce": nonce,
                        "attempts": failures + 1,
                        "aws_request_id": answer.aws_request_id,
                        "public_key_rotation": (
                            format_timestamp(result.PublicKeyRotationTimestamp)
                            if result.PublicKeyRotationTimestamp
                            else None
                        ),
                    },
                )
                return
            await self._sleep(self._retry.gate_pause(failures, refused=refused, rng=self._rng))

    def _failed(self, code: str, fault: Fault | None, detail: str, failures: int) -> bool:
        """Record a failed attempt and log it (once a minute per code); return whether it
        was a refusal."""
        # A check of our own (fault None) refused the request before it left.
        refused = fault is None or fault in _REFUSALS
        if code != self._code:
            self._code = code
            self.since = self._clock()
        self.reason = f"RegisterUsage {'refused' if refused else 'failing'}: {code}"
        now = asyncio.get_running_loop().time()
        last = self._logged.get(code)
        if last is None or now - last >= LOG_INTERVAL:
            self._logged[code] = now
            log.error(
                "RegisterUsage failed; the product is not entitled to run yet, retrying",
                extra={
                    "code": code,
                    "fault": fault.value if fault else "request",
                    "detail": detail,
                    "attempts": failures,
                    "since": format_timestamp(self.since),
                },
            )
        return refused
