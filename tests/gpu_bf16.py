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


def skip_unless_triton_kernels() -> None:
    """Skips the calling test module unless the Triton kernels run here (triton, an sm90+ GPU)."""
    import pytest

    from adaptmoe.ops import _triton_gemm
    if _triton_gemm.kernel_blocker(torch.zeros(1, 128, device="cuda", dtype=torch.bfloat16), ()) is not None:
        pytest.skip("the Triton kernels need triton and an sm90+ GPU", allow_module_level=True)


def rand(*shape, scale: float = 1.0) -> torch.Tensor:
    """Normal bf16 values on the GPU, times ``scale``."""
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)
