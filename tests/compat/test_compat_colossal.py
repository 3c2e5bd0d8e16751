"""ColossalAI surface: the MoE tutorial's code, parity with the typed layer, ColossalAI's capacity,
noise, per-rank expert seeds, groups, MoeLoss, bad input."""
import pytest
import torch
from torch import nn

import adaptmoe as am
from adaptmoe.compat import colossal
from adaptmoe.compat.colossal import (MOE_CONTEXT, Experts, MoeGroups, MoeLayer, MoeLoss, NormalNoiseGenerator,
                                      Top1Router, Top2Router, UniformNoiseGenerator, create_moe_groups, moe_set_seed)
from compat_helpers import assert_same, same

D, FF, E = 16, 32, 4


class VanillaFFN(nn.Module):
    def __init__(self, d_model, d_ff, drop_rate=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(drop_rate))

    def forward(self, x):
        return self.net(x)


def moe_mlp_args(d_model, d_ff, drop_rate):
    return dict(d_model=d_model, d_ff=d_ff, drop_rate=drop_rate)


@pytest.fixture(autouse=True)
def fresh_context():
    saved = (MOE_CONTEXT.groups, MOE_CONTEXT.seed)
    MOE_CONTEXT.reset_loss()
    yield
    MOE_CONTEXT.groups, MOE_CONTEXT.seed = saved
    MOE_CONTEXT.reset_loss()


def test_tutorial_code_runs():
    num_experts, d_model, d_ff, drop_rate, capacity_factor = E, D, FF, 0.1, 1.2
    moe_set_seed(42)
    noisy_func = NormalNoiseGenerator(num_experts)
    shared_router = Top2Router(capacity_factor, noisy_func=noisy_func)
    shared_experts = Experts(expert=VanillaFFN, num_experts=num_experts,
                             **moe_mlp_args(d_model=d_model, d_ff=d_ff, drop_rate=drop_rate))
    ffn = MoeLayer(dim_model=d_model, num_experts=num_experts, router=shared_router, experts=shared_experts)
    criterion = MoeLoss(aux_weight=0.01, loss_fn=nn.CrossEntropyLoss, label_smoothing=0.1)
    head = nn.Linear(d_model, 5)
    logits = head(ffn(torch.randn(4, 6, d_model))).reshape(-1, 5)
    labels = torch.randint(0, 5, (24,))
    main = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    aux = ffn.l_aux
    loss = criterion(logits, labels)
    torch.testing.assert_close(loss, main + 0.01 * aux)
    loss.backward()
    assert ffn.gate_weight.grad is not None and MOE_CONTEXT.get_loss().item() == 0.0


def typed_twin(layer, k):
    gate = am.GateConfig(kind="softmax", top_k=k, capacity_factor=1.0, normalize_topk=False, fp32=True)
    typed = am.MoELayer(am.MoEConfig(model_dim=D, num_experts=E, gate=gate,
                                     experts=am.ExpertConfig(hidden_size=FF, activation="gelu")))
    bank = layer.layer.experts.module.bank
    with torch.no_grad():
        typed.gates[0].wg.weight.copy_(layer.gate_weight)
        for p, q in zip(bank.parameters(), typed.experts.parameters()):
            q.copy_(p)
    pairs = [("gate", layer.gate_weight, typed.gates[0].wg.weight, same)]
    pairs += [(n, p, q, same) for (n, p), q in zip(bank.named_parameters(), typed.experts.parameters())]
    return typed, pairs


@pytest.mark.parametrize("router_cls,k", [(Top1Router, 1), (Top2Router, 2)])
def test_matches_typed_layer_with_colossal_capacity(router_cls, k):
    torch.manual_seed(5)
    router = router_cls(capacity_factor_train=0.6, min_capacity=1)
    layer = MoeLayer(D, E, router, Experts(VanillaFFN, E, d_model=D, d_ff=FF))
    assert type(layer.layer.experts.module.bank).__name__ == "FFNExperts"   # plain MLPs run batched
    typed, pairs = typed_twin(layer, k)
    x = torch.randn(30, D)
    cf = router.capacity_factor(30, E)
    assert_same(layer, typed, x, pairs, call_b=lambda m, x: m(x, capacity_factor=cf))
    assert layer.layer.last_routing.capacity == router.get_capacity(30, E)   # ColossalAI's slot count
    assert bool((layer.layer.last_routing.slots_TK < 0).any()), "this case must drop tokens"
    torch.testing.assert_close(layer.l_aux, typed.l_aux)


def test_capacity_rules():
    r = Top2Router(capacity_factor_train=1.25, capacity_factor_eval=2.0, min_capacity=4)
    assert r.get_capacity(100, 8) == 32          # floor(2 * 1.25 * 100 / 8) = 31, made even
    assert r.get_capacity(4, 8) == 4             # min_capacity
    r.eval()
    assert r.get_capacity(100, 8) == 50
    r = Top1Router(drop_tks=False).eval()
    assert r.capacity_factor(100, 8) == 0.0      # evaluation without dropping: dropless


def test_noise_generators_and_training_only_noise():
    torch.manual_seed(6)
    x = torch.zeros(20000)
    assert abs(NormalNoiseGenerator(4)(x).std().item() - 1 / 16) < 0.005
    y = UniformNoiseGenerator(0.1)(torch.ones(1000))
    assert 0.9 <= y.min().item() and y.max().item() <= 1.1 and y.std().item() > 0.01
    router = Top2Router(noisy_func=UniformNoiseGenerator(0.5))
    layer = MoeLayer(D, E, router, Experts(VanillaFFN, E, d_model=D, d_ff=FF))
    x = torch.randn(40, D)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_shared_experts_share_parameters():
    experts = Experts(VanillaFFN, E, d_model=D, d_ff=FF, drop_rate=0.1)
    assert type(experts.bank).__name__ == "ExpertList"   # active dropout: each expert runs as written
    a = MoeLayer(D, E, Top1Router(), experts)
    b = MoeLayer(D, E, Top1Router(), experts)
    shared = {id(p) for p in a.layer.experts.parameters()} & {id(p) for p in b.layer.experts.parameters()}
    assert len(shared) == len(list(experts.parameters())) > 0
    assert all(getattr(p, "_adaptmoe_expert", False) for p in experts.parameters())


def test_expert_seeds_are_per_rank_and_leave_the_main_stream_alone():
    def weights():
        return torch.cat([p.detach().flatten() for p in Experts(VanillaFFN, E, d_model=D, d_ff=FF).parameters()])

    moe_set_seed(3)
    first, after = weights(), torch.rand(3)
    moe_set_seed(3)
    torch.testing.assert_close(weights(), first)
    torch.testing.assert_close(torch.rand(3), after)
    MOE_CONTEXT.groups = MoeGroups(ep_size=2, dp_size=1, ep_rank=1)   # as rank 1 of a 2-rank group would
    moe_set_seed(3)
    other = torch.cat([p.detach().flatten() for p in Experts(VanillaFFN, E, d_model=D, d_ff=FF).parameters()])
    assert other.numel() == first.numel() // 2 and not torch.equal(other, first[: other.numel()])


def test_groups_single_process():
    groups = create_moe_groups(1)
    assert (groups.ep_size, groups.dp_size, groups.ep_rank) == (1, 1, 0)
    with pytest.raises(ValueError, match="moe_model_parallel_size"):
        create_moe_groups(2)
    MOE_CONTEXT.groups = MoeGroups(ep_size=2, dp_size=1, ep_rank=0)
    with pytest.raises(ValueError, match="num_experts"):
        Experts(VanillaFFN, 3, d_model=D, d_ff=FF)


def test_moe_loss_only_counts_training_forwards():
    layer = MoeLayer(D, E, Top1Router(), Experts(VanillaFFN, E, d_model=D, d_ff=FF))
    criterion = MoeLoss(0.5, nn.MSELoss())
    x = torch.randn(8, D)
    layer.eval()
    y = layer(x)
    torch.testing.assert_close(criterion(y, x), nn.MSELoss()(y, x))
    layer.train()
    y = layer(x)
    torch.testing.assert_close(criterion(y, x), nn.MSELoss()(y, x) + 0.5 * layer.l_aux)


@pytest.mark.parametrize("build,exc,word", [
    (lambda: Top1Router(select_policy="random"), ValueError, "select_policy"),
    (lambda: Top2Router(capacity_factor_train=0), ValueError, "capacity_factor_train"),
    (lambda: Top2Router(min_capacity=-1), ValueError, "min_capacity"),
    (lambda: Top2Router(noisy_func=3), TypeError, "noisy_func"),
    (lambda: MoeLayer(D, E + 1, Top1Router(), Experts(VanillaFFN, E, d_model=D, d_ff=FF)), ValueError, "num_experts"),
    (lambda: MoeLayer(D, E, nn.Linear(2, 2), Experts(VanillaFFN, E, d_model=D, d_ff=FF)), TypeError, "router"),
    (lambda: MoeLayer(D, E, Top1Router(), nn.Linear(2, 2)), TypeError, "experts"),
    (lambda: MoeLayer(0, E, Top1Router(), Experts(VanillaFFN, E, d_model=D, d_ff=FF)), ValueError, "dim_model"),
    (lambda: Experts(None, E), TypeError, "expert_cls"),
    (lambda: MoeLoss(-1, nn.MSELoss), ValueError, "aux_weight"),
    (lambda: NormalNoiseGenerator(0), ValueError, "num_experts"),
])
def test_bad_arguments_name_the_argument(build, exc, word):
    with pytest.raises(exc, match=word):
        build()


def test_wrong_input_dims():
    layer = MoeLayer(D, E, Top1Router(), Experts(VanillaFFN, E, d_model=D, d_ff=FF))
    with pytest.raises(ValueError, match="dim_model"):
        layer(torch.randn(3, D + 1))
    assert colossal.moe_env is MOE_CONTEXT
