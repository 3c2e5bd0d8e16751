"""Worker of the multi-rank planner test (run in each rank by harness.run_world)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, planning
from adaptmoe.planning import PlanningOptions


def _layer(cache_path: str) -> MoELayer:
    config = MoEConfig(model_dim=8, num_experts=4, plan="auto", gate=GateConfig(top_k=2),
                       experts=ExpertConfig(hidden_size=16))
    return MoELayer(config, seeds=(1, 2, 3), planning=PlanningOptions(cache_path=cache_path))


def _train(layer: MoELayer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(12, 8, requires_grad=True)
        layer(x).sum().backward()


def agreement_worker(rank: int, world_size: int, cache_path: str) -> None:
    # Each rank "measures" a different candidate as fastest: candidate (rank % 3) gets 10 ms here.
    original_step = planning.LayerPlanner._tuning_step

    def tagged_step(self, key, tuning, device):
        plan, timer = original_step(self, key, tuning, device)
        if timer is not None:
            timer.fake_index = tuning.candidates.index(next(c for c in tuning.candidates if c.plan == plan))
        return plan, timer

    planning.LayerPlanner._tuning_step = tagged_step
    planning.CallTimer.total_ms = lambda self: 10.0 + (self.fake_index - rank) % 3
    timed_degrees = []
    original_measure = planning.measure_call_ms

    def recording_measure(layer, tokens, sig, device, **knobs):
        timed_degrees.append(knobs.get("a2a_ffn_overlap_degree"))
        return original_measure(layer, tokens, sig, device, **knobs)

    planning.measure_call_ms = recording_measure
    layer = _layer(cache_path)
    _train(layer, 12)
    assert layer.planner.tuning_calls > 0 and not layer.planner.tuning, "tuning did not finish"
    # The calibration timed a tiny call at overlap degree 2 against 1 (slowest rank's figures).
    assert {1, 2} <= set(timed_degrees), f"no d=2 vs d=1 calibration: {timed_degrees}"
    planning.measure_call_ms = original_measure
    model = layer.planner.device_model
    overheads = [None] * world_size
    dist.all_gather_object(overheads, (model.train_call_overhead_us, model.train_chunk_overhead_us))
    assert overheads[0][0] > 0 and overheads[0][1] >= 0, overheads
    assert all(o == overheads[0] for o in overheads), f"ranks calibrated differently: {overheads}"
    labels = [None] * world_size
    dist.all_gather_object(labels, sorted(p.label() for p in layer.planner.chosen.values()))
    assert all(lab == labels[0] for lab in labels), f"ranks chose different plans: {labels}"
    dist.barrier()                       # rank 0 has written the cache
    second = _layer(cache_path)
    _train(second, 3)
    counts = [None] * world_size
    dist.all_gather_object(counts, second.planner.tuning_calls)
    assert counts == [0] * world_size, f"a second run tuned again: {counts} {list(second.planner.tuning)}"
