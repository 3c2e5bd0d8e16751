"""The Tutel-style dict API: the seed README snippet, every documented key, checkpoints, no mutation."""
import copy
import math

import pytest
import torch

from adaptmoe import moe as tutel_moe
from reference import reference_forward

DEVICE = "cuda:0" if torch.cuda.is_available() else "cpu"


def test_seed_readme_snippet_runs_with_only_the_import_changed():
    # The Tutel README snippet; only the import line differs (and the device when there is no GPU).
    x = torch.ones([6, 1024], device=DEVICE)
    moe_layer = tutel_moe.moe_layer(
        gate_type={'type': 'top', 'k': 2},
        model_dim=x.shape[-1],
        experts={
            'count_per_node': 2,
            'type': 'ffn', 'hidden_size_per_expert': 2048, 'activation_fn': lambda x: torch.nn.functional.relu(x)
        },
        scan_expert_func=lambda name, param: setattr(param, 'skip_allreduce', True),
    )
    moe_layer = moe_layer.to(DEVICE)
    y = moe_layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert all(getattr(p, "skip_allreduce", False) for _, p in moe_layer.get_parameter_iterator("local_experts"))
    assert moe_layer.num_global_experts == 2 and moe_layer.num_local_experts == 2


def tutel_state_dict(E, D, H, seed=0):
    """A state dict laid out exactly as Tutel's ffn moe_layer saves it (fc2 stored transposed)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "_num_global_experts": torch.tensor(E),
        "gates.0.wg.weight": torch.randn(E, D, generator=g),
        "experts.batched_fc1_w": torch.randn(E, H, D, generator=g) / math.sqrt(D),
        "experts.batched_fc2_w": torch.randn(E, H, D, generator=g) / math.sqrt(H),
        "experts.batched_fc1_bias": torch.randn(E, H, generator=g),
        "experts.batched_fc2_bias": torch.randn(E, D, generator=g),
    }


def test_tutel_checkpoint_loads_and_gives_the_reference_outputs():
    E, D, H = 4, 16, 24
    layer = tutel_moe.moe_layer(gate_type={"type": "top", "k": 2}, model_dim=D,
                                experts={"type": "ffn", "num_experts_per_device": E, "hidden_size_per_expert": H,
                                         "activation_fn": torch.relu})
    state = tutel_state_dict(E, D, H)
    layer.load_state_dict(state)
    x = torch.randn(10, D)
    y = layer(x)
    # Tutel's math written out directly: relu(x W1^T + b1) W2 + b2 with W2 stored [H, D].
    logits = x @ state["gates.0.wg.weight"].t()
    probs = torch.softmax(logits, 1)
    top = torch.topk(probs, 2, dim=1)
    w = top.values / top.values.sum(1, keepdim=True)
    expected = torch.zeros_like(x)
    cap = 2 * math.floor(1.0 * math.ceil(10 / E))
    used = [0] * E
    keep = torch.zeros(10, 2, dtype=torch.bool)
    for k in range(2):
        for t in range(10):
            e = int(top.indices[t, k])
            keep[t, k] = used[e] < cap
            used[e] += 1
    for t in range(10):
        for k in range(2):
            if keep[t, k]:
                e = int(top.indices[t, k])
                h = torch.relu(state["experts.batched_fc1_w"][e] @ x[t] + state["experts.batched_fc1_bias"][e])
                expected[t] += w[t, k] * (h @ state["experts.batched_fc2_w"][e] + state["experts.batched_fc2_bias"][e])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_every_documented_key_is_accepted_and_dicts_are_not_mutated():
    gate = {"type": "top", "k": 2, "capacity_factor": 0.0, "gate_noise": 1.0, "fp32_gate": True}
    cosine = {"type": "cosine_top", "k": 1, "proj_dim": 16, "init_t": 0.3, "capacity_factor": -1.0, "gate_noise": 0.5}
    experts = {"type": "ffn", "num_experts_per_device": 2, "hidden_size_per_expert": 8, "activation_fn": torch.tanh,
               "output_dim": 6, "has_fc1_bias": False, "has_fc2_bias": True}
    before = copy.deepcopy((gate, cosine, {k: v for k, v in experts.items() if k != "activation_fn"}))
    layers = [tutel_moe.moe_layer(gate_type=[gate, cosine], model_dim=12, experts=experts, seeds=(1, 2, 3),
                                  a2a_ffn_overlap_degree=2, is_postscore=False, batch_prioritized_routing=True,
                                  normalize_gate=False, is_gshard_loss=False, parallel_type="adaptive:1",
                                  use_2dh=True, pad_samples=True, result_func=lambda out: (out, out.l_aux))
              for _ in range(2)]   # the same dicts build a second layer: nothing was popped
    after = (gate, cosine, {k: v for k, v in experts.items() if k != "activation_fn"})
    assert before == after
    layer = layers[0].train()
    x = torch.randn(2, 5, 12)
    for gate_index in (0, 1):
        out, l_aux = layer(x, gate_index=gate_index)
        assert out.shape == (2, 5, 6) and l_aux.ndim == 0
    assert layer.experts.batched_fc1_bias is None and layer.experts.batched_fc2_bias is not None
    assert layer.gates[0].wg.weight.dtype == torch.float32


def test_llama_ffn_and_custom_gate_and_expert():
    class MyGate(torch.nn.Module):
        def __init__(self, model_dim, num_global_experts, k=1, scale=1.0):
            super().__init__()
            self.top_k, self.proj = k, torch.nn.Linear(model_dim, num_global_experts, bias=False)

        def forward(self, x):
            return self.proj(x)

    class MyExpert(torch.nn.Module):
        def __init__(self, model_dim, num_experts_per_device, sharded_count, my_scale=1.0):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(num_experts_per_device, model_dim, model_dim) * 0.1)
            self.my_scale = my_scale

        def forward(self, x, ctx):
            assert ctx.num_global_experts == 3
            return torch.bmm(x, self.w) * self.my_scale

    layer = tutel_moe.moe_layer(gate_type={"type": "custom", "module": MyGate, "k": 2, "scale": 2.0}, model_dim=8,
                                experts={"type": "custom", "module": MyExpert, "num_experts_per_device": 3,
                                         "my_scale": 0.5})
    for cf in (1.0, 0.0):
        assert layer(torch.randn(5, 8), capacity_factor=cf).shape == (5, 8)
    llama = tutel_moe.moe_layer(gate_type={"type": "top", "k": 2}, model_dim=8,
                                experts={"type": "llama_ffn", "num_experts_per_device": 2, "hidden_size_per_expert": 16})
    x = torch.randn(7, 8, dtype=torch.float64)
    torch.testing.assert_close(llama.double()(x), reference_forward(llama, x))


@pytest.mark.parametrize("bad,needle", [
    (dict(gate_type={"type": "top", "k": 2, "kk": 1}), "kk"),
    (dict(gate_type={"type": "nope"}), "gate type"),
    (dict(experts={"type": "ffn", "hidden_size_per_expert": 8, "hidden": 3}), "hidden"),
    (dict(experts={"type": "moe"}), "experts type"),
    (dict(parallel_type="adaptive:2"), "adaptive_r"),
    (dict(parallel_type="fast"), "parallel_type"),
    (dict(gate_type={"type": "top", "k": 3}), "top_k"),
    (dict(foo=1), "foo"),
])
def test_bad_dicts_name_the_key(bad, needle):
    kwargs = dict(gate_type={"type": "top", "k": 2}, model_dim=8,
                  experts={"type": "ffn", "num_experts_per_device": 2, "hidden_size_per_expert": 8})
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=needle):
        tutel_moe.moe_layer(**kwargs)


def test_expert_count_rules():
    assert tutel_moe.global_expert_count(2, 4) == 8
    assert tutel_moe.global_expert_count(-2, 4) == 2
    assert tutel_moe.global_expert_count(0.5, 4) == 2   # Tutel mis-converts 0.5 and crashes
    with pytest.raises(ValueError, match="num_experts_per_device"):
        tutel_moe.global_expert_count(0, 4)
    with pytest.raises(ValueError, match="divisible"):
        tutel_moe.global_expert_count(-3, 4)
