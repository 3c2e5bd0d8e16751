"""Planner integration in one process: auto plans, warmup tuning, the cache across runs."""
import logging

import torch

import adaptmoe as am
from adaptmoe import moe as tutel_moe
from adaptmoe.planning import PlanningOptions
from planner import PlanCache


def build(tmp_path, tune=True, plan="auto"):
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=4, plan=plan, gate=am.GateConfig(top_k=2),
                       experts=am.ExpertConfig(hidden_size=32))
    return am.MoELayer(cfg, planning=PlanningOptions(tune=tune, cache_path=str(tmp_path / "plans.msgpack")))


def train_steps(layer, steps, tokens=24):
    for _ in range(steps):
        x = torch.randn(tokens, 16, requires_grad=True)
        layer(x).sum().backward()


def test_warmup_tunes_then_locks_and_the_next_run_starts_tuned(tmp_path, caplog):
    layer = build(tmp_path)
    reference = build(tmp_path, plan="fixed")
    x = torch.randn(24, 16)
    torch.testing.assert_close(layer(x), reference(x))           # tuning calls give the same outputs
    with caplog.at_level(logging.INFO, logger="adaptmoe.planning"):
        train_steps(layer, 12)
    assert layer.planner.tuning_calls > 0 and not layer.planner.tuning
    assert any("plan r=" in rec.message and "measured" in rec.message for rec in caplog.records)
    entries = PlanCache(tmp_path / "plans.msgpack").entries()
    assert any(e.source == "measured" for e in entries.values())

    second = build(tmp_path)                                       # a new run, same signature
    train_steps(second, 3)
    assert second.planner.tuning_calls == 0


def test_model_only_planning_and_token_buckets(tmp_path):
    layer = build(tmp_path, tune=False).eval()
    with torch.no_grad():
        for tokens in (5, 6, 7, 8, 100, 120):
            layer(torch.randn(tokens, 16))
    assert layer.planner.tuning_calls == 0
    buckets = {key.rsplit("#T", 1)[1] for key in layer.planner.chosen}
    assert buckets == {"8", "128"}


def test_explicit_knobs_win_over_the_plan(tmp_path):
    layer = build(tmp_path, tune=False)
    seen = []
    original = layer._run

    def recording_run(x_TD, routing, knobs):
        seen.append(knobs)
        return original(x_TD, routing, knobs)

    layer(torch.randn(8, 16))          # plans (and calibrates) this bucket
    layer._run = recording_run
    layer(torch.randn(8, 16))
    chosen = next(iter(layer.planner.chosen.values()))
    assert (seen[0].adaptive_r, seen[0].overlap_degree) == (chosen.adaptive_r, chosen.overlap_degree)
    explicit_r = 1 - chosen.adaptive_r
    layer(torch.randn(8, 16), adaptive_r=explicit_r, a2a_ffn_overlap_degree=3)
    assert seen[1].adaptive_r == explicit_r and seen[1].overlap_degree == 3


def test_tutel_parallel_type_auto_uses_the_planner(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTMOE_PLAN_CACHE", str(tmp_path / "c.msgpack"))
    layer = tutel_moe.moe_layer(gate_type={"type": "top", "k": 1}, model_dim=8, parallel_type="auto",
                                experts={"type": "ffn", "num_experts_per_device": 2, "hidden_size_per_expert": 8})
    assert layer.config.plan == "auto"
    layer(torch.randn(4, 8))
    assert layer.planner.chosen or layer.planner.tuning


def test_calibration_measures_overhead_without_touching_gradients(tmp_path):
    layer = build(tmp_path, tune=False)
    y = layer(torch.randn(24, 16))        # first call: plans, calibrating with a tiny fwd + bwd
    assert layer.planner._calibrated_modes == {True}
    assert layer.planner.device_model.train_call_overhead_us >= 0.0
    assert all(p.grad is None for p in layer.parameters())     # calibration accumulated nothing
    assert layer.last_routing.indices_TK.shape[0] == 24         # ... and left the call's own record
    y.sum().backward()
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_corrupt_cache_file_warns_and_runs(tmp_path):
    (tmp_path / "plans.msgpack").write_bytes(b"\x93not msgpack at all")
    layer = build(tmp_path, tune=False)
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(8, 16))
    assert any("plans.msgpack" in str(w.message) for w in caught)
