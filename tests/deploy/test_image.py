"""The container image: built with buildah on a stand-in base, linted, run and probed.

The work is ``scripts/check-image`` (see its header); this test is how CI runs
it. A first run bootstraps the stand-in base with debootstrap (about a
minute); later runs reuse the cached tarball in ``.tools/image``.
"""

from __future__ import annotations

import os
import signal
import subprocess

from tests.sidecar import REPO

TIMEOUT = 1500  # debootstrap + a full build from nothing, on a slow day


def run_check_image() -> tuple[int, str]:
    """Run the script in its own process group; on a time-out, let it clean up first."""
    process = subprocess.Popen(
        [str(REPO / "scripts" / "check-image")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM runs the script's cleanup (stop the sidecar, remove containers).
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        return -1, f"check-image did not finish within {TIMEOUT} s\n{output}"
    return process.returncode, output


def test_image_builds_runs_and_stops() -> None:
    returncode, output = run_check_image()
    assert returncode == 0, output
    for step in ("hadolint", "build", "inspect", "calls", "stop", "passed"):
        assert f"check-image: {step}" in output, output
