"""Poisoned CUDA memory for the GPU tests: outputs a kernel leaves unwritten then read as junk."""
from __future__ import annotations

import torch


def poison(nbytes: int, byte: int = 0xFF) -> None:
    """Fills free cached memory (at least 2 * max(nbytes, 1 MiB) bytes) with ``byte``; the caching
    allocator hands those blocks out next. 0xFF is NaN in every float dtype."""
    torch.cuda.synchronize()
    junk = torch.empty(max(int(nbytes), 1 << 20) * 2, dtype=torch.uint8, device="cuda")
    junk.fill_(byte)
    del junk
