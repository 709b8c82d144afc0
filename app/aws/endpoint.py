"""Where requests go: the configured override, or the endpoint botocore resolves.

Only settings and botocore's configuration decide this; nothing a caller sends
(Host header, path) ever routes a request.
"""

from __future__ import annotations

import botocore.session


def resolve_endpoint(region: str, override: str | None) -> str:
    """The upstream base URL.

    Without ``override``, botocore's endpoint rules decide, honouring
    ``AWS_ENDPOINT_URL_MARKETPLACE_METERING``, ``AWS_ENDPOINT_URL``,
    ``AWS_USE_FIPS_ENDPOINT`` and ``AWS_USE_DUALSTACK_ENDPOINT`` (and their
    profile settings) exactly as an SDK would. Blocking (it loads botocore's
    data files): call it once at start-up, from a thread.
    """
    if override:
        return override.rstrip("/")
    session = botocore.session.Session()
    # Placeholder keys keep botocore from walking the credential chain here.
    client = session.create_client(
        "meteringmarketplace",
        region_name=region,
        aws_access_key_id="placeholder",
        aws_secret_access_key="placeholder",  # noqa: S106 - not a secret, never used
    )
    try:
        return str(client.meta.endpoint_url).rstrip("/")
    finally:
        client.close()
