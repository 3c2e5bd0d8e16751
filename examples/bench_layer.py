"""Thin wrapper: ``python examples/bench_layer.py`` == ``python -m adaptmoe.examples.bench_layer``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaptmoe.examples.bench_layer import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
