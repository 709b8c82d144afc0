"""A minimal AWS Marketplace Metering upstream for the benchmarks, in a process of its own.

It checks nothing, so that the upstream costs as little as possible: a
BatchMeterUsage (by its ``X-Amz-Target``) is answered with every record it sent
as a success, anything else with a fixed MeterUsage answer. It runs as a
separate process (uvicorn, uvloop, httptools, no access log) so that neither
the benchmark's own clients nor the GIL of the benchmark process share its
time. Run by hand:

    .venv/bin/python -m benchmarks.upstream PORT
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ANSWER = b'{"MeteringRecordId":"bench"}'


BATCH_TARGET = b"AWSMPMeteringService.BatchMeterUsage"


def _batch_answer(body: bytes) -> bytes:
    records = json.loads(body).get("UsageRecords") or []
    results = [
        {"UsageRecord": record, "MeteringRecordId": f"bench-{i}", "Status": "Success"}
        for i, record in enumerate(records)
    ]
    return json.dumps({"Results": results, "UnprocessedRecords": []}).encode()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The cheapest plausible answer (lifespan events are ignored)."""
    if scope["type"] != "http":
        return
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    answer = ANSWER
    if (b"x-amz-target", BATCH_TARGET) in scope["headers"]:
        answer = _batch_answer(b"".join(chunks))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/x-amz-json-1.1"),
                (b"x-amzn-requestid", b"00000000-0000-0000-0000-000000000000"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": answer})


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def run_upstream(timeout: float = 15.0) -> Iterator[tuple[str, int]]:
    """Start the upstream process on a free port; yield (its URL, its pid); stop it after."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.upstream", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"the upstream exited with {process.returncode}:\n{stderr}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the upstream did not listen within {timeout}s") from None
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def main() -> None:
    """Serve on 127.0.0.1:PORT until terminated."""
    import uvicorn

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
