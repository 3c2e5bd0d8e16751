"""Thin wrapper: ``python examples/serve.py`` == ``python -m adaptmoe.examples.serve``."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from adaptmoe.examples.serve import main  # noqa: E402

if __name__ == "__main__":
    main()
