"""Client-side helpers for talking to the fakes from tests.

They use botocore's real signer and clients on purpose: the fakes' verifier is
independent, so agreement between the two is evidence that both are right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from .keys import IssuedKey
from .metering import CONTENT_TYPE, SIGNING_NAME, TARGET_PREFIX

__all__ = ["AWS_ENV_VARS", "isolate_aws_env", "metering_client", "sign", "signed_post"]

# Everything that could make botocore pick up real credentials or config.
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_STS",
    "AWS_ENDPOINT_URL_MARKETPLACE_METERING",
)


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Strip AWS settings from the environment so only what the test sets is used."""
    for name in AWS_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # Never fall through to the EC2 instance metadata service.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")


def metering_client(
    url: str,
    key: IssuedKey,
    *,
    secret: str | None = None,
    region: str = "us-east-1",
    attempts: int = 1,
    validate: bool = True,
) -> Any:
    """A boto3 ``meteringmarketplace`` client for a fake, signing with ``key``.

    ``attempts=1`` disables retries so injected faults surface directly;
    ``validate=False`` lets invalid input reach the fake's own validation.
    """
    return boto3.session.Session().client(
        "meteringmarketplace",
        endpoint_url=url,
        region_name=region,
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=secret or key.secret_access_key,
        aws_session_token=key.session_token,
        config=Config(
            retries={"total_max_attempts": attempts, "mode": "standard"},
            parameter_validation=validate,
        ),
    )


def sign(
    key: IssuedKey,
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    secret: str | None = None,
    token: str | None = None,
    region: str = "us-east-1",
    service: str = SIGNING_NAME,
) -> dict[str, str]:
    """Sign with botocore's SigV4Auth and return the headers to send (incl. ``host``).

    botocore signs ``host`` from the URL but leaves adding the header to the HTTP
    layer, so it is added here for verifiers that are handed the header list.
    """
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    credentials = Credentials(
        key.access_key_id,
        secret or key.secret_access_key,
        token if token is not None else key.session_token,
    )
    SigV4Auth(credentials, service, region).add_auth(request)
    signed = {name: str(value) for name, value in request.headers.items()}
    signed["host"] = httpx.URL(url).netloc.decode("ascii")
    return signed


def signed_post(
    http: httpx.Client,
    url: str,
    key: IssuedKey,
    action: str | None,
    payload: object,
    *,
    secret: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a signed JSON 1.1 request to the metering fake at ``url`` with httpx.

    ``payload`` is JSON-encoded unless it is already ``bytes``.
    """
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    base = {"Content-Type": CONTENT_TYPE}
    if action is not None:
        base["X-Amz-Target"] = f"{TARGET_PREFIX}.{action}"
    base.update(headers or {})
    endpoint = url.rstrip("/") + "/"
    signed = sign(key, "POST", endpoint, body, base, secret=secret)
    return http.post(endpoint, content=body, headers=signed)
