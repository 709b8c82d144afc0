"""Credentials from botocore's chain: container endpoint, web identity, none at all."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

from tests.conftest import FAST_RETRIES, PRODUCT, FakeAws
from tests.fakes import FakeContainerCredentials, FakeSTS, serve
from tests.sidecar import run_sidecar


def _meter() -> dict[str, object]:
    return {"UsageDimension": f"dim-{uuid.uuid4().hex[:10]}", "UsageQuantity": 1}


def _base_env(fake: FakeAws) -> dict[str, str]:
    return {
        "METERING_ENDPOINT_URL": fake.url,
        "METERING_PRODUCT_CODE": PRODUCT,
        "AWS_REGION": "us-east-1",
        **FAST_RETRIES,
    }


def test_no_credentials_is_503_for_calls_and_degraded_not_unready(fake_aws: FakeAws) -> None:
    with run_sidecar(_base_env(fake_aws)) as sidecar:
        # Usage is still taken (the queue), and a native sidecar's readiness is its pod's:
        # degraded, never a reason to take the app out of its Service.
        ready = sidecar.client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["credentials"]["ok"] is False
        assert ready.json()["checks"]["credentials"]["blocking"] is False
        queued = sidecar.client.post(
            "/v1/usage-records",
            json={
                "UsageRecords": [{"CustomerIdentifier": "cust-1", "Dimension": "d", "Quantity": 1}]
            },
        )
        assert queued.status_code == 202, queued.text
        assert "metering_credential_expiry_seconds -1.0" in sidecar.client.get("/metrics").text
        response = sidecar.client.post("/v1/meter-usage", json=_meter())
        assert response.status_code == 503
        assert response.json()["code"] == "CredentialsUnavailable"
        assert response.json()["retryable"] is True
        assert sidecar.client.get("/healthz").status_code == 200
    assert fake_aws.metering.requests == []


def test_short_lived_revoked_keys_never_fail_a_request(fake_aws: FakeAws) -> None:
    """Keys live 4 s and each is revoked once a newer one exists: no request may fail."""
    container = FakeContainerCredentials(fake_aws.registry, token="container-auth", lifetime=4)
    stop = threading.Event()

    def revoke_older_keys() -> None:
        while not stop.wait(0.1):
            issued = list(container.issued_keys)
            for key in issued[:-1]:
                fake_aws.registry.revoke(key.access_key_id)

    with serve(container) as creds_server:
        env = {
            **_base_env(fake_aws),
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{creds_server.url}/creds",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "container-auth",
        }
        revoker = threading.Thread(target=revoke_older_keys, daemon=True)
        with run_sidecar(env, wait_ready=True) as sidecar:
            revoker.start()
            statuses = []
            deadline = time.monotonic() + 9
            while time.monotonic() < deadline:
                statuses.append(sidecar.client.post("/v1/meter-usage", json=_meter()).status_code)
                time.sleep(0.05)
            # Revoke every key the endpoint handed out at once (not the session's
            # other keys): the next request is refused, refreshes and succeeds.
            for key in list(container.issued_keys):
                fake_aws.registry.revoke(key.access_key_id)
            statuses.append(sidecar.client.post("/v1/meter-usage", json=_meter()).status_code)
            stop.set()
            revoker.join()
            log = sidecar.log()
        assert set(statuses) == {200}, statuses
        used_keys = {r.access_key_id for r in fake_aws.metering.requests if r.signature_valid}
        # Proactive refreshes replaced the key several times within 9 s.
        assert len(used_keys) >= 3
        assert all(
            r.access_key_id in {k.access_key_id for k in container.issued_keys}
            for r in fake_aws.metering.requests
        )
        assert container.authorizations
        assert set(container.authorizations) == {"container-auth"}
        for key in container.issued_keys:
            assert key.secret_access_key not in log
            assert key.session_token is not None
            assert key.session_token not in log


def test_web_identity_through_local_sts(fake_aws: FakeAws, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.web-identity.token")
    sts = FakeSTS(fake_aws.registry, accepted_tokens={"eyJ.web-identity.token"})
    role = "arn:aws:iam::123456789012:role/metering-sidecar"
    with serve(sts) as sts_server:
        env = {
            **_base_env(fake_aws),
            "AWS_ROLE_ARN": role,
            "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file),
            "AWS_ENDPOINT_URL_STS": sts_server.url,
        }
        with run_sidecar(env, wait_ready=True) as sidecar:
            response = sidecar.client.post("/v1/meter-usage", json=_meter())
            assert response.status_code == 200, response.text
            ready = sidecar.client.get("/readyz").json()
            assert "web-identity" in ready["checks"]["credentials"]["detail"]
    assert sts.calls
    assert sts.calls[0].role_arn == role
    (request,) = fake_aws.metering.requests
    assert request.signature_valid
    assert request.access_key_id in {k.access_key_id for k in sts.issued_keys}


def test_credentials_arriving_late_make_the_sidecar_ready(fake_aws: FakeAws) -> None:
    container = FakeContainerCredentials(fake_aws.registry, lifetime=3600)
    container.fail_next(3)
    with serve(container) as creds_server:
        env = {
            **_base_env(fake_aws),
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{creds_server.url}/creds",
            "METERING_CREDENTIAL_RETRY_INTERVAL": "0.2",
        }
        with run_sidecar(env) as sidecar:
            assert sidecar.client.get("/readyz").json()["status"] == "degraded"
            deadline = time.monotonic() + 15
            while sidecar.client.get("/readyz").json()["status"] != "ready":
                assert time.monotonic() < deadline, sidecar.log()
                time.sleep(0.1)
            assert sidecar.client.post("/v1/meter-usage", json=_meter()).status_code == 200
