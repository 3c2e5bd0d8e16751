"""bf16 operands and tolerance checks shared by the Triton kernel GPU tests."""
from __future__ import annotations

import torch

# bf16 inputs, fp32 accumulation, one bf16 rounding (two for updated weight gradients): relative
# to the largest reference element
REL_TOL = 2e-2


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rel: float = REL_TOL, what: str = "") -> None:
    scale = max(want.abs().max().item(), 1e-6)
    torch.testing.assert_close(got.double(), want.double(), rtol=rel, atol=rel * scale,
                               msg=lambda m: f"{what}: {m}" if what else m)


def rand(*shape, scale: float = 1.0) -> torch.Tensor:
    """Normal bf16 values on the GPU, times ``scale``."""
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)
