"""The capacity-slot layout of dropless routing (routing.overflow_slots) against brute force, and
what the slot path's host side does without a GPU (its kernels are tested in tests/gpu)."""
import copy
import pickle

import numpy as np
import pytest
import torch

import adaptmoe as am
from adaptmoe.ops import _triton_slotted
from adaptmoe.routing import build_routing, capacity_for, overflow_slots


def check_layout(indices_TK: torch.Tensor, E: int) -> None:
    T, K = indices_TK.shape
    routing = build_routing(indices_TK, torch.ones(T, K), E, 0.0)
    C = capacity_for(1.0, T, E, K)
    layout = overflow_slots(routing, C)
    slots = layout.slots_TK.reshape(-1)
    e, loc = indices_TK.reshape(-1), routing.locations_TK.reshape(-1)
    # every choice kept, each in a slot of its own
    assert slots.numel() == T * K and slots.unique().numel() == T * K
    assert bool(((slots >= 0) & (slots < E * C)).all())
    # an expert's first C rows in its own slots, in rank order; the rest elsewhere
    own = slots // max(C, 1) == e
    assert torch.equal(own, loc < C)
    assert torch.equal(slots[own], (e * C + loc)[own])
    n_over = int(layout.over_E.sum())
    rows = layout.rows_O[:n_over]
    assert sorted(rows.tolist()) == sorted(slots[~own].tolist())
    assert bool((rows[1:] > rows[:-1]).all())   # increasing: grouped by slot owner
    true_expert = torch.full((max(E * C, 1),), -1, dtype=torch.long)
    true_expert[slots] = e
    assert bool((true_expert[rows][1:] >= true_expert[rows][:-1]).all())   # ... and by true expert
    assert torch.equal(torch.bincount(true_expert[rows], minlength=E), layout.over_E)
    assert torch.equal(torch.bincount(rows // max(C, 1), minlength=E), layout.hosted_E)
    # overflow rows only in slots their owner leaves free
    assert bool((rows % max(C, 1) >= routing.counts_E[rows // max(C, 1)]).all())


@pytest.mark.parametrize("seed", range(40))
def test_overflow_slots_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 60, (), generator=g))
    E = int(torch.randint(1, 10, (), generator=g))
    K = int(torch.randint(1, E + 1, (), generator=g))
    tilt = torch.linspace(0, float(torch.rand((), generator=g)) * 6, E)   # from balanced to all on a few
    check_layout((torch.randn(T, E, generator=g) + tilt).topk(K, dim=1).indices, E)


@pytest.mark.parametrize("indices", [
    [[0], [0], [0], [0]],              # every token on one expert of four
    [[1, 0], [0, 1], [1, 0]],          # k == E
    [[2]],                             # one token
], ids=["one-expert-takes-all", "k-equals-E", "one-token"])
def test_overflow_slots_edge_cases(indices):
    idx = torch.tensor(indices)
    check_layout(idx, max(3, int(idx.max()) + 1) if idx.shape[1] == 1 else 2)


def test_overflow_slots_with_no_tokens_and_too_few_slots():
    layout = overflow_slots(build_routing(torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 2), 4, 0.0), 0)
    assert layout.slots_TK.shape == (0, 2) and int(layout.over_E.sum()) == 0
    routing = build_routing(torch.tensor([[0], [1], [1]]), torch.ones(3, 1), 2, 0.0)
    with pytest.raises(ValueError, match="capacity must hold every row"):
        overflow_slots(routing, 1)


def test_blocker_explains_and_cpu_layers_keep_grouped_mm():
    w = torch.zeros(2, 128, 128, dtype=torch.bfloat16)
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    assert "biases" in _triton_slotted.blocker(x, (w, w), (torch.zeros(2, 128), None))
    assert _triton_slotted.blocker(x, (w, w), (None, None)) is not None   # CPU (or no triton)
    cfg = am.MoEConfig(model_dim=128, num_experts=2, gate=am.GateConfig(top_k=1, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=128, has_fc1_bias=False, has_fc2_bias=False))
    layer = am.MoELayer(cfg).to(torch.bfloat16)
    routing = build_routing(torch.tensor([[0], [1]]), torch.ones(2, 1), 2, 0.0)
    assert layer.experts.slot_layout(torch.zeros(2, 128, dtype=torch.bfloat16), routing) is None


def test_overflow_monitor_reads_the_newest_count_and_starts_afresh_in_copies():
    monitor = _triton_slotted.OverflowMonitor()
    assert monitor.prefer_slots(16)   # nothing measured yet
    monitor._count = np.array([-1])   # the pinned count before any layout wrote it
    assert monitor.prefer_slots(16) and monitor.touched_fraction is None
    monitor._count[0] = 4             # a layout kernel wrote: 4 of 16 experts to fix up
    assert not monitor.prefer_slots(16) and monitor.touched_fraction == 0.25
    monitor._count[0] = 1
    assert monitor.prefer_slots(16)
    for twin in (copy.deepcopy(monitor), pickle.loads(pickle.dumps(monitor))):
        assert twin.touched_fraction is None and twin.prefer_slots(16) and twin._count is None


def test_calls_kept_off_slots_measure_every_few_calls():
    monitor = _triton_slotted.OverflowMonitor()
    every = _triton_slotted.REMEASURE_EVERY
    assert [monitor.measure_off_slots() for _ in range(2 * every)] == ([False] * (every - 1) + [True]) * 2


def test_overflow_monitor_without_writable_host_memory_keeps_slots(monkeypatch):
    """Where the extension cannot write pinned memory the monitor asks for no count (once)."""
    class NoMappedMemory:
        asked = 0

        def host_writable(self, t):
            NoMappedMemory.asked += 1
            return False
    monkeypatch.setattr(torch, "full", lambda *a, **kw: torch.zeros(1, dtype=torch.int64))   # no pinning on CPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monitor, native = _triton_slotted.OverflowMonitor(), NoMappedMemory()
    assert monitor.host_count(native) is None and monitor.host_count(native) is None
    assert NoMappedMemory.asked == 1 and monitor.prefer_slots(16)


@pytest.mark.parametrize("counts, capacity, touched", [
    ([4, 4, 4, 4], 4, 0),        # balanced: nothing to fix
    ([6, 2, 4, 4], 4, 2),        # expert 0 overflows into expert 1's free slots
    ([7, 1, 1, 7], 4, 4),        # two overflow, two host
    ([5, 4, 3, 0], 4, 2),        # one overflow row: only the first free slot (expert 2's) hosts it
    ([9, 0, 0, 0], 4, 3),        # five overflow rows fill expert 1's free slots and one of expert 2's
])
def test_touched_experts_counts_losers_and_hosts(counts, capacity, touched):
    assert int(_triton_slotted.touched_experts(torch.tensor(counts), capacity)) == touched
    routing = build_routing(torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).unsqueeze(1),
                            torch.ones(sum(counts), 1), 4, 0.0)
    layout = overflow_slots(routing, capacity)
    assert int(((layout.over_E > 0) | (layout.hosted_E > 0)).sum()) == touched


def test_small_calls_keep_grouped_mm():
    assert not _triton_slotted.worth_it(1024 * 8, 2048, 1024)    # fine-grained experts, 1024 tokens: host-bound
    assert _triton_slotted.worth_it(8192 * 8, 2048, 1024)        # the same at 8192 tokens (measured)
    assert _triton_slotted.worth_it(8192 * 2, 4096, 14336)       # Mixtral
