"""The AWS backend: sign, send through the pooled client, retry what is safe to retry.

Every action is idempotent as sent (MeterUsage carries its ClientToken, the
others are idempotent by AWS's rules), and the body is serialized once per
call, so each attempt resends byte-identical content: a retry cannot bill twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from app.aws.credentials import CredentialProvider
from app.aws.protocol import CONTENT_TYPE, TARGET_PREFIX, encode, parse_error
from app.aws.signing import sign_headers
from app.backend import BackendResponse
from app.errors import (
    CREDENTIAL_REJECTION_CODES,
    AwsServiceError,
    CredentialsRejected,
    MeteringError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from app.metrics import Metrics

log = logging.getLogger("app.upstream")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter, bounded in attempts and in time."""

    max_attempts: int
    base_delay: float
    max_delay: float
    deadline: float

    def step(self, attempt: int) -> float:
        """The cap of the backoff after ``attempt`` (1-based) failed attempts."""
        return float(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """A delay drawn uniformly from [0, step(attempt)] (AWS's "full jitter")."""
        return rng() * self.step(attempt)


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
        http: httpx.AsyncClient,
        *,
        endpoint: str,
        region: str,
        credentials: CredentialProvider,
        retry: RetryPolicy,
        timeout: httpx.Timeout,
        metrics: Metrics,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = http
        self._url = endpoint + "/"
        self._host = httpx.URL(self._url).netloc.decode("ascii")
        self._region = region
        self._credentials = credentials
        self._retry = retry
        self._timeout = timeout
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
        """Send ``action`` with ``payload``; retry throttling, faults and broken connections.

        ``deadline`` is an absolute ``loop.time()``; without it the policy's
        deadline starts now. Raises a ``MeteringError`` when the call fails.
        """
        policy = self._retry
        loop = asyncio.get_running_loop()
        if max_attempts is not None:
            policy = dataclasses.replace(policy, max_attempts=max_attempts)
        deadline_at = deadline if deadline is not None else loop.time() + policy.deadline
        body = encode(payload)
        base_headers = {
            "Host": self._host,
            "Content-Type": CONTENT_TYPE,
            "X-Amz-Target": f"{TARGET_PREFIX}.{action}",
        }
        refreshed = False
        attempt = 0
        failure: MeteringError | None = None
        while attempt < policy.max_attempts:
            remaining = deadline_at - loop.time()
            if remaining <= 0:
                break
            attempt += 1
            credentials = self._credentials.current()
            headers = sign_headers(
                url=self._url,
                headers=base_headers,
                body=body,
                credentials=credentials,
                region=self._region,
            )
            started = loop.time()
            try:
                async with asyncio.timeout(remaining):
                    response = await self._http.post(
                        self._url, content=body, headers=headers, timeout=self._timeout
                    )
            except (httpx.TransportError, TimeoutError) as exc:
                failure = _transport_failure(exc, action)
                outcome = "timeout" if isinstance(failure, UpstreamTimeout) else "connection_error"
                self._observe(action, outcome, started)
                log.warning(
                    "upstream attempt failed",
                    extra={"action": action, "attempt": attempt, "error": type(exc).__name__},
                )
            else:
                request_id = response.headers.get("x-amzn-requestid")
                if response.status_code == 200:
                    self._observe(action, "success", started)
                    return BackendResponse(_json_object(response.content, action), request_id)
                code, message = parse_error(
                    response.status_code, response.headers, response.content
                )
                if response.status_code == 403 and code in CREDENTIAL_REJECTION_CODES:
                    self._observe(action, "credentials_rejected", started)
                    if refreshed:
                        raise CredentialsRejected(
                            f"AWS refused freshly obtained credentials ({code}: {message})",
                            aws_request_id=request_id,
                        )
                    # One forced refresh and one extra attempt, outside the budget.
                    refreshed = True
                    attempt -= 1
                    log.warning(
                        "AWS refused the credentials; refreshing",
                        extra={"action": action, "code": code, "aws_request_id": request_id},
                    )
                    await self._credentials.force_refresh(credentials)
                    continue
                failure = AwsServiceError(
                    code, message, upstream_status=response.status_code, aws_request_id=request_id
                )
                outcome = (
                    "throttled"
                    if failure.status == 429
                    else "server_error"
                    if failure.retryable
                    else "client_error"
                )
                self._observe(action, outcome, started)
                if not failure.retryable:
                    raise failure
                log.warning(
                    "upstream attempt failed",
                    extra={
                        "action": action,
                        "attempt": attempt,
                        "code": code,
                        "aws_request_id": request_id,
                    },
                )
            if attempt >= policy.max_attempts:
                break
            delay = policy.backoff(attempt)
            if loop.time() + delay >= deadline_at:
                break
            self._metrics.upstream_retries.labels(action, failure.code).inc()
            await self._sleep(delay)
        if failure is None:
            failure = UpstreamTimeout(f"no time left to send {action} to AWS")
        if failure.status == 429:
            failure.retry_after = max(1, math.ceil(policy.step(attempt + 1)))
        raise failure

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
