"""Token buckets: a new size inside a known bucket reuses its plan; a new bucket is planned once
from the cost model (no measurement); plan-cache entries win; graph runner falls back on CPU."""
from __future__ import annotations

import pytest
import torch

planner = pytest.importorskip("planner")   # torch-free planner; needs networkx and msgpack

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, serving as serving_mod  # noqa: E402
from adaptmoe.serving import BucketPlanner, CudaGraphRunner, ServingMoE, token_bucket  # noqa: E402


def make_serving(**kwargs) -> ServingMoE:
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=16, num_experts=8, gate=GateConfig(top_k=2),
                               experts=ExpertConfig(kind="gated_ffn", hidden_size=32, activation="silu"))).eval()
    return ServingMoE(layer, **kwargs)


@pytest.fixture
def cost_model_calls(monkeypatch):
    calls = []
    real = planner.best_plan

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)
    monkeypatch.setattr(serving_mod._planner, "best_plan", spy)
    return calls


def test_bucket_reuse_makes_no_new_plan(cost_model_calls):
    serving = make_serving()
    with torch.no_grad():
        serving(torch.randn(5, 16))
        assert serving.planner.plans_computed == 1 and cost_model_calls == [8]
        for T in (6, 7, 8, 5):                      # same bucket (8): dict hits only
            serving(torch.randn(T, 16))
        assert serving.planner.plans_computed == 1 and cost_model_calls == [8]
        serving(torch.randn(9, 16))                 # new bucket (16): planned once
        serving(torch.randn(16, 16))
    assert serving.planner.plans_computed == 2 and cost_model_calls == [8, 16]
    assert {c.source for c in serving.planner.choices.values()} == {"cost_model"}


def test_kernel_follows_token_count():
    serving = make_serving()
    assert serving.choose(1).kernel == "decode"
    assert serving.choose(64).kernel == "decode"
    assert serving.choose(4096).kernel == "grouped"
    assert serving.choose(70_000).kernel == "grouped"
    assert serving.choose(8, capacity_factor=1.0).kernel in ("bmm", "grouped")
    assert token_bucket(0) == 0 and token_bucket(1) == 1 and token_bucket(65537) == 131072


def test_prepare_plans_every_bucket_ahead(cost_model_calls):
    serving = make_serving()
    choices = serving.prepare(1000)
    assert [c.bucket for c in choices] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    computed = serving.planner.plans_computed
    with torch.no_grad():
        for T in (1, 3, 17, 100, 999):
            serving(torch.randn(T, 16))
    assert serving.planner.plans_computed == computed


def test_warmup_runs_each_bucket_once_and_changes_nothing(monkeypatch):
    serving = make_serving()
    before = {k: v.clone() for k, v in serving.state_dict().items()}
    sizes = []
    real_forward = ServingMoE.forward

    def spy(self, x, **kwargs):
        sizes.append(x.shape[0])
        return real_forward(self, x, **kwargs)
    monkeypatch.setattr(ServingMoE, "forward", spy)
    choices = serving.warmup(100)
    assert [c.bucket for c in choices] == [1, 2, 4, 8, 16, 32, 64, 128]
    # a few sizes in every bucket (at most 3), never beyond max_tokens, the largest request included
    per_bucket = {b: [t for t in sizes if token_bucket(t) == b] for b in (1, 2, 4, 8, 16, 32, 64, 128)}
    assert all(1 <= len(v) <= 3 for v in per_bucket.values()) and sum(map(len, per_bucket.values())) == len(sizes)
    assert max(sizes) == 100 and min(sizes) == 1
    assert all(torch.equal(v, serving.state_dict()[k]) for k, v in before.items())
    computed = serving.planner.plans_computed
    with torch.no_grad():
        serving(torch.randn(37, 16))
    assert serving.planner.plans_computed == computed


def test_rule_without_cost_model():
    serving = make_serving(planner=BucketPlanner(use_cost_model=False))
    assert [serving.choose(t).kernel for t in (1, 64, 65, 5000)] == ["decode", "decode", "grouped", "grouped"]
    assert all(c.source == "rule" for c in serving.planner.choices.values())


def test_plan_cache_entry_wins(tmp_path):
    serving = make_serving()
    cache = planner.PlanCache(tmp_path / "plans.msgpack")
    key = serving.plan_key(2, 0.0, torch.float32)
    signature = serving.planner.signature(key)
    cache.put("test-host", signature, 4, planner.Plan(expert_kernel="grouped"), None, measured_ms=0.5)
    serving.planner = BucketPlanner(cache=cache, fingerprint="test-host")
    choice = serving.choose(3)
    assert (choice.kernel, choice.source, choice.predicted_ms) == ("grouped", "plan_cache", 0.5)
    assert serving.planner.plans_computed == 0
    assert serving.choose(1).source == "cost_model"     # bucket 1 is not in the cache


def test_graph_runner_runs_eagerly_without_cuda():
    serving = make_serving()
    runner = CudaGraphRunner(serving, max_graph_tokens=64)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), serving(x))
    assert runner.eager_calls == 1 and not runner.graphs
    with pytest.raises(ValueError, match="max_graph_tokens must be an integer >= 1"):
        CudaGraphRunner(serving, max_graph_tokens=0)
