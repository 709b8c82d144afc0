"""``python -m benchmarks``: the performance goals in one table (see benchmarks/run.py)."""

from benchmarks.run import main

main()
