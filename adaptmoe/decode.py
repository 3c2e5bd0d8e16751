"""Small-batch (decode) expert path: touch only the experts the tokens selected, never sync the host.

Legend: T tokens, D model dim, H expert hidden, O output dim, E experts, K top-k,
N = T*K (token, choice) pairs, c a chunk of pairs.

When few tokens arrive, a layer call costs what it reads: the weights of the experts that were
selected. This path routes with the layer's own gate and then computes each (token, choice) pair
against its expert without building the capacity/dispatch buffers of the general path. Every
shape depends only on T (never on routing), nothing is copied to the host, so a call can be
captured in a CUDA graph and traced by ``torch.compile`` without graph breaks.

Methods (``method=``):
- ``native``: ``adaptmoe.ops.decode_ffn``, CUDA kernels that stream each selected expert's weights
  once at close to copy bandwidth, apply them to all of that expert's pairs, fuse bias,
  activation, gating product and the weighted sum over k, in three launches. The default on CUDA
  when the extension loads and the activation is a built-in one.
- ``grouped_mm``: sort the pairs by expert, one ``torch._grouped_mm`` per weight matrix with
  device-side offsets. An expert with no rows has an empty group and is never read, so the weight
  bytes read are exactly the distinct selected experts'. CPU fp32/bf16, CUDA bf16 on sm90+.
- ``gather``: index the weights per pair (``w1[e_N]``) and run batched matrix-vector products.
  Reads N expert copies and writes them once: good only when N is tiny (T=1) or as the fallback
  for dtypes grouped_mm lacks (fp64, fp16 on CUDA). Chunked so the copies stay under a budget.
- ``dense``: each of the E experts over all N pairs, keeping the pairs routed to it. Reads every
  expert once; the fallback when N is too large to gather.

``decode_beats_grouped`` is the rule the serving layer uses when the planner is unavailable.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor

from . import ops
from .expert_compute import FFNWeights, ffn_one_expert, gated_product
from .gates import select_experts
from .routing import fusable_gate

METHODS = ("auto", "native", "grouped_mm", "gather", "dense")
DECODE_MAX_TOKENS = 64          # same cap as planner.cost: beyond it every expert is hit anyway
RIDGE_ROWS = 64                 # rows per expert below which an expert GEMM is weight-read bound
GATHER_BUDGET_BYTES = 256 << 20  # transient weight copies of the gather method, per chunk
DOWN_SPLIT_K = 1   # default split of the down projection (1 = off); callers pass split_k to change it
SPLIT_MAX_ROWS = 64
NATIVE_MAX_PAIRS_PER_EXPERT = 4   # auto: native while the selected experts see at most this many pairs

_verified: set[tuple] = set()   # (device, dtype) where grouped_mm ran once
_broken: set[tuple] = set()     # (device, dtype) where grouped_mm raised: use the fallbacks
_split_broken: set[tuple] = set()  # (device, dtype) where the split-K down projection raised


# -- the rule ---------------------------------------------------------------------------------
def expected_distinct_experts(tokens: int, num_experts: int, top_k: int) -> float:
    """Experts hit at least once when ``tokens`` each pick ``top_k`` of ``num_experts`` uniformly."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_beats_grouped(tokens: int, num_experts: int, top_k: int, *,
                         max_tokens: int = DECODE_MAX_TOKENS, ridge_rows: float = RIDGE_ROWS) -> bool:
    """True when the decode path should run: at most ``max_tokens`` tokens, and the rows each
    selected expert sees (T*K over the expected distinct experts) stay below the ridge where an
    expert GEMM stops being bound by reading its weights. Both paths then read the same weights,
    and decode saves the dispatch/combine buffers, the per-expert launches and the host sync."""
    if tokens <= 0 or tokens > max_tokens:
        return False
    distinct = expected_distinct_experts(tokens, num_experts, top_k)
    return tokens * top_k <= ridge_rows * distinct


# -- method choice ----------------------------------------------------------------------------
_capability: dict[int, tuple[int, int]] = {}


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability, cached by an eager call (a trace reads the cache only; None if empty)."""
    index = device.index or 0
    if index not in _capability:
        if torch.compiler.is_compiling():
            return None
        _capability[index] = torch.cuda.get_device_capability(index)
    return _capability[index]


def _device_key(x: Tensor) -> tuple:
    return (x.device.type, x.device.index, x.dtype)


def grouped_mm_supported(x_TD: Tensor, hidden: int, out_dim: int) -> bool:
    """Whether ``torch._grouped_mm`` runs for this device, dtype and shape (no device work)."""
    if not hasattr(torch, "_grouped_mm") or _device_key(x_TD) in _broken:
        return False
    if x_TD.device.type == "cpu":
        # torch's fake (meta) implementation only admits bf16, so traced calls use bf16 only.
        allowed = (torch.bfloat16,) if torch.compiler.is_compiling() else (torch.float32, torch.bfloat16)
        # grouped_mm needs 16-byte row strides on CPU too (odd D, H or O raise there).
        aligned = all(n * x_TD.element_size() % 16 == 0 for n in (x_TD.shape[1], hidden, out_dim))
        return x_TD.dtype in allowed and aligned
    if x_TD.device.type != "cuda" or x_TD.dtype != torch.bfloat16:
        return False
    aligned = all(n % 8 == 0 for n in (x_TD.shape[1], hidden, out_dim))   # 16-byte row strides
    capability = cuda_capability(x_TD.device) if aligned else None
    return capability is not None and capability >= (9, 0)


def resolve_method(method: str, x_TD: Tensor, num_pairs: int, weights: FFNWeights, act: Callable,
                   top_k: int = 1) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if method == "native":
        blocker = ops.native_decode_blocker(x_TD, weights, act, num_pairs)
        if blocker is not None:
            raise ValueError(f"method 'native' cannot serve this call: {blocker}")
    if method != "auto":
        return method
    # native streams each expert's weights at close to copy bandwidth but spends CUDA-core FMAs
    # per pair (and streams again past 8 pairs); with more rows per expert the
    # tensor-core grouped GEMM wins (scripts/bench_decode.py on H100: crossover near 4).
    E, H = weights.w1_eHD.shape[0], weights.w1_eHD.shape[1]
    tokens = num_pairs // max(1, top_k)
    few_rows = num_pairs <= NATIVE_MAX_PAIRS_PER_EXPERT * max(1.0, expected_distinct_experts(tokens, E, top_k))
    if few_rows and ops.native_decode_blocker(x_TD, weights, act, num_pairs) is None:
        return "native"
    if grouped_mm_supported(x_TD, H, weights.w2_eHO.shape[2]):
        return "grouped_mm"
    # gather reads, writes and re-reads each pair's expert: ~3N expert passes against E.
    return "gather" if 3 * num_pairs <= E else "dense"


# -- the three methods ------------------------------------------------------------------------
def _sorted_pairs(e_N: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(order_N, ends_E): pairs in expert order (masked pairs, e == E, last) and each expert's
    end offset in that order, int32 on the device (no host sync)."""
    order_N = torch.argsort(e_N, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=e_N.device)
    counts.scatter_add_(0, e_N, torch.ones_like(e_N))
    ends_E = torch.cumsum(counts[:num_experts], 0).to(torch.int32)
    return order_N, ends_E


def _grouped_mm_ffn(x_ND: Tensor, e_N: Tensor, w: FFNWeights, act: Callable, split_k: int = 1) -> Tensor:
    E = w.w1_eHD.shape[0]
    if any(t is not None and t.dtype != x_ND.dtype for t in w):   # autocast: fp32 weights, bf16 x
        w = FFNWeights(*[None if t is None else t.to(x_ND.dtype) for t in w])
    order_N, ends_E = _sorted_pairs(e_N, E)
    xs_ND = x_ND.index_select(0, order_N)
    es_N = e_N.index_select(0, order_N).clamp(max=E - 1)    # masked pairs: any valid expert
    h_NH = torch._grouped_mm(xs_ND, w.w1_eHD.transpose(1, 2), offs=ends_E)
    if w.b1_eH is not None:
        h_NH = h_NH + w.b1_eH.index_select(0, es_N)
    if w.w3_eHD is not None:
        h_NH = gated_product(h_NH, torch._grouped_mm(xs_ND, w.w3_eHD.transpose(1, 2), offs=ends_E), act)
    else:
        h_NH = act(h_NH)
    ys_NO = _down_projection(h_NH, w.w2_eHO, ends_E, split_k)
    if w.b2_eO is not None:
        ys_NO = ys_NO + w.b2_eO.index_select(0, es_N)
    # Rows past the last offset (masked pairs) are left uninitialised; the caller masks them.
    return torch.empty_like(ys_NO).index_copy_(0, order_N, ys_NO)


def _split_destinations(ends_E: Tensor, rows: int, split_k: int) -> Tensor:
    """dest_NS: where K-slice j of sorted row r goes so that the rows of group (e, j) are
    contiguous (groups in e-major order); masked rows (past the last end) go past every group."""
    ends = ends_E.long()
    counts_E = torch.diff(ends, prepend=ends.new_zeros(1))
    r_N = torch.arange(rows, device=ends.device)
    e_N = torch.searchsorted(ends, r_N, right=True).clamp(max=ends.numel() - 1)
    start_N, count_N = (ends - counts_E).index_select(0, e_N), counts_E.index_select(0, e_N)
    j_S = torch.arange(split_k, device=ends.device)
    dest_NS = (start_N * split_k).unsqueeze(1) + j_S * count_N.unsqueeze(1) + (r_N - start_N).unsqueeze(1)
    beyond_NS = r_N.unsqueeze(1) * split_k + j_S
    return torch.where((r_N < ends[-1]).unsqueeze(1), dest_NS, beyond_NS)


def _down_projection(h_NH: Tensor, w2_eHO: Tensor, ends_E: Tensor, split_k: int) -> Tensor:
    """y = h @ w2[e] per sorted row. With split_k > 1 the hidden (reduction) dim is cut into
    split_k slices run as E*split_k groups, so a few rows still spread over many thread blocks
    (each reads 1/split_k of an expert); the slices' partial sums are added in float32."""
    if split_k <= 1:
        return torch._grouped_mm(h_NH, w2_eHO, offs=ends_E)
    N, H = h_NH.shape
    E, O = w2_eHO.shape[0], w2_eHO.shape[2]
    dest = _split_destinations(ends_E, N, split_k).reshape(-1)
    a_MS = torch.empty(N * split_k, H // split_k, dtype=h_NH.dtype, device=h_NH.device)
    a_MS.index_copy_(0, dest, h_NH.reshape(N * split_k, H // split_k))
    counts_E = torch.diff(ends_E.long(), prepend=ends_E.new_zeros(1, dtype=torch.int64))
    # expand, not repeat_interleave: a static shape with no chance of a host sync
    offs_G = torch.cumsum(counts_E.unsqueeze(1).expand(E, split_k).reshape(-1), 0).to(torch.int32)
    p_MO = torch._grouped_mm(a_MS, w2_eHO.reshape(E * split_k, H // split_k, O), offs=offs_G)
    return p_MO.index_select(0, dest).view(N, split_k, O).float().sum(1).to(h_NH.dtype)


def split_k_for(rows: int, hidden: int, x: Tensor, split_k: int | None = None) -> int:
    """The down projection's split for ``rows`` sorted rows. An explicit ``split_k`` is used as
    given; None means ``DOWN_SPLIT_K`` (1 = off) on CUDA while
    rows <= SPLIT_MAX_ROWS and each slice keeps 16-byte aligned rows, else 1."""
    if split_k is not None:
        bad = isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1 or hidden % split_k
        if bad or (hidden // split_k * x.element_size()) % 16:
            raise ValueError(f"split_k must divide hidden={hidden} into slices of a multiple of 16 bytes "
                             f"({x.element_size()}-byte {x.dtype}), got {split_k!r}")
        return split_k
    s = DOWN_SPLIT_K
    if s <= 1 or x.device.type != "cuda" or rows > SPLIT_MAX_ROWS or hidden % (8 * s):
        return 1
    return 1 if _device_key(x) in _split_broken else s


def _gather_ffn(x_ND: Tensor, e_N: Tensor, w: FFNWeights, act: Callable, split_k: int = 1) -> Tensor:
    E, H, D = w.w1_eHD.shape
    matrices = 3 if w.w3_eHD is not None else 2
    per_pair = matrices * H * D * w.w1_eHD.element_size()
    chunk = max(1, GATHER_BUDGET_BYTES // per_pair)
    e_N = e_N.clamp(max=E - 1)
    outputs = []
    for start in range(0, x_ND.shape[0], chunk):    # N is static: a fixed, sync-free loop
        e_c, x_c1D = e_N[start:start + chunk], x_ND[start:start + chunk].unsqueeze(1)
        h_c1H = torch.bmm(x_c1D, w.w1_eHD.index_select(0, e_c).transpose(1, 2))
        if w.b1_eH is not None:
            h_c1H = h_c1H + w.b1_eH.index_select(0, e_c).unsqueeze(1)
        h_c1H = act(h_c1H)
        if w.w3_eHD is not None:
            h_c1H = h_c1H * torch.bmm(x_c1D, w.w3_eHD.index_select(0, e_c).transpose(1, 2))
        y_c1O = torch.bmm(h_c1H, w.w2_eHO.index_select(0, e_c))
        if w.b2_eO is not None:
            y_c1O = y_c1O + w.b2_eO.index_select(0, e_c).unsqueeze(1)
        outputs.append(y_c1O.squeeze(1))
    return torch.cat(outputs, 0) if outputs else x_ND.new_zeros(0, w.w2_eHO.shape[2])


def _dense_ffn(x_ND: Tensor, e_N: Tensor, w: FFNWeights, act: Callable, split_k: int = 1) -> Tensor:
    y_NO = x_ND.new_zeros(x_ND.shape[0], w.w2_eHO.shape[2])
    for e in range(w.w1_eHD.shape[0]):
        y_NO = torch.where((e_N == e).unsqueeze(1), ffn_one_expert(x_ND, w, e, act), y_NO)
    return y_NO


_METHOD_FNS = {"grouped_mm": _grouped_mm_ffn, "gather": _gather_ffn, "dense": _dense_ffn}


def _may_probe(x: Tensor, split_k: int) -> bool:
    """Eager CUDA call not yet known to work: try grouped_mm once and fall back if it raises."""
    if torch.compiler.is_compiling() or x.device.type != "cuda" or _device_key(x) + (split_k,) in _verified:
        return False
    return not torch.cuda.is_current_stream_capturing()


def _fallback(x_ND: Tensor, w: FFNWeights) -> Callable:
    return _METHOD_FNS["gather" if 3 * x_ND.shape[0] <= w.w1_eHD.shape[0] else "dense"]


def _run_method(method: str, x_ND: Tensor, e_N: Tensor, w: FFNWeights, act: Callable, split_k: int) -> Tensor:
    if method != "grouped_mm" or not _may_probe(x_ND, split_k):
        return _METHOD_FNS[method](x_ND, e_N, w, act, split_k)
    key = _device_key(x_ND) + (split_k,)
    try:
        y_NO = _grouped_mm_ffn(x_ND, e_N, w, act, split_k)
    except RuntimeError as exc:
        if split_k > 1:   # keep grouped_mm, drop the split
            _split_broken.add(_device_key(x_ND))
            warnings.warn(f"split-K down projection failed on {key} ({exc}); decode runs it unsplit",
                          RuntimeWarning, stacklevel=3)
            return _run_method(method, x_ND, e_N, w, act, 1)
        _broken.add(_device_key(x_ND))
        warnings.warn(f"torch._grouped_mm failed on {key} ({exc}); the decode path falls back to "
                      f"gather/dense for this device and dtype", RuntimeWarning, stacklevel=3)
        return _fallback(x_ND, w)(x_ND, e_N, w, act)
    _verified.add(key)
    return y_NO


# -- public entry points ----------------------------------------------------------------------
def valid_mask(num_tokens: int, num_valid_tokens: Tensor | int | None, device: torch.device) -> Tensor | None:
    """Bool mask of the first ``num_valid_tokens`` tokens (a device scalar keeps it graph-safe)."""
    if num_valid_tokens is None:
        return None
    return torch.arange(num_tokens, device=device) < num_valid_tokens


def selected_expert_ffn(x_TD: Tensor, indices_TK: Tensor, weights_TK: Tensor, weights: FFNWeights,
                        act: Callable[[Tensor], Tensor], *, is_postscore: bool = True,
                        valid_T: Tensor | None = None, num_valid_tokens: Tensor | int | None = None,
                        method: str = "auto", split_k: int | None = None) -> Tensor:
    """y_TO[t] = sum_k weights_TK[t, k] * expert_{indices_TK[t, k]}(x_TD[t]) (post-score), or the
    expert of the scaled input (pre-score). Tokens where ``valid_T`` is False (padding of a CUDA
    graph bucket) touch no expert and come back as zeros; ``num_valid_tokens`` says the same as a
    count (the first tokens are real), which the native kernels read on the device instead of
    masking first. ``split_k``: see ``split_k_for``."""
    T, K = indices_TK.shape
    E, H = weights.w1_eHD.shape[0], weights.w1_eHD.shape[1]
    resolved = resolve_method(method, x_TD, T * K, weights, act, K)
    if resolved == "native" and valid_T is None and (num_valid_tokens is None or isinstance(num_valid_tokens, Tensor)):
        # a device count is read by the kernels; a Python int takes the mask below (no H2D copy)
        count = None if num_valid_tokens is None else num_valid_tokens.to(device=x_TD.device, dtype=torch.int64)
        return _native_ffn(x_TD, indices_TK, weights_TK, weights, act, is_postscore, count)
    if valid_T is None and num_valid_tokens is not None:
        valid_T = valid_mask(T, num_valid_tokens, x_TD.device)
    e_TK = indices_TK if valid_T is None else torch.where(valid_T.unsqueeze(1), indices_TK, E)
    if resolved == "native":
        return _native_ffn(x_TD, e_TK, weights_TK, weights, act, is_postscore)
    split = split_k_for(T * K, H, x_TD, split_k)
    x_ND = x_TD.unsqueeze(1).expand(T, K, x_TD.shape[1]).reshape(T * K, x_TD.shape[1])
    if not is_postscore:
        x_ND = x_ND * weights_TK.reshape(-1, 1).to(x_ND.dtype)
    y_NO = _run_method(resolved, x_ND, e_TK.reshape(-1), weights, act, split)
    y_TKO = y_NO.view(T, K, weights.w2_eHO.shape[2])
    if is_postscore:
        acc = torch.promote_types(y_TKO.dtype, weights_TK.dtype)
        y_TO = (y_TKO.to(acc) * weights_TK.to(acc).unsqueeze(2)).sum(1)
    else:
        y_TO = y_TKO.sum(1)
    if valid_T is not None:
        y_TO = torch.where(valid_T.unsqueeze(1), y_TO, torch.zeros((), dtype=y_TO.dtype, device=y_TO.device))
    return y_TO


def _native_ffn(x_TD: Tensor, e_TK: Tensor, weights_TK: Tensor, w: FFNWeights, act: Callable,
                is_postscore: bool, num_valid_tokens: Tensor | None = None) -> Tensor:
    if any(t is not None and t.dtype != x_TD.dtype for t in w):   # autocast: fp32 weights, bf16 x
        w = FFNWeights(*[None if t is None else t.to(x_TD.dtype) for t in w])
    out_dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype) if is_postscore else x_TD.dtype
    # masked tokens carry expert E: they select nothing and come back as zeros
    return ops.decode_ffn(x_TD.contiguous(), e_TK, weights_TK, is_postscore, tuple(w), act, 0, out_dtype,
                          num_valid_tokens)


def route_tokens(layer, x_TD: Tensor, *, top_k: int, gate_index: int = 0) -> tuple[Tensor, Tensor]:
    """(indices_TK, weights_TK) from the layer's gate with inference semantics (no noise, no
    expert dropout); routing stays out of autocast like the layer's own."""
    gate_cfg = layer.config.gates[gate_index]
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        logits_TE = layer.gates[gate_index](x_TD)
        if x_TD.is_cuda and fusable_gate(gate_cfg, False):
            # one fused kernel instead of softmax, top-k, gather and renormalisation: at T=1 the
            # launches, not the arithmetic, are what routing costs
            sigmoid = gate_cfg.kind in ("sigmoid", "sinkmoid")
            indices_TK, weights_TK = ops.route_topk(logits_TE, top_k, "sigmoid" if sigmoid else "softmax",
                                                    gate_cfg.normalize_topk and top_k > 1, None)[:2]
        else:
            indices_TK, weights_TK, _ = select_experts(logits_TE, gate_cfg, top_k, False)
    return indices_TK, weights_TK


def decode_supported(layer) -> str | None:
    """None when ``layer`` can run the decode path, else the reason it cannot."""
    if layer.layout.world_size != 1:
        return f"decode runs in one process; this layer spans {layer.layout.world_size} ranks"
    if not hasattr(layer.experts, "stored_weights"):
        return "decode needs built-in experts (ffn or gated_ffn), got custom experts"
    return None


def decode_forward(layer, x_TD: Tensor, *, top_k: int, gate_index: int = 0, valid_T: Tensor | None = None,
                   num_valid_tokens: Tensor | int | None = None, method: str = "auto",
                   split_k: int | None = None) -> Tensor:
    """One dropless inference call of ``layer`` on ``x_TD`` ([T, D] in the compute dtype) through
    the decode path; returns y_TO in the compute dtype."""
    indices_TK, weights_TK = route_tokens(layer, x_TD, top_k=top_k, gate_index=gate_index)
    experts = layer.experts
    return selected_expert_ffn(x_TD, indices_TK, weights_TK, experts.stored_weights(), experts.activation,
                               is_postscore=layer.config.is_postscore, valid_T=valid_T,
                               num_valid_tokens=num_valid_tokens, method=method, split_k=split_k)
