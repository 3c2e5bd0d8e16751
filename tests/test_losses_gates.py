"""Aux losses against hand computations; gate behaviours (noise, sinkhorn, expert dropout)."""
import math

import torch

import adaptmoe as am
from adaptmoe import losses
from adaptmoe.gates import select_experts, sinkhorn


def test_gshard_loss_hand_computed():
    scores_TE = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    indices_TK = torch.tensor([[0, 1], [1, 2], [0, 1], [2, 0]])
    mean_p = scores_TE.mean(0)                        # [0.375, 0.3125, 0.3125]
    frac = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    expected = 3 * float((mean_p * frac).sum())
    assert math.isclose(float(losses.gshard_loss(scores_TE, indices_TK)), expected, rel_tol=1e-6)
    uniform = torch.full((6, 3), 1 / 3)
    balanced = torch.tensor([[0], [1], [2], [0], [1], [2]])
    assert math.isclose(float(losses.gshard_loss(uniform, balanced)), 1.0, rel_tol=1e-6)


def test_z_loss_and_entropy_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert math.isclose(float(losses.z_loss(logits)), (math.log(2) ** 2 + math.log(4) ** 2) / 2, rel_tol=1e-6)
    mean_p = torch.tensor([(0.5 + 0.75) / 2, (0.5 + 0.25) / 2])
    entropy = -float((mean_p * mean_p.log()).sum())
    assert math.isclose(float(losses.entropy_loss(logits)), -entropy, rel_tol=1e-6)


def test_load_importance_is_zero_when_perfectly_balanced_and_positive_otherwise():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert float(losses.load_importance_loss(logits, logits, 1, 1.0)) < 1e-6
    skewed = torch.tensor([[3.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    assert float(losses.load_importance_loss(skewed, skewed, 1, 1.0)) > 0.1


def test_layer_returns_selected_losses_unscaled():
    torch.manual_seed(0)
    gate = am.GateConfig(top_k=2, losses=("gshard", "z_loss", "entropy", "load_importance"), noise_std=1.0)
    layer = am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, gate=gate, experts=am.ExpertConfig(hidden_size=8)))
    x = torch.randn(12, 8)
    y = layer(x)
    assert set(layer.losses) == {"gshard", "z_loss", "entropy", "load_importance"}
    logits = layer.gates[0](x)
    assert math.isclose(float(layer.losses["z_loss"].detach()), float(losses.z_loss(logits.detach())), rel_tol=1e-5)
    assert math.isclose(float(y.l_aux), float(sum(layer.losses.values())), rel_tol=1e-6)
    y.l_aux.backward()
    assert layer.gates[0].wg.weight.grad.abs().sum() > 0


def test_noise_only_in_training_and_sinkhorn_selection():
    cfg = am.GateConfig(kind="sinkmoid", top_k=1, sinkhorn_iters=20)
    logits = torch.tensor([[5.0, 4.0], [5.0, 1.0], [5.0, 0.0], [5.0, 2.0]])
    idx_eval, w_eval, _ = select_experts(logits, cfg, 1, training=False)
    assert idx_eval.reshape(-1).tolist() == [0, 0, 0, 0]
    idx_train, w_train, _ = select_experts(logits, cfg, 1, training=True)
    # Sinkhorn balances the assignment: half the tokens move to expert 1, the ones that lose least.
    assert sorted(idx_train.reshape(-1).tolist()) == [0, 0, 1, 1] and int(idx_train[0]) == 1
    torch.testing.assert_close(w_train, torch.sigmoid(logits.gather(1, idx_train)))
    balanced = sinkhorn(logits, 50).exp()
    torch.testing.assert_close(balanced.sum(1), torch.ones(4), rtol=1e-4, atol=1e-4)


def test_expert_dropout_and_noise_change_training_choices_only():
    torch.manual_seed(0)
    gate = am.GateConfig(top_k=1, expert_dropout=0.5, noise_std=0.0)
    layer = am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, gate=gate, experts=am.ExpertConfig(hidden_size=8)))
    x = torch.randn(64, 8)
    layer.eval()
    layer(x)
    eval_choice = layer.last_routing.indices_TK.clone()
    layer(x)
    assert torch.equal(eval_choice, layer.last_routing.indices_TK)
    layer.train()
    layer(x)
    assert not torch.equal(eval_choice, layer.last_routing.indices_TK)


def test_cosine_gate_is_scale_invariant_in_tokens():
    torch.manual_seed(0)
    layer = am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, gate=am.GateConfig(kind="cosine", top_k=2,
                                                                                     cosine_proj_dim=6),
                                     experts=am.ExpertConfig(hidden_size=8)))
    with torch.no_grad():
        layer.gates[0].cosine_projector.bias.zero_()
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer.gates[0](x), layer.gates[0](3.0 * x), rtol=1e-5, atol=1e-5)
