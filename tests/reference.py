"""Brute-force float64 reference of one MoE layer: loops over tokens and their top-k experts.

Slow and obvious on purpose. It re-derives routing (scores, top-k, GShard priority, capacity)
from the layer's parameters instead of reusing adaptmoe's routing code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda x: x}


def gate_logits(layer, x_TD, gate_index=0):
    gate = layer.gates[gate_index]
    kind = layer.config.gates[gate_index].kind
    x = x_TD.double()
    if kind == "cosine":
        proj = x @ gate.cosine_projector.weight.double().t() + gate.cosine_projector.bias.double()
        proj = proj / proj.norm(dim=1, keepdim=True).clamp(min=1e-12)
        sim = gate.sim_matrix.double()
        sim = sim / sim.norm(dim=0, keepdim=True).clamp(min=1e-12)
        return proj @ sim * gate.temperature.double().clamp(max=math.log(100.0)).exp()
    return x @ gate.wg.weight.double().t()


def route(layer, logits_TE, top_k, capacity_factor, gate_index=0):
    """Returns list over tokens of [(expert, weight)] kept after capacity."""
    cfg = layer.config.gates[gate_index]
    T, E = logits_TE.shape
    sigmoid = cfg.kind in ("sigmoid", "sinkmoid")
    choices, weights = [], []
    for t in range(T):
        row = logits_TE[t]
        scores = torch.sigmoid(row) if sigmoid else torch.softmax(row, 0)
        order = sorted(range(E), key=lambda e: (-float(row[e].detach()), e))[:top_k]
        if cfg.activation_after_topk:
            picked = row[order]
            w = torch.sigmoid(picked) if sigmoid else torch.softmax(picked, 0)
        else:
            w = scores[order]
        if cfg.normalize_topk and top_k > 1:
            w = w / w.sum()
        choices.append(order)
        weights.append(w)
    keep = capacity_keep(choices, T, E, top_k, capacity_factor, logits_TE.detach(), cfg.batch_prioritized, sigmoid)
    return [[(choices[t][k], weights[t][k]) for k in range(top_k) if keep[t][k]] for t in range(T)]


def capacity_keep(choices, T, E, top_k, cf, logits_TE, bpr, sigmoid):
    if cf == 0:
        return [[True] * top_k for _ in range(T)]
    cap = top_k * math.floor(abs(cf) * math.ceil(T / E)) if T else 0
    if bpr:
        conf = [float((torch.sigmoid(logits_TE[t]) / torch.sigmoid(logits_TE[t]).sum()).max() if sigmoid
                      else torch.softmax(logits_TE[t], 0).max()) for t in range(T)]
        token_order = sorted(range(T), key=lambda t: (-conf[t], t))
    else:
        token_order = list(range(T))
    used = [0] * E
    keep = [[False] * top_k for _ in range(T)]
    for k in range(top_k):            # all first choices before any second choice
        for t in token_order:
            e = choices[t][k]
            if used[e] < cap:
                keep[t][k] = True
            used[e] += 1
    return keep


def expert_forward(layer, e, x_D):
    ex = layer.experts
    act = ACTS[layer.config.experts.activation] if isinstance(layer.config.experts.activation, str) else layer.config.experts.activation
    h = ex.batched_fc1_w[e].double() @ x_D
    if ex.batched_fc1_bias is not None:
        h = h + ex.batched_fc1_bias[e].double()
    h = act(h)
    if getattr(ex, "batched_fc3_w", None) is not None:
        h = h * (ex.batched_fc3_w[e].double() @ x_D)
    y = h @ ex.batched_fc2_w[e].double()
    if ex.batched_fc2_bias is not None:
        y = y + ex.batched_fc2_bias[e].double()[: y.shape[0]]
    return y


def reference_forward(layer, x, *, top_k=None, capacity_factor=None, gate_index=0):
    """float64 output of ``layer`` (single process, eval-mode semantics: no noise)."""
    cfg = layer.config.gates[gate_index]
    k = cfg.top_k if top_k is None else top_k
    cf = cfg.capacity_factor if capacity_factor is None else capacity_factor
    x_TD = x.reshape(-1, layer.config.model_dim).double()
    logits = gate_logits(layer, x_TD, gate_index)
    routes = route(layer, logits, k, cf, gate_index)
    out_dim = layer.experts.output_dim
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(out_dim, dtype=torch.float64)
        for e, w in routes[t]:
            y = expert_forward(layer, e, x_TD[t])
            acc = acc + (w * y if layer.config.is_postscore else expert_forward_scaled(layer, e, x_TD[t], w))
        rows.append(acc)
    y = torch.stack(rows) if rows else torch.zeros(0, out_dim, dtype=torch.float64)
    return y.reshape(*x.shape[:-1], out_dim)


def expert_forward_scaled(layer, e, x_D, w):
    return expert_forward(layer, e, w * x_D)
