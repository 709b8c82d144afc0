"""The line a sidecar logs once it has started names where both listeners are."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import PRODUCT
from tests.sidecar import Sidecar, free_port, run_sidecar

SANDBOX = {"METERING_MODE": "sandbox", "METERING_PRODUCT_CODE": PRODUCT}


def _started(sidecar: Sidecar) -> dict[str, Any]:
    lines: list[dict[str, Any]] = [
        json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")
    ]
    (started,) = [line for line in lines if line["msg"] == "metering-sidecar started"]
    return started


def test_the_start_line_names_the_api_and_the_operations_listener() -> None:
    port, ops_port = free_port(), free_port()
    env = {**SANDBOX, "METERING_OPS_HOST": "127.0.0.1", "METERING_OPS_PORT": str(ops_port)}
    with run_sidecar(env, port=port) as sidecar:
        line = _started(sidecar)
        assert line["api_listener"] == f"127.0.0.1:{port}"
        assert line["ops_listener"] == f"127.0.0.1:{ops_port}"
        assert line["mode"] == "sandbox"
        # They are where the line says.
        assert sidecar.client.get(f"http://{line['api_listener']}/healthz").status_code == 200
        assert sidecar.client.get(f"http://{line['ops_listener']}/healthz").status_code == 200


def test_the_start_line_says_when_the_operations_listener_is_off() -> None:
    port = free_port()
    with run_sidecar({**SANDBOX, "METERING_OPS_PORT": "0"}, port=port) as sidecar:
        line = _started(sidecar)
        assert line["api_listener"] == f"127.0.0.1:{port}"
        assert line["ops_listener"] == "off"
