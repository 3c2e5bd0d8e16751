"""Spies on the native extension's calls, for the GPU tests."""
from __future__ import annotations


def served_natively(monkeypatch, function: str = "moe_forward_nograd_gathered") -> list[bool]:
    """Whether each later call of the extension's ``function`` was served (a non-empty result:
    the gathered forwards return nothing when no registered Triton variant fits)."""
    from adaptmoe import ops
    native, served = ops._native.load(), []
    real = getattr(native, function)

    def spy(*args):
        out = real(*args)
        served.append(bool(out))
        return out
    monkeypatch.setattr(native, function, spy)
    return served
