"""Auxiliary losses of the router, returned unscaled (the user picks the weight).

Legend: T tokens, E experts, K top-k. Every loss is 0 for a call with no tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gshard_loss(scores_TE: Tensor, indices_TK: Tensor) -> Tensor:
    """E * sum_e mean_t(p_te) * fraction of tokens whose first choice is e (1.0 when balanced).
    Eager CUDA calls run the native kernels (``ops.gshard_loss_native``); this is the reference."""
    from .ops import gshard_loss_native   # lazy: ops imports modules that import this one
    native = gshard_loss_native(scores_TE, indices_TK)
    if native is not None:
        return native
    T, E = scores_TE.shape
    mean_prob_E = torch.mean(scores_TE, dim=0, dtype=torch.float32)   # fp32 accumulation, no fp32 copy
    # sum_e mean_e * count_e / T == sum_t mean[first choice of t] / T: one gather instead of a
    # histogram (no bincount host sync, and fewer launches on every call)
    return mean_prob_E.index_select(0, indices_TK[:, 0]).sum() * (E / max(T, 1))


def _cv_squared(values_E: Tensor) -> Tensor:
    if values_E.numel() < 2:
        return values_E.new_zeros(())
    return values_E.var() / (values_E.mean() ** 2 + 1e-10)


def load_importance_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, top_k: int, noise_std: float) -> Tensor:
    """Shazeer et al.: CV^2 of importance (summed probabilities) plus CV^2 of the smooth load, the
    probability that each expert stays in the top-k under fresh noise. Unlike Tutel, the
    threshold and the compared value are both logits (Tutel mixes probabilities and logits)."""
    T, E = clean_logits_TE.shape
    importance_E = torch.softmax(clean_logits_TE.float(), dim=1).sum(dim=0)
    sigma = noise_std / E
    if top_k >= E:
        load_E = clean_logits_TE.new_full((E,), float(T))
    else:
        top_vals_TK1 = torch.topk(noisy_logits_TE.float(), top_k + 1, dim=1).values
        in_topk_TE = noisy_logits_TE.float() >= top_vals_TK1[:, top_k - 1:top_k]
        # An expert inside the top-k must beat the (k+1)-th value to stay; one outside, the k-th.
        threshold_TE = torch.where(in_topk_TE, top_vals_TK1[:, top_k:top_k + 1], top_vals_TK1[:, top_k - 1:top_k])
        normal = torch.distributions.Normal(0.0, 1.0)
        load_E = normal.cdf((clean_logits_TE.float() - threshold_TE) / sigma).sum(dim=0)
    return (_cv_squared(importance_E) + _cv_squared(load_E)) / 2


def entropy_loss(logits_TE: Tensor) -> Tensor:
    """sigma-MoE: minus the entropy of the batch-mean routing distribution (favours using all experts)."""
    log_p_TE = torch.log_softmax(logits_TE.float(), dim=1)
    log_mean_E = torch.logsumexp(log_p_TE, dim=0) - torch.log(torch.tensor(float(logits_TE.shape[0])))
    return torch.sum(log_mean_E.exp() * log_mean_E)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return torch.logsumexp(logits_TE.float(), dim=1).pow(2).mean()


def compute_losses(kinds: tuple[str, ...], *, clean_logits_TE: Tensor, noisy_logits_TE: Tensor,
                   scores_TE: Tensor, indices_TK: Tensor, noise_std: float) -> dict[str, Tensor]:
    T = clean_logits_TE.shape[0]
    out: dict[str, Tensor] = {}
    for kind in kinds:
        if kind == "none":
            continue
        if T == 0:
            out[kind] = clean_logits_TE.new_zeros((), dtype=torch.float32)
        elif kind == "gshard":
            out[kind] = gshard_loss(scores_TE, indices_TK)
        elif kind == "load_importance":
            out[kind] = load_importance_loss(clean_logits_TE, noisy_logits_TE, indices_TK.shape[1], noise_std)
        elif kind == "entropy":
            out[kind] = entropy_loss(clean_logits_TE)
        elif kind == "z_loss":
            out[kind] = z_loss(clean_logits_TE)
    return out
