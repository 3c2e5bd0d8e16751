"""Runnable examples: ``python -m adaptmoe.examples.<name>``."""
