"""Cost model pieces against hand-computed numbers, and feasibility reasons."""
import re

import pytest

from planner import DeviceModel, LayerSignature, Plan, Topology, estimate, feasibility
from planner.cost import a2a_seconds, expert_seconds, pipeline_seconds
from planner.shapes import call_shape, capacity_slots, expected_distinct

US = 1e-6
# 1 GFLOP/s, 1 TB/s, no launch cost: small shapes give round hand-computed numbers
SLOW = DeviceModel(name="slow", gemm_tflops=1e-3, mem_bw_gbps=1000, memory_gib=16, rows_half=64,
                   expert_fraction=1.0, grouped_fraction=0.5, launch_us=0.0, collective_call_us=0.0,
                   overlap_contention=0.0)
ONE_GPU = Topology.from_cluster(1, 1, 300, 25)
H100 = DeviceModel.preset("H100")


def test_gemm_time_for_known_flops():
    dev = DeviceModel(name="t", gemm_tflops=100, mem_bw_gbps=1000, memory_gib=1, rows_half=100,
                      expert_fraction=1.0, grouped_fraction=0.5)
    # 1e12 flops at 100 TFLOP/s x efficiency 100 / (100 + 100) = 0.02 s; grouped at half that rate
    assert dev.expert_gemm_seconds(1e12, 100, "bmm") == pytest.approx(0.02)
    assert dev.expert_gemm_seconds(1e12, 100, "grouped") == pytest.approx(0.04)
    assert dev.gemm_efficiency(0) == 0.0
    assert dev.memory_seconds(3e9) == pytest.approx(3e-3)


def test_capacity_follows_tutel_formula():
    sig = LayerSignature(64, 128, 8, 2, capacity_factor=1.25)
    assert capacity_slots(sig, 100) == 2 * 16          # k * floor(1.25 * ceil(100 / 8))
    assert capacity_slots(LayerSignature(64, 128, 8, 2, capacity_factor=0.0), 100) is None
    assert capacity_slots(LayerSignature(64, 128, 8, 2, capacity_factor=-0.5), 100) == 2 * 6


def test_expected_distinct_experts_matches_anchor_decode_numbers():
    assert expected_distinct(8, 2 / 8, 1) == pytest.approx(2.0)
    assert expected_distinct(8, 2 / 8, 4) == pytest.approx(5.47, abs=0.01)   # anchor: 5.5
    assert expected_distinct(8, 2 / 8, 16) == pytest.approx(7.92, abs=0.01)  # anchor: 7.9


def test_pipeline_makespan_by_hand():
    assert pipeline_seconds(1, 1, 1, 1) == 3
    # comm-bound, d=2: dispatches end at 2, 4; compute at 3, 5; combines at 6, 8
    assert pipeline_seconds(2, 1, 2, 2) == 8
    # compute-bound, d=2: dispatch 1, 2; compute 3, 5; combine 4 then 6
    assert pipeline_seconds(1, 2, 1, 2) == 6


def test_flat_and_2d_all_to_all_by_hand():
    topo = Topology.from_cluster(2, 2, 100, 10, intra_latency_us=1, inter_latency_us=2,
                                 launch_latency_us=10)
    dev = DeviceModel(name="t", gemm_tflops=1, mem_bw_gbps=1000, memory_gib=1, launch_us=5, collective_call_us=0.0)
    assert a2a_seconds(Plan(1, 1, "flat"), 4e6, topo, dev) == pytest.approx(214 * US)
    # intra stage: 10 + 1 + 4e6/2/100e9 s = 31 us; inter stage: 10 + 2 + 4e6/2/10e9 s = 212 us;
    # two layout passes, each reads + writes 4e6 B at 1 TB/s (8 us) plus a 5 us launch
    assert a2a_seconds(Plan(1, 1, "2d"), 4e6, topo, dev) == pytest.approx(269 * US)


def test_expert_time_for_a_single_gpu_call_by_hand():
    sig = LayerSignature(64, 128, 2, 1, dtype="float32", training=False)
    shape = call_shape(Plan(), sig, 128, 1)
    # C = floor(ceil(128/2)) = 64 per expert, rows = 2 * 64; flops = 2 * 2 * 128 * 64 * 128
    assert (shape.capacity, shape.sent_rows, shape.rows_per_matrix) == (64, 128, 64)
    assert shape.flops == 2 * 2 * 128 * 64 * 128
    gemm = shape.flops / (1e9 * 0.5)                     # efficiency 64 / (64 + 64)
    activation = 2 * 128 * 128 * 4 / 1e12                # read + write rows x H in fp32
    assert expert_seconds(Plan(), shape, sig, SLOW) == pytest.approx(gemm + activation)


def test_breakdown_sums_to_total_and_training_triples_compute():
    sig = LayerSignature(64, 128, 2, 1, dtype="float32", training=False)
    ms, parts = estimate(Plan(), sig, 128, ONE_GPU, SLOW)
    total = sum(v for k, v in parts.items() if k != "overlap_hidden") - parts["overlap_hidden"]
    assert ms == pytest.approx(total)
    assert parts["a2a"] == 0.0 and parts["weight_gather"] == 0.0   # one GPU: no communication
    train_ms, train_parts = estimate(Plan(), LayerSignature(64, 128, 2, 1, dtype="float32"),
                                     128, ONE_GPU, SLOW)
    assert train_parts["experts"] == pytest.approx(3 * parts["experts"])
    assert train_ms == pytest.approx(3 * ms)


def test_data_parallel_gathers_all_weights_over_the_world():
    topo = Topology.from_cluster(1, 2, 100, 10, intra_latency_us=1, launch_latency_us=10)
    sig = LayerSignature(64, 128, 2, 1, dtype="float32", training=False)
    _, parts = estimate(Plan(adaptive_r=0), sig, 128, topo, SLOW)
    weights = 2 * 2 * 64 * 128 * 4                    # E experts x 2 matrices x D x H x fp32
    # 10 us launch + 1 ring step * (1 us + weights / 2 / 100 GB/s)
    assert parts["weight_gather"] == pytest.approx((11 * US + weights / 2 / 100e9) * 1e3)
    assert parts["a2a"] == 0.0
    _, ep = estimate(Plan(adaptive_r=1), sig, 128, topo, SLOW)
    assert ep["weight_gather"] == 0.0 and ep["a2a"] > 0


def test_overlap_hides_communication_when_comm_and_compute_are_comparable():
    topo = Topology.from_cluster(4, 1, 50, 50)
    sig = LayerSignature(1024, 4096, 4, 2, training=False)
    # Enough tokens that the hidden communication outweighs the extra per-chunk collective calls.
    d1_ms, d1 = estimate(Plan(1, 1), sig, 16384, topo, H100)
    d2_ms, d2 = estimate(Plan(1, 2), sig, 16384, topo, H100)
    assert d1["overlap_hidden"] == 0.0
    assert d2["overlap_hidden"] > 0.5 * d2["experts"]
    assert d2_ms < d1_ms


@pytest.mark.parametrize("sig", [LayerSignature(4096, 14336, 8, 2),     # Mixtral
                                 LayerSignature(2048, 1024, 64, 8)])    # fine-grained
def test_overlap_does_not_pay_on_two_nvlink_gpus(sig):
    # anchor-figures: on 2 x H200 overlap degree 2 gave no gain (Mixtral) or lost 14% (fine)
    topo = Topology.from_cluster(1, 2, 300, 25)
    h200 = DeviceModel.preset("H200")
    d1_ms, _ = estimate(Plan(1, 1), sig, 8192, topo, h200)
    d2_ms, _ = estimate(Plan(1, 2), sig, 8192, topo, h200)
    assert d1_ms < d2_ms


def test_estimate_refuses_an_invalid_layout():
    with pytest.raises(ValueError, match="2d all-to-all needs more than one node"):
        estimate(Plan(1, 1, "2d"), LayerSignature(64, 128, 8, 2), 64,
                 Topology.from_cluster(1, 8, 300, 25), SLOW)


@pytest.mark.parametrize("plan, sig, world, expected", [
    (Plan(adaptive_r=3), LayerSignature(64, 128, 2, 1), (1, 8),
     "adaptive_r=3 needs the 4 shard(s) of each expert divisible by 3 (valid: [0, 1, 2, 4])"),
    (Plan(adaptive_r=2), LayerSignature(64, 128, 8, 1), (1, 8),
     "adaptive_r=2 needs the 1 shard(s) of each expert divisible by 2 (valid: [0, 1])"),
    (Plan(a2a_algo="2d"), LayerSignature(64, 128, 8, 1), (1, 8),
     "2d all-to-all needs more than one node (1 node of 8 GPUs)"),
    (Plan(expert_kernel="bmm"), LayerSignature(64, 128, 8, 1, capacity_factor=0.0), (1, 8),
     "bmm needs a fixed capacity (capacity_factor > 0), got 0"),
    (Plan(overlap_degree=2), LayerSignature(64, 128, 8, 1), (1, 1),
     "overlap_degree=2 needs more than one rank (world size 1)"),
    (Plan(adaptive_r=0, overlap_degree=2), LayerSignature(64, 128, 8, 1), (1, 8),
     "overlap_degree=2 has no all-to-all to overlap with adaptive_r=0"),
    (Plan(expert_kernel="decode"), LayerSignature(64, 128, 8, 1), (1, 8),
     "decode kernel is inference-only (training=True)"),
    (Plan(expert_kernel="grouped"), LayerSignature(64, 128, 8, 1, expert_type="custom"), (1, 8),
     "grouped kernel needs a built-in expert (ffn or gated_ffn), got custom"),
    (Plan(), LayerSignature(64, 128, 12, 1), (1, 8),
     "num_experts 12 must be divisible by the world size 8"),
    (Plan(), LayerSignature(64, 102, 2, 1), (1, 8),
     "hidden 102 must be divisible by 4 shards per expert"),
])
def test_rejection_reasons_name_the_numbers(plan, sig, world, expected):
    topo = Topology.from_cluster(world[0], world[1], 300, 25)
    assert expected in feasibility(plan, sig, 64, topo, H100)


def test_decode_rejected_for_large_batches():
    sig = LayerSignature(64, 128, 8, 1, training=False, capacity_factor=0.0)
    reasons = feasibility(Plan(expert_kernel="decode"), sig, 4096, ONE_GPU, H100)
    assert reasons == ["decode kernel needs tokens_per_rank <= 64, got 4096"]
    assert feasibility(Plan(expert_kernel="decode"), sig, 16, ONE_GPU, H100) == []


def test_memory_rejection_names_sizes():
    # 64 experts of 2 x 8192 x 32768 bf16 = 1 GiB each: data parallel gathers all 64 of them,
    # and training doubles that for gradients -> 128 GiB on an 80 GiB device
    sig = LayerSignature(8192, 32768, 64, 2, training=True)
    topo = Topology.from_cluster(1, 8, 300, 25)
    reasons = feasibility(Plan(adaptive_r=0), sig, 1024, topo, H100)
    assert len(reasons) == 1
    assert re.fullmatch(r"expert weights 144\.0 GiB exceed device memory 80 GiB", reasons[0])
    assert feasibility(Plan(adaptive_r=1), sig, 1024, topo, H100) == []


def test_sharded_weight_gathers_repeat_per_chunk_and_backward_reduce_scatters():
    topo = Topology.from_cluster(1, 8, 300, 25)
    sig = LayerSignature(4096, 14336, 2, 2, training=False)          # S = 4
    _, d1 = estimate(Plan(1, 1), sig, 4096, topo, H100)
    _, d2 = estimate(Plan(1, 2), sig, 4096, topo, H100)
    one_gather = topo.collective_time("all_gather", sig.expert_weight_bytes, 4) * 1e3
    assert d1["weight_gather"] == pytest.approx(one_gather)
    assert d2["weight_gather"] == pytest.approx(2 * one_gather)
    _, r_s = estimate(Plan(4, 1), sig, 4096, topo, H100)              # R = S: no gather
    assert r_s["weight_gather"] == 0.0
    _, train = estimate(Plan(1, 1), LayerSignature(4096, 14336, 2, 2), 4096, topo, H100)
    scatter = topo.collective_time("reduce_scatter", sig.expert_weight_bytes, 4) * 1e3
    assert train["weight_gather"] == pytest.approx(one_gather + scatter)


@pytest.mark.parametrize("sig, tokens, cluster", [
    (LayerSignature(4096, 14336, 16, 2), 2048, (4, 8)),
    (LayerSignature(2048, 1024, 64, 8, capacity_factor=0.0), 512, (2, 8)),
    (LayerSignature(1024, 4096, 4, 2, training=False), 32, (2, 4)),
])
def test_every_breakdown_adds_up(sig, tokens, cluster):
    from planner import rank_plans
    topo = Topology.from_cluster(*cluster, 300, 25)
    for cand in rank_plans(sig, tokens, topo, H100):
        if not cand.feasible:
            continue
        parts = cand.breakdown
        assert parts["overlap_hidden"] >= 0
        assert all(v >= 0 for v in parts.values())
        added = sum(v for k, v in parts.items() if k != "overlap_hidden") - parts["overlap_hidden"]
        assert cand.predicted_ms == pytest.approx(added)
        if cand.plan.overlap_degree == 1:
            assert parts["overlap_hidden"] == pytest.approx(0.0, abs=1e-12)


def test_a_call_takes_the_longer_of_host_time_and_device_work():
    """total = longer + f * shorter of (host time, device work); f = host_exposed_fraction."""
    import dataclasses
    topo = Topology.from_cluster(1, 1, 300, 25)
    sig = LayerSignature(1024, 4096, 8, 2, training=True)
    device_ms, parts = estimate(Plan(1, 1), sig, 4096, topo, H100)
    assert parts["host"] == 0.0                     # no host time measured: nothing to add
    f = H100.host_exposed_fraction
    slow_host = dataclasses.replace(H100, train_call_overhead_us=(device_ms + 2.0) * 1e3)
    ms, parts = estimate(Plan(1, 1), sig, 4096, topo, slow_host)
    assert ms == pytest.approx(device_ms + 2.0 + f * device_ms)
    assert parts["host"] == pytest.approx(2.0 + f * device_ms)
    fast_host = dataclasses.replace(H100, train_call_overhead_us=0.5 * device_ms * 1e3)
    assert estimate(Plan(1, 1), sig, 4096, topo, fast_host)[0] == pytest.approx(device_ms * (1 + 0.5 * f))
    hidden = dataclasses.replace(fast_host, host_exposed_fraction=0.0)   # perfect overlap: the longer only
    assert estimate(Plan(1, 1), sig, 4096, topo, hidden)[0] == pytest.approx(device_ms)
    with pytest.raises(ValueError, match="host_exposed_fraction"):
        dataclasses.replace(H100, host_exposed_fraction=1.5)
    inference = dataclasses.replace(sig, training=False)
    assert estimate(Plan(1, 1), inference, 4096, topo, slow_host)[1]["host"] == 0.0   # forward has its own


def test_each_extra_overlap_chunk_adds_its_measured_cost_in_series():
    """d chunks add (d - 1) x chunk overhead on top of the longer of host time and device work."""
    import dataclasses
    topo = Topology.from_cluster(1, 2, 300, 25)
    sig = LayerSignature(1024, 4096, 8, 2, training=True)
    base = {d: estimate(Plan(1, d), sig, 4096, topo, H100)[0] for d in (1, 2, 4)}
    chunky = dataclasses.replace(H100, train_chunk_overhead_us=1500.0, chunk_overhead_us=200.0)
    for d in (1, 2, 4):
        ms, parts = estimate(Plan(1, d), sig, 4096, topo, chunky)
        assert parts["chunks"] == pytest.approx(1.5 * (d - 1))
        assert ms == pytest.approx(base[d] + 1.5 * (d - 1))
    # A host-bound call still pays the chunks: they run in series with the call.
    host_bound = dataclasses.replace(chunky, train_call_overhead_us=(base[2] + 5.0) * 1e3)
    ms, parts = estimate(Plan(1, 2), sig, 4096, topo, host_bound)
    assert ms == pytest.approx(base[2] + 5.0 + 1.5)
    # Forward-only calls use the forward figure.
    assert estimate(Plan(1, 2), dataclasses.replace(sig, training=False), 4096, topo, chunky)[1]["chunks"] \
        == pytest.approx(0.2)
    with pytest.raises(ValueError, match="train_chunk_overhead_us"):
        dataclasses.replace(H100, train_chunk_overhead_us=-1.0)
