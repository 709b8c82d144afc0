"""The AWS backend: take a quota slot, sign, send through the pooled client, classify, retry.

Every answer from AWS is reported to the quotas (``ActionQuotas.answered``): a
throttling answer slows this replica down by itself (``app.aws.quota``).

Every action is idempotent as sent (MeterUsage carries its ClientToken, the
others are idempotent by AWS's rules), and the body is serialized once per
call, so each attempt resends byte-identical content: a retry cannot bill twice.
What an answer means is decided by ``app.aws.classify`` from AWS's error code;
how often and how long to try again by ``app.runtime.retry``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from app.actions.backend import BackendResponse
from app.aws.classify import ambiguous, classify
from app.aws.credentials import CredentialProvider
from app.aws.health import UpstreamHealth
from app.aws.http_client import transport_errors
from app.aws.quota import ActionQuotas
from app.aws.signing import CredentialsAuth
from app.metering.errors import (
    AwsServiceError,
    CredentialsRejected,
    Fault,
    MeteringError,
    QuotaExhausted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metering.protocol import CONTENT_TYPE, SIGNING_NAME, TARGET_PREFIX, encode, parse_error
from app.runtime.metrics import Metrics
from app.runtime.retry import Attempts

log = logging.getLogger("app.upstream")

# What a call tries again, with backoff: not a refusal of fresh credentials.
_RETRIED = frozenset({Fault.THROTTLING, Fault.TRANSIENT})
_OUTCOMES = {
    Fault.THROTTLING: "throttled",
    Fault.TRANSIENT: "server_error",
    Fault.CREDENTIALS: "credentials_rejected",
}


class AwsMeteringBackend:
    """Sends actions to AWS Marketplace Metering."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        endpoint: str,
        region: str,
        credentials: CredentialProvider,
        quotas: ActionQuotas,
        health: UpstreamHealth,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._client = client
        self._url = httpx.URL(endpoint + "/")
        self._region = region
        self._credentials = credentials
        self._quotas = quotas
        self.health = health
        self._metrics = metrics
        self._sleep = sleep

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        attempts: Attempts,
    ) -> BackendResponse:
        """Send ``action`` with ``payload`` within ``attempts`` (the call's share of the
        one retry policy): throttling and faults are retried, refused credentials
        refreshed and resent once, each request an attempt. Raises a
        ``MeteringError`` (with its ``fault``) when the call fails.
        """
        loop = asyncio.get_running_loop()
        body = encode(payload)

        async def take_slot() -> None:
            try:
                await self._quotas.acquire(action, attempts.deadline)
            except QuotaExhausted:
                self._metrics.quota_refusals.labels(action).inc()
                raise

        def refused(code: str) -> None:
            self._observe(action, "credentials_rejected", loop.time())
            log.warning(
                "AWS refused the credentials; refreshing", extra={"action": action, "code": code}
            )

        async def resend_allowed() -> bool:
            # The resend with refreshed credentials is an attempt like any other.
            if not attempts.start(loop.time()):
                return False
            await take_slot()
            return True

        # One per call: a call refreshes refused credentials once.
        auth = CredentialsAuth(
            self._credentials,
            service=SIGNING_NAME,
            region=self._region,
            before_resend=resend_allowed,
            on_refused=refused,
        )
        failure: MeteringError | None = None
        while attempts.start(loop.time()):
            await take_slot()
            started = loop.time()
            try:
                with transport_errors(action):
                    async with asyncio.timeout(max(attempts.deadline - started, 0.001)):
                        response = await self._send(action, body, auth)
            except (UpstreamTimeout, UpstreamUnavailable) as exc:
                failure = exc
                outcome = "timeout" if isinstance(exc, UpstreamTimeout) else "connection_error"
                self._observe(action, outcome, started)
                self.health.failed(Fault.TRANSIENT, exc.code, exc.detail)
                log.warning(
                    "upstream attempt failed",
                    extra={"action": action, "attempt": attempts.made, "error": exc.code},
                )
            else:
                failure = self._answer(action, response, auth, started)
                if failure is None:
                    attempts.succeeded()
                    return BackendResponse(
                        _json_object(response.content, action),
                        response.headers.get("x-amzn-requestid"),
                    )
                if not failure.retryable or failure.fault not in _RETRIED:
                    raise failure
            delay = attempts.retry_delay(loop.time(), throttled=failure.fault is Fault.THROTTLING)
            if delay is None:
                break
            self._metrics.upstream_retries.labels(action, failure.code).inc()
            await self._sleep(delay)
        if failure is None:
            failure = UpstreamTimeout(f"no time left to send {action} to AWS")
        if failure.status == 429:
            failure.retry_after = max(1, math.ceil(attempts.next_ceiling()))
        raise failure

    async def _send(self, action: str, body: bytes, auth: httpx.Auth) -> httpx.Response:
        """One attempt: the client sends the request through ``auth``'s flow (which may
        resend it once, re-signed) and reads the answer, within its ceiling."""
        request = self._client.build_request(
            "POST",
            self._url,
            content=body,
            headers={"X-Amz-Target": f"{TARGET_PREFIX}.{action}", "Content-Type": CONTENT_TYPE},
        )
        return await self._client.send(request, auth=auth)

    def _answer(
        self, action: str, response: httpx.Response, auth: CredentialsAuth, started: float
    ) -> MeteringError | None:
        """What AWS's answer means: ``None`` for success, else the error, classified."""
        request_id = response.headers.get("x-amzn-requestid")
        if response.status_code == 200:
            self._observe(action, "success", started)
            self.health.succeeded()
            self._quotas.answered(action, throttled=False)
            return None
        code, message = parse_error(response.status_code, response.headers, response.content)
        fault = classify(code, response.status_code)
        # Throttling slows this replica down by itself; any other answer lets it climb back.
        self._quotas.answered(action, throttled=fault is Fault.THROTTLING)
        self._observe(action, _OUTCOMES.get(fault, "client_error"), started)
        if fault is Fault.CREDENTIALS:
            if auth.resent and ambiguous(code, action):
                # Fresh credentials got the same answer: it is about the request.
                fault = Fault.REQUEST
            else:
                self.health.failed(fault, code, message)
                which = "freshly obtained credentials" if auth.resent else "the credentials"
                return CredentialsRejected(
                    f"AWS refused {which} for {action} ({code}); the call had no attempt "
                    "left to resend with refreshed ones"
                    if auth.refreshed and not auth.resent
                    else f"AWS refused {which} for {action} ({code})",
                    aws_request_id=request_id,
                )
        self.health.failed(fault, code, message)
        if fault.retry_within_call:
            log.warning(
                "upstream attempt failed",
                extra={"action": action, "code": code, "aws_request_id": request_id},
            )
        return AwsServiceError(
            code,
            message,
            upstream_status=response.status_code,
            fault=fault,
            aws_request_id=request_id,
        )

    def _observe(self, action: str, outcome: str, started: float) -> None:
        self._metrics.upstream_requests.labels(action, outcome).inc()
        elapsed = asyncio.get_running_loop().time() - started
        self._metrics.upstream_duration.labels(action).observe(elapsed)


def _json_object(content: bytes, action: str) -> dict[str, Any]:
    try:
        data = json.loads(content) if content else {}
    except ValueError as exc:
        raise UpstreamUnavailable(f"AWS answered {action} with a body that is not JSON") from exc
    if not isinstance(data, dict):
        raise UpstreamUnavailable(f"AWS answered {action} with a body that is not a JSON object")
    return data
