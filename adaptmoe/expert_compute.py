"""Expert math as pure functions over explicit weight tensors.

Legend: e local experts, C rows per expert (capacity), R routed rows (expert-major, grouped),
D model dim, H hidden (possibly a 1/r slice), O output dim. The executor passes stored or
transiently gathered weights; the functions never look at where the weights came from.

Layouts (Tutel-compatible): w1_eHD (nn.Linear layout), w2_eHO (transposed: input H, output O),
gated FFN adds w3_eHD (the "up" projection multiplied with act(x w1)).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class FFNWeights(NamedTuple):
    w1_eHD: Tensor
    w2_eHO: Tensor
    b1_eH: Tensor | None = None
    b2_eO: Tensor | None = None
    w3_eHD: Tensor | None = None    # gated FFN only


def ffn_padded(x_eCD: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Batched FFN over a capacity-padded buffer [e, C, D] -> [e, C, O]."""
    def bmm(a, b, transpose):
        return torch.bmm(a, b.transpose(1, 2) if transpose else b)
    h_eCH = _hidden_padded(x_eCD, w, act, bmm)
    y_eCO = torch.bmm(h_eCH, w.w2_eHO)
    if w.b2_eO is not None:
        y_eCO = y_eCO + w.b2_eO.unsqueeze(1)
    return y_eCO


def _hidden_padded(x_eCD, w: FFNWeights, act, bmm):
    h = bmm(x_eCD, w.w1_eHD, True)
    if w.b1_eH is not None:
        h = h + w.b1_eH.unsqueeze(1)
    h = act(h)
    if w.w3_eHD is not None:
        h = h * bmm(x_eCD, w.w3_eHD, True)
    return h


def ffn_grouped(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """FFN over exactly the routed rows: rows of expert i are contiguous, ``counts_e[i]`` of them.
    Reference: one matmul per expert (reads counts on the host)."""
    outputs = []
    start = 0
    for i, n in enumerate(counts_e.tolist()):
        x_nD = x_RD[start:start + n]
        start += n
        h_nH = x_nD @ w.w1_eHD[i].t()
        if w.b1_eH is not None:
            h_nH = h_nH + w.b1_eH[i]
        h_nH = act(h_nH)
        if w.w3_eHD is not None:
            h_nH = h_nH * (x_nD @ w.w3_eHD[i].t())
        y_nO = h_nH @ w.w2_eHO[i]
        if w.b2_eO is not None:
            y_nO = y_nO + w.b2_eO[i]
        outputs.append(y_nO)
    if not outputs:
        return x_RD.new_zeros(0, w.w2_eHO.shape[2])
    return torch.cat(outputs, dim=0)
