"""Random ids for requests and queued records, without a system call per id.

``os.urandom`` is a ``getrandom`` system call each time; where system calls are
dear (a sandboxed container runtime: 170 us each was measured on the machines
the benchmarks run on) two of them were a fifth of a single-record intake
call's CPU. These ids need to be unique, not secret: a record id is shown to
whoever may list the queue anyway, and a request id is a log correlation key.
So they come from one generator per process, seeded with 256 bits from the
operating system at import and again in a forked child (two processes must
never share a stream). Collisions between replicas are as unlikely as with
fresh random bytes: 64 random bits per record id beside a millisecond stamp.
"""

from __future__ import annotations

import os
import random

_source = random.Random(os.urandom(32))


def _reseed() -> None:
    _source.seed(os.urandom(32))


os.register_at_fork(after_in_child=_reseed)


def random_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as ``2 * nbytes`` lower-case hex digits."""
    return f"{_source.getrandbits(8 * nbytes):0{2 * nbytes}x}"
