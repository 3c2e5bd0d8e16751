"""Host cost of one layer forward on the GPU: wall time per call with the GPU kept idle (tiny
shapes), the same at a real shape (fine64), and where the Python time goes (cProfile).

    python scripts/profile_host.py
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer


def layer_for(D: int, H: int, E: int, k: int) -> MoELayer:
    cfg = MoEConfig(model_dim=D, num_experts=E, gate=GateConfig(top_k=k, capacity_factor=1.0),
                    experts=ExpertConfig(kind="ffn", hidden_size=H, activation="relu"))
    with torch.device("cuda"):
        return MoELayer(cfg).to(torch.bfloat16)


def wall_us(layer: MoELayer, x: torch.Tensor, n: int = 200) -> tuple[float, float]:
    """(host us per call without waiting on the GPU, us per call with the GPU included)."""
    with torch.no_grad():
        for _ in range(20):
            layer(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            layer(x)
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / n * 1e6
    return host, total


def main() -> None:
    tiny = layer_for(64, 64, 64, 8)
    x_tiny = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    print("tiny (T=64 D=64 H=64 E=64 k=8) host us/call %.1f, with GPU %.1f" % wall_us(tiny, x_tiny))
    fine = layer_for(2048, 1024, 64, 8)
    x_fine = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
    print("fine64 (T=8192 D=2048 H=1024 E=64 k=8) host us/call %.1f, with GPU %.1f" % wall_us(fine, x_fine))
    profile = cProfile.Profile()
    with torch.no_grad():
        profile.enable()
        for _ in range(100):
            tiny(x_tiny)
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
