"""The four metering actions as callers see them: defaults, local checks, then the backend.

Shared by the REST routes and the AWS wire-protocol route, and by both
backends (AWS and sandbox), so every path applies the same rules.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from app.actions.backend import MeteringBackend
from app.config import Settings
from app.metering.billing import utc_now
from app.metering.errors import AwsServiceError, FieldError, MeteringError, RequestInvalid
from app.metering.grains import batch_grain_id_of
from app.metering.limits import BATCH_MAX_BYTES
from app.metering.protocol import encode
from app.metering.rules import check_batch_meter_usage, check_meter_usage
from app.metering.shapes import (
    BatchMeterUsageRequest,
    BatchMeterUsageResult,
    DryRunResult,
    MeterUsageRequest,
    MeterUsageResult,
    RegisterUsageRequest,
    RegisterUsageResult,
    ResolveCustomerRequest,
    ResolveCustomerResult,
    UsageRecordEcho,
    UsageRecordResult,
    format_timestamp,
)
from app.runtime.metrics import Metrics
from app.runtime.retry import Attempts, CallLimits, RetryPolicy

ResultT = TypeVar("ResultT")
log = logging.getLogger("app.actions")


class CustomerRegistry(Protocol):
    """The customer registry, as the actions use it (the usage queue keeps it)."""

    async def record_resolved(self, answer: ResolveCustomerResult) -> None:
        """Register a ResolveCustomer answer; raises when it cannot be written."""

    async def check_batch(self, payload: Mapping[str, Any]) -> None:
        """Raise a ``MeteringError`` (409) if a BatchMeterUsage call has records of
        customers whose subscription ended, or under a second form of one customer."""


@dataclass(frozen=True, slots=True)
class CallProfile:
    """How hard one caller's call is tried (limits of the one retry policy), and how a
    DryRun answers.

    REST callers get the sidecar's full retries. SDKs on the wire protocol
    retry on their own, so there the sidecar tries less (attempts multiply)
    and answers a DryRun with AWS's own ``DryRunOperation`` error.
    """

    limits: CallLimits
    dry_run_is_error: bool = False


@dataclass(frozen=True, slots=True)
class Answer(Generic[ResultT]):
    """A result and the id AWS gave the request that produced it."""

    result: ResultT
    aws_request_id: str | None


def _name_what_was_sent(error: MeteringError, sent: MeterUsageRequest) -> None:
    """A retryable failure of MeterUsage names the ClientToken and Timestamp it was sent
    with: resending exactly those is idempotent at AWS, a fresh token may bill twice."""
    if error.retryable and sent.ClientToken is not None and sent.Timestamp is not None:
        error.extensions["ClientToken"] = sent.ClientToken
        error.extensions["Timestamp"] = format_timestamp(sent.Timestamp)


class MeteringService:
    """Applies defaults and checks, calls the backend, shapes the results."""

    def __init__(
        self,
        backend: MeteringBackend,
        settings: Settings,
        metrics: Metrics,
        retry: RetryPolicy,
        *,
        clock: Callable[[], datetime] = utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._future_tolerance = timedelta(seconds=settings.future_tolerance)
        self._windows = settings.windows()
        self._retry = retry
        self.rest_profile = CallProfile(retry.rest)
        self.wire_profile = CallProfile(retry.wire, dry_run_is_error=True)
        self._registry: CustomerRegistry | None = None

    def use_registry(self, registry: CustomerRegistry) -> None:
        """Record every ResolveCustomer answer in ``registry`` and check every
        BatchMeterUsage call against it (on the REST and the wire routes alike)."""
        self._registry = registry

    def _attempts(self, profile: CallProfile | None) -> Attempts:
        limits = (profile or self.rest_profile).limits
        return self._retry.attempts(limits, asyncio.get_running_loop().time())

    def prepare_meter_usage(self, request: MeterUsageRequest) -> MeterUsageRequest:
        """Fill in the defaults and check the request; raise ``RequestInvalid`` if it breaks a rule.

        The ClientToken is generated here, once per call, so every retry of
        this call resends the same one.
        """
        now = self._clock()
        prepared = request.model_copy(
            update={
                "ProductCode": request.ProductCode or self._settings.product_code,
                "Timestamp": request.Timestamp or now,
                "ClientToken": request.ClientToken or str(uuid.uuid4()),
            }
        )
        errors = check_meter_usage(
            prepared, now=now, window=self._windows.meter, future_tolerance=self._future_tolerance
        )
        if errors:
            raise RequestInvalid(errors)
        return prepared

    async def meter_usage(
        self, request: MeterUsageRequest, profile: CallProfile | None = None
    ) -> Answer[MeterUsageResult | DryRunResult]:
        """MeterUsage; a DryRun that AWS would accept answers ``{"DryRun": true}``."""
        prepared = self.prepare_meter_usage(request)
        payload = prepared.model_dump(exclude_none=True)
        try:
            response = await self._backend.call(
                "MeterUsage", payload, attempts=self._attempts(profile)
            )
        except AwsServiceError as exc:
            if exc.code == "DryRunOperation" and not (profile and profile.dry_run_is_error):
                return Answer(DryRunResult(), exc.aws_request_id)
            _name_what_was_sent(exc, prepared)
            raise
        except MeteringError as exc:
            _name_what_was_sent(exc, prepared)
            raise
        return Answer(MeterUsageResult.model_validate(response.data), response.request_id)

    def prepare_batch_meter_usage(self, request: BatchMeterUsageRequest) -> dict[str, Any]:
        """Fill in the product, check every rule, and return the payload to send."""
        uses_license = any(r.LicenseArn is not None for r in request.UsageRecords)
        product = request.ProductCode
        if not uses_license:
            product = product or self._settings.product_code
        prepared = request.model_copy(update={"ProductCode": product})
        errors = check_batch_meter_usage(
            prepared,
            now=self._clock(),
            window=self._windows.batch,
            future_tolerance=self._future_tolerance,
        )
        if errors:
            raise RequestInvalid(errors)
        payload = prepared.model_dump(exclude_none=True)
        size = len(encode(payload))
        if size >= BATCH_MAX_BYTES:
            raise RequestInvalid(
                [
                    FieldError(
                        "UsageRecords",
                        f"the call would be {size} bytes; AWS takes under 1 MB per "
                        "BatchMeterUsage (send fewer records or allocations per call)",
                    )
                ]
            )
        return payload

    async def batch_meter_usage(
        self, request: BatchMeterUsageRequest, profile: CallProfile | None = None
    ) -> Answer[BatchMeterUsageResult]:
        """BatchMeterUsage, resending ``UnprocessedRecords`` until done or out of attempts.

        Each round is an attempt of the same call: the rounds and the retries
        within them share the call's attempts, deadline and the retry budget.
        The caller gets one merged result; records still unprocessed when those
        run out are returned in ``UnprocessedRecords``.
        """
        payload = self.prepare_batch_meter_usage(request)
        if self._registry is not None:
            # Before anything is sent: usage of ended customers, or a second form of
            # one customer in an hour, would be refused or billed twice.
            await self._registry.check_batch(payload)
        product = payload.get("ProductCode")
        originals = {batch_grain_id_of(r, product): r for r in payload["UsageRecords"]}
        attempts = self._attempts(profile)
        results: list[dict[str, Any]] = []
        pending: list[Mapping[str, Any]] = payload["UsageRecords"]
        unprocessed: list[Any] = []
        request_id: str | None = None
        rounds = 0
        while True:
            rounds += 1
            call_payload = {**payload, "UsageRecords": pending}
            try:
                response = await self._backend.call(
                    "BatchMeterUsage", call_payload, attempts=attempts
                )
            except MeteringError as exc:
                # Some records already went through: report the rest as
                # unprocessed rather than hide what succeeded.
                if rounds > 1 and exc.retryable:
                    unprocessed = list(pending)
                    break
                raise
            request_id = response.request_id
            results.extend(response.data.get("Results") or [])
            unprocessed = list(response.data.get("UnprocessedRecords") or [])
            if not unprocessed:
                break
            self._metrics.unprocessed_records.inc(len(unprocessed))
            # Resend our own records (byte-identical to the first attempt), not
            # AWS's echo of them.
            pending = [
                originals.get(batch_grain_id_of(echo, product), echo) for echo in unprocessed
            ]
            delay = attempts.retry_delay(asyncio.get_running_loop().time())
            if delay is None:
                break
            await self._sleep(delay)
        result = BatchMeterUsageResult(
            Results=[UsageRecordResult.model_validate(r) for r in results],
            UnprocessedRecords=[UsageRecordEcho.model_validate(r) for r in unprocessed],
        )
        return Answer(result, request_id)

    async def resolve_customer(
        self, request: ResolveCustomerRequest, profile: CallProfile | None = None
    ) -> Answer[ResolveCustomerResult]:
        """ResolveCustomer; the answer is recorded in the customer registry, whose failure
        never fails the call (it is logged and counted)."""
        response = await self._backend.call(
            "ResolveCustomer",
            request.model_dump(exclude_none=True),
            attempts=self._attempts(profile),
        )
        result = ResolveCustomerResult.model_validate(response.data)
        await self._record_customer(result)
        return Answer(result, response.request_id)

    async def _record_customer(self, result: ResolveCustomerResult) -> None:
        if self._registry is None:
            return
        try:
            await self._registry.record_resolved(result)
        except Exception as exc:
            # The buyer is registering now: the answer matters more than the registry.
            # Neither the answer nor the token is logged (the error is the store's).
            log.error(
                "a ResolveCustomer answer was not recorded in the customer registry: usage "
                "of this customer is not checked against its subscription until an event "
                "or another answer names it",
                extra={"error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            self._metrics.events.labels("ResolveCustomer", "failed").inc()
            return
        self._metrics.events.labels("ResolveCustomer", "applied").inc()

    def prepare_register_usage(self, request: RegisterUsageRequest) -> RegisterUsageRequest:
        """Fill in the product; raise ``RequestInvalid`` without one."""
        prepared = request.model_copy(
            update={"ProductCode": request.ProductCode or self._settings.product_code}
        )
        if not prepared.ProductCode:
            raise RequestInvalid(
                [FieldError("ProductCode", "required (no METERING_PRODUCT_CODE is configured)")]
            )
        return prepared

    async def register_usage(
        self, request: RegisterUsageRequest, profile: CallProfile | None = None
    ) -> Answer[RegisterUsageResult]:
        """RegisterUsage."""
        prepared = self.prepare_register_usage(request)
        response = await self._backend.call(
            "RegisterUsage",
            prepared.model_dump(exclude_none=True),
            attempts=self._attempts(profile),
        )
        return Answer(RegisterUsageResult.model_validate(response.data), response.request_id)
