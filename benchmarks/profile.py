"""Where a path spends its time: py-spy on a sidecar under wrk load.

``--target forward`` (the default): the minimal upstream and an aws-mode sidecar
(``benchmarks.forward``'s ``forward_env``: no quota, no access log), loaded with
``POST /v1/meter-usage``. ``--target intake``: a sandbox sidecar on SQLite
(``benchmarks.ingest``'s ``intake_env``, goal 6's), loaded with single-record
``POST /v1/usage-records``. From 16 connections; meanwhile py-spy samples the
sidecar (``record --nonblocking --format raw``: active samples only). Prints the
top functions by own time (the frame on top of the stack), by inclusive time
(anywhere on the stack), and own time per package, and the CPU each thread took
per request over the load (the event loop's, and the others': for the intake,
the SQLite store's writer). Needs py-spy (``scripts/install-bench-tools`` puts it
in the venv) and ptrace rights over the sidecar (root, or the same user with
ptrace_scope 0). Run:

    ./scripts/bench --profile [--seconds 5]
    .venv/bin/python -m benchmarks.profile [--target intake] [--seconds 5] [--top 15]
        [--raw FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.forward import forward_env, measure_forward
from benchmarks.ingest import intake_env, records_body
from benchmarks.load import load
from benchmarks.upstream import run_upstream
from tests.sidecar import Sidecar, run_sidecar

# Samples per second.
RATE = 200
# The main thread's stacks start in runpy (``python -m app``): the event loop runs there.
MAIN_THREAD_ROOT = "_run_module_as_main"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class Profile:
    """Sample counts: own time per function, inclusive per function, own per package."""

    samples: int
    own: Counter[str]
    inclusive: Counter[str]
    packages: Counter[str]
    other_threads: Counter[str]


def py_spy() -> str:
    """The py-spy executable: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("bench: py-spy not found; run ./scripts/install-bench-tools")
    return found


def _short(file: str) -> str:
    """A frame's file as a module path: ``starlette/routing.py``, ``app/actions/upstream.py``."""
    path = file.replace("\\", "/")
    for marker in ("site-packages/", "/main/app/", "/lib/python3"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            if marker == "/main/app/":
                return "app/" + rest
            if marker == "/lib/python3":
                return rest.split("/", 1)[-1]
            return rest
    return path


def _package(file: str) -> str:
    """``starlette/routing.py`` -> ``starlette``; ``app/actions/upstream.py`` -> ``app/aws``;
    ``threading.py`` -> ``threading``."""
    parts = _short(file).split("/")
    if parts[0] == "app" and len(parts) > 2:
        return "/".join(parts[:2])
    return parts[0].removesuffix(".py")


def _function(frame: str) -> tuple[str, str]:
    """(``function (file)`` without the line number, the file)."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    file = match.group("file")
    return f"{match.group('function')} ({_short(file)})", file


def summarise(raw: str) -> Profile:
    """Aggregate py-spy's raw (collapsed stacks) output, the main thread's only.

    The sidecar's other threads (anyio's worker threads, the SQLite store's
    thread, the default executor) sit blocked on queues during the forward path,
    and py-spy does not always tell that they are idle, so they are counted
    apart in ``other_threads``.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    others: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";")]
        frames = [(name, file) for name, file in frames if file]
        if not frames:
            continue
        leaf_name, leaf_file = frames[-1]
        if not frames[0][0].startswith(MAIN_THREAD_ROOT):
            others[leaf_name] += count
            continue
        total += count
        own[leaf_name] += count
        packages[_package(leaf_file)] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count
    return Profile(total, own, inclusive, packages, others)


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of process ``pid``, by thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            cpu[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return cpu


@dataclass(frozen=True)
class ThreadSplit:
    """CPU microseconds per request: the event loop's thread, every other thread."""

    main_us: float
    others_us: float
    requests: int


def _load(target: str, url: str, pid: int, seconds: int, connections: int) -> int:
    """Requests sent to ``target``'s path (errors fail the run)."""
    if target == "forward":
        return measure_forward(url, pid, seconds=seconds, connections=connections).load.requests
    result = load(
        f"{url}/v1/usage-records", seconds=seconds, connections=connections, body=records_body(1)
    )
    if result.errors:
        raise SystemExit(f"bench: {result.errors} errors loading the intake")
    return result.requests


@contextlib.contextmanager
def _sidecar(target: str) -> Iterator[Sidecar]:
    if target == "forward":
        with (
            run_upstream() as (upstream_url, _),
            run_sidecar(forward_env(upstream_url), wait_ready=True) as sidecar,
        ):
            yield sidecar
        return
    with (
        tempfile.TemporaryDirectory(prefix="bench-profile-queue-") as tmp,
        run_sidecar(
            intake_env({"METERING_QUEUE_PATH": str(Path(tmp) / "queue.sqlite3")}),
            wait_ready=True,
        ) as sidecar,
    ):
        yield sidecar


def record(
    seconds: int, connections: int, raw_path: Path, target: str = "forward"
) -> tuple[str, ThreadSplit]:
    """Load a sidecar on ``target``'s path and sample it with py-spy for ``seconds``;
    the raw samples and the CPU per request by thread over that load."""
    with _sidecar(target) as sidecar:
        pid = sidecar.process.pid
        _load(target, sidecar.url, pid, 1, connections)
        before = thread_cpu(pid)
        spy = subprocess.Popen(
            [
                py_spy(),
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(seconds),
                "--rate",
                str(RATE),
                # Reads the stacks without stopping the process: sampling then does
                # not stretch the socket writes it lands in.
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(raw_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        sent: list[int] = []
        loader = threading.Thread(
            target=lambda: sent.append(_load(target, sidecar.url, pid, seconds + 1, connections))
        )
        loader.start()
        _, stderr = spy.communicate(timeout=seconds + 60)
        loader.join()
        after = thread_cpu(pid)
        if spy.returncode != 0:
            raise SystemExit(f"bench: py-spy failed ({spy.returncode}):\n{stderr}")
    requests = max(1, sent[0] if sent else 0)
    spent = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    main_us = spent.get(pid, 0.0) / requests * 1e6
    others_us = sum(cpu for tid, cpu in spent.items() if tid != pid) / requests * 1e6
    return raw_path.read_text(), ThreadSplit(main_us, others_us, requests)


# Inclusive shares above this are the framework's trunk (uvicorn -> middleware ->
# router -> route), on nearly every stack; the inclusive list leaves them out.
TRUNK_SHARE = 0.7


def format_profile(profile: Profile, top: int) -> str:
    """The top lists, as percentages of the main thread's active samples."""
    total = max(1, profile.samples)
    trunk = [name for name, count in profile.inclusive.items() if count / total >= TRUNK_SHARE]
    below = Counter({k: v for k, v in profile.inclusive.items() if v / total < TRUNK_SHARE})
    in_app = Counter({k: v for k, v in below.items() if " (app/" in k})
    lines = [f"{profile.samples} active samples of the main (event loop) thread"]
    for title, counter in (
        ("own time (top of stack), by package", profile.packages),
        ("own time (top of stack), by function", profile.own),
        (
            f"inclusive time (anywhere on the stack), by function; {len(trunk)} framework "
            f"trunk frames on >= {TRUNK_SHARE:.0%} of stacks left out",
            below,
        ),
        ("inclusive time, the sidecar's own functions (app/)", in_app),
    ):
        lines.append(f"\n{title}:")
        for name, count in counter.most_common(top):
            lines.append(f"  {100 * count / total:5.1f}%  {name}")
    if profile.other_threads:
        lines.append("\nother threads (left out above; blocked in queue waits when idle):")
        for name, count in profile.other_threads.most_common(3):
            lines.append(f"  {count:6d} samples  {name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Record and print the summary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--target", choices=("forward", "intake"), default="forward")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output in this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        raw_path = args.raw or Path(tmp) / "profile.txt"
        raw, split = record(args.seconds, args.connections, raw_path, args.target)
    print(format_profile(summarise(raw), args.top))
    print(
        f"\nCPU per request over the load ({split.requests:,} requests, py-spy sampling): "
        f"event loop thread {split.main_us:,.0f} us, other threads {split.others_us:,.0f} us"
    )


if __name__ == "__main__":
    main()
