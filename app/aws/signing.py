"""SigV4 signing with botocore's signer, for exactly the headers the sidecar sends."""

from __future__ import annotations

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

from app.aws.protocol import SIGNING_NAME


def sign_headers(
    *,
    url: str,
    headers: dict[str, str],
    body: bytes,
    credentials: ReadOnlyCredentials,
    region: str,
    service: str = SIGNING_NAME,
) -> dict[str, str]:
    """Return ``headers`` plus ``Authorization``, ``X-Amz-Date`` and, with a session
    token, ``X-Amz-Security-Token``, signed for a POST of ``body`` to ``url``.

    ``credentials`` is one frozen snapshot, so the key, secret and token can
    never straddle a refresh. A new ``SigV4Auth`` per request: botocore's
    signer keeps per-request state, so sharing one across tasks is unsafe.
    Everything in ``headers`` is signed, so pass only what will be sent.
    """
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(credentials, service, region).add_auth(request)
    return dict(request.headers.items())
