"""Where requests go: the configured override, or the endpoint botocore resolves.

Only settings and botocore's configuration decide this; nothing a caller sends
(Host header, path) ever routes a request.
"""

from __future__ import annotations

import botocore.session
from botocore.configprovider import ConfiguredEndpointProvider
from botocore.endpoint_provider import EndpointProvider
from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

# The name botocore knows AWS Marketplace Metering by (a client's, an endpoint variable's).
SERVICE_NAME = "meteringmarketplace"


def resolve_endpoint(region: str, override: str | None) -> str:
    """The upstream base URL.

    Without ``override``, botocore decides exactly as for a request of an SDK client:
    an endpoint URL configured for the service (``AWS_ENDPOINT_URL_MARKETPLACE_METERING``,
    ``AWS_ENDPOINT_URL``, the profile's ``services`` section or ``endpoint_url``, unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS``), else the service's endpoint rule set for
    the region with ``AWS_USE_FIPS_ENDPOINT`` and ``AWS_USE_DUALSTACK_ENDPOINT`` (and
    their profile settings). No client is made: a client loads botocore's endpoints.json
    (1.2 MB of JSON, several MB of RSS that stay with the process) only to compute a
    legacy URL its requests do not go to. Blocking (it reads botocore's configuration
    and data files): call it once at start-up, from a thread.
    """
    if override:
        return override.rstrip("/")
    session = botocore.session.Session()
    if not session.get_config_variable("ignore_configured_endpoint_urls"):
        configured = ConfiguredEndpointProvider(
            full_config=session.full_config,
            scoped_config=session.get_scoped_config(),
            client_name=SERVICE_NAME,
        ).provide()
        if configured:
            url = str(configured)
            # What botocore refuses to make a client with.
            if not is_valid_endpoint_url(url) and not is_valid_ipv6_endpoint_url(url):
                raise ValueError(f"Invalid endpoint: {url}")
            return url.rstrip("/")
    loader = session.get_component("data_loader")
    rules = EndpointProvider(
        ruleset_data=loader.load_service_model(SERVICE_NAME, "endpoint-rule-set-1"),
        partition_data=loader.load_data("partitions"),
    )
    endpoint = rules.resolve_endpoint(
        Region=region,
        UseFIPS=bool(session.get_config_variable("use_fips_endpoint")),
        UseDualStack=bool(session.get_config_variable("use_dualstack_endpoint")),
    )
    return str(endpoint.url).rstrip("/")
