"""What the operations layer needs from whatever answers for AWS: one ``call``.

Two implementations: ``app.actions.upstream.AwsMeteringBackend`` sends to AWS;
``app.actions.sandbox.SandboxBackend`` answers locally with AWS's rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from app.runtime.retry import Attempts


@dataclass(frozen=True, slots=True)
class BackendResponse:
    """A successful answer: the JSON object and AWS's request id, if any."""

    data: dict[str, Any]
    request_id: str | None


class MeteringBackend(Protocol):
    """Performs one AWS Marketplace Metering action."""

    async def call(
        self,
        action: str,
        payload: Mapping[str, Any],
        *,
        attempts: Attempts,
    ) -> BackendResponse:
        """Perform ``action`` within ``attempts`` (the call's share of the one retry
        policy: every request sent is one of them, and none after its deadline).

        Raises ``app.metering.errors.MeteringError`` (``AwsServiceError`` for AWS's own codes).
        """
        ...
