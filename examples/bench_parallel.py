"""Thin wrapper: ``torchrun --nproc_per_node=2 examples/bench_parallel.py`` == ``-m adaptmoe.examples.bench_parallel``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaptmoe.examples.bench_parallel import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
