"""Request and record ids: random, unique, and never one stream in two processes."""

from __future__ import annotations

import os
import re

from app.metering.billing import utc_now
from app.queue.intake import new_record_ids
from app.runtime import ids


def test_random_hex_has_the_asked_length_and_varies() -> None:
    drawn = {ids.random_hex(16) for _ in range(10_000)}
    assert len(drawn) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", value) for value in drawn)
    # Leading zero bits are kept as digits: the length never shrinks.
    assert all(len(ids.random_hex(1)) == 2 for _ in range(1_000))


def test_record_ids_of_one_call_are_distinct_and_time_ordered() -> None:
    now = utc_now()
    first = new_record_ids(now, 1_000)
    assert len(set(first)) == 1_000
    assert all(re.fullmatch(r"ur_[0-9a-f]{28}", value) for value in first)
    later = new_record_ids(now.replace(year=now.year + 1), 1)
    assert later[0] > max(first)


def test_a_forked_child_draws_its_own_stream() -> None:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first draw, to the parent
        os.write(writer, ids.random_hex(16).encode())
        os._exit(0)
    os.close(writer)
    child = os.read(reader, 64).decode()
    os.close(reader)
    os.waitpid(pid, 0)
    parent = ids.random_hex(16)
    # Without the reseed at fork both would draw the same next value.
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != parent
