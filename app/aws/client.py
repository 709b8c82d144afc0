"""The AWS backend: take a quota slot, sign, send through the pooled client, classify, retry.

Every action is idempotent as sent (MeterUsage carries its ClientToken, the
others are idempotent by AWS's rules), and the body is serialized once per
call, so each attempt resends byte-identical content: a retry cannot bill twice.
What an answer means is decided by ``app.aws.classify`` from AWS's error code;
how often and how long to try again by ``app.retry``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from app import __version__
from app.aws.classify import ambiguous, classify
from app.aws.credentials import CredentialProvider
from app.aws.health import UpstreamHealth
from app.aws.protocol import encode, parse_error
from app.aws.quota import ActionQuotas
from app.aws.signing import RequestSigner
from app.backend import BackendResponse
from app.errors import (
    AwsServiceError,
    CredentialsRejected,
    Fault,
    MeteringError,
    QuotaExhausted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metrics import Metrics
from app.retry import Attempts, RetryPolicy

log = logging.getLogger("app.upstream")
USER_AGENT = f"metering-sidecar/{__version__}"

_OUTCOMES = {
    Fault.THROTTLING: "throttled",
    Fault.TRANSIENT: "server_error",
    Fault.CREDENTIALS: "credentials_rejected",
}


def _transport_failure(exc: httpx.TransportError | TimeoutError, action: str) -> MeteringError:
    # httpx-aiohttp maps some aiohttp connection errors (a server that hung up)
    # to httpx timeouts; look at the cause to tell a timeout from a broken line.
    cause = exc.__cause__
    timed_out = isinstance(exc, TimeoutError) or (
        isinstance(exc, httpx.TimeoutException)
        and (cause is None or isinstance(cause, TimeoutError))
    )
    if timed_out:
        return UpstreamTimeout(f"AWS did not answer {action} in time")
    return UpstreamUnavailable(f"could not reach AWS for {action} ({type(exc).__name__})")


class AwsMeteringBackend:
    """Sends actions to AWS Marketplace Metering."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        endpoint: str,
        region: str,
        credentials: CredentialProvider,
        retry: RetryPolicy,
        deadline: float,
        quotas: ActionQuotas,
        health: UpstreamHealth,
        timeout: httpx.Timeout,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._transport = transport
        self._url = httpx.URL(endpoint + "/")
        self._signer = RequestSigner(str(self._url), self._url.netloc.decode("ascii"), region)
        self._credentials = credentials
        self._retry = retry
        self._deadline = deadline
        self._quotas = quotas
        self.health = health
        self._extensions = {"timeout": timeout.as_dict()}
        self._metrics = metrics
        self._sleep = sleep

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        deadline: float | None = None,
        max_attempts: int | None = None,
    ) -> BackendResponse:
        """Send ``action`` with ``payload``; retry credentials, throttling and faults.

        ``deadline`` is an absolute ``loop.time()``; without it the backend's
        own starts now. Raises a ``MeteringError`` (with its ``fault``) when
        the call fails.
        """
        loop = asyncio.get_running_loop()
        policy = self._retry
        if max_attempts is not None:
            policy = dataclasses.replace(policy, max_attempts=max_attempts)
        attempts = Attempts(
            policy, deadline if deadline is not None else loop.time() + self._deadline
        )
        body = encode(payload)
        refreshed = False
        failure: MeteringError | None = None
        while attempts.start(loop.time()):
            try:
                await self._quotas.acquire(action, attempts.deadline)
            except QuotaExhausted:
                self._metrics.quota_refusals.labels(action).inc()
                raise
            credentials = self._credentials.current()
            headers = self._signer.sign(action=action, body=body, credentials=credentials)
            headers["User-Agent"] = USER_AGENT
            started = loop.time()
            try:
                async with asyncio.timeout(max(attempts.deadline - started, 0.001)):
                    response = await self._send(headers, body)
            except (httpx.TransportError, TimeoutError) as exc:
                failure = _transport_failure(exc, action)
                outcome = "timeout" if isinstance(failure, UpstreamTimeout) else "connection_error"
                self._observe(action, outcome, started)
                self.health.failed(Fault.TRANSIENT, failure.code, failure.detail)
                log.warning(
                    "upstream attempt failed",
                    extra={"action": action, "attempt": attempts.made, "error": type(exc).__name__},
                )
            else:
                request_id = response.headers.get("x-amzn-requestid")
                if response.status_code == 200:
                    self._observe(action, "success", started)
                    attempts.succeeded()
                    self.health.succeeded()
                    return BackendResponse(_json_object(response.content, action), request_id)
                code, message = parse_error(
                    response.status_code, response.headers, response.content
                )
                fault = classify(code, response.status_code)
                self._observe(action, _OUTCOMES.get(fault, "client_error"), started)
                if fault is Fault.CREDENTIALS:
                    if not refreshed:
                        # One forced refresh and one more attempt, outside the budget.
                        refreshed = True
                        attempts.repeat()
                        log.warning(
                            "AWS refused the credentials; refreshing",
                            extra={"action": action, "code": code, "aws_request_id": request_id},
                        )
                        await self._credentials.force_refresh(credentials)
                        continue
                    if ambiguous(code, action):
                        # Fresh credentials got the same answer: it is about the request.
                        fault = Fault.REQUEST
                    else:
                        self.health.failed(fault, code, message)
                        raise CredentialsRejected(
                            f"AWS refused freshly obtained credentials for {action} ({code})",
                            aws_request_id=request_id,
                        )
                self.health.failed(fault, code, message)
                failure = AwsServiceError(
                    code,
                    message,
                    upstream_status=response.status_code,
                    fault=fault,
                    aws_request_id=request_id,
                )
                if not fault.retry_within_call:
                    raise failure
                log.warning(
                    "upstream attempt failed",
                    extra={
                        "action": action,
                        "attempt": attempts.made,
                        "code": code,
                        "aws_request_id": request_id,
                    },
                )
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

    async def _send(self, headers: dict[str, str], body: bytes) -> httpx.Response:
        request = httpx.Request(
            "POST", self._url, headers=headers, content=body, extensions=self._extensions
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

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
