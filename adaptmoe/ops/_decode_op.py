"""torch.library registrations of adaptmoe::decode_ffn, the expert FFN of a few tokens that reads
only the selected experts' weights (native/decode_kernels.cu), and adaptmoe::act_mul, the gated
FFN's act(g) * u in one pass (native/elementwise_kernels.cu).

Legend: T tokens, K top-k, N = T*K pairs, E experts, D model dim, H expert hidden, O output dim.

Inference only (no autograd). CUDA tensors run the native kernels when the extension loads;
everything else runs the PyTorch reference below, which defines the semantics the GPU tests
compare against. The fake implementation makes the op opaque to ``torch.compile`` and safe to
capture in a CUDA graph (the native path never synchronizes with the host).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..experts import ACTIVATION_FNS
from . import _native
from ._ops import bypasses_dispatcher

# Activation codes of native/moe_kernels.h (enum Activation), by the function the experts hold.
ACTIVATION_CODES: dict[str, int] = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "swish": 4,
                                    "tanh": 5, "sigmoid": 6}
_CODE_OF_FN = tuple((ACTIVATION_FNS[name], code) for name, code in ACTIVATION_CODES.items())
_FN_OF_CODE = {code: ACTIVATION_FNS[name] for name, code in ACTIVATION_CODES.items()}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# (rtol, atol) of the native op against the reference on the same inputs: the kernels keep the
# hidden activations in fp32 until one rounding, the reference rounds after each matmul.
DECODE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (4e-2, 4e-2)}

MAX_PAIRS = 1024      # native/moe_kernels.h: kMaxDecodePairs
MAX_EXPERTS = 8192    # native/moe_kernels.h: kMaxDecodeExperts


def activation_code(act: Callable[[Tensor], Tensor]) -> int | None:
    """The kernels' code for one of the built-in activations, None for any other callable
    (identity tests only: torch.compile traces them, not ``id()`` or hashing of functions)."""
    for fn, code in _CODE_OF_FN:
        if act is fn:
            return code
    return None


def _ffn_of_pairs(x_ND: Tensor, e_N: Tensor, w1, w2, w3, b1, b2, act: Callable) -> Tensor:
    """Reference: every expert over all pairs, keeping each pair's own expert (e outside [0, E): 0)."""
    y_NO = x_ND.new_zeros(x_ND.shape[0], w2.shape[2])
    for e in range(w1.shape[0]):
        h = x_ND @ w1[e].t()
        h = act(h + b1[e] if b1 is not None else h)
        if w3 is not None:
            h = h * (x_ND @ w3[e].t())
        y = h @ w2[e]
        y = y + b2[e] if b2 is not None else y
        y_NO = torch.where((e_N == e).unsqueeze(1), y, y_NO)
    return y_NO


def decode_ffn_reference(x_TD: Tensor, e_TK: Tensor, w_TK: Tensor | None, postscore: bool, w1: Tensor, w2: Tensor,
                         w3: Tensor | None, b1: Tensor | None, b2: Tensor | None, activation: int,
                         out_dtype: torch.dtype, num_valid_tokens: Tensor | None = None) -> Tensor:
    T, K = e_TK.shape
    if num_valid_tokens is not None:   # padding tokens select nothing
        real_T = torch.arange(T, device=e_TK.device) < num_valid_tokens.reshape(())
        e_TK = torch.where(real_T.unsqueeze(1), e_TK, w1.shape[0])
    x_ND = x_TD.repeat_interleave(K, dim=0)
    if not postscore and w_TK is not None:
        x_ND = x_ND * w_TK.reshape(-1, 1).to(x_ND.dtype)
    y_TKO = _ffn_of_pairs(x_ND, e_TK.reshape(-1), w1, w2, w3, b1, b2, _FN_OF_CODE[activation]).view(T, K, -1)
    if postscore and w_TK is not None:
        y_TKO = y_TKO.to(out_dtype) * w_TK.to(out_dtype).unsqueeze(2)
    return y_TKO.to(out_dtype).sum(1)


def decode_ffn_impl(x_TD: Tensor, e_TK: Tensor, w_TK: Tensor | None, postscore: bool, w1_EHD: Tensor, w2_EHO: Tensor,
                  w3_EHD: Tensor | None, b1_EH: Tensor | None, b2_EO: Tensor | None, activation: int, splits: int,
                  out_dtype: torch.dtype, num_valid_tokens: Tensor | None = None) -> Tensor:
    native = _native.for_tensor(x_TD)
    if native is not None and x_TD.dtype in _DTYPE_CODES and out_dtype in _DTYPE_CODES:
        return native.decode_ffn(x_TD, e_TK, w_TK, postscore, w1_EHD, w2_EHO, w3_EHD, b1_EH, b2_EO, activation,
                                 splits, _DTYPE_CODES[out_dtype], num_valid_tokens)
    return decode_ffn_reference(x_TD, e_TK, w_TK, postscore, w1_EHD, w2_EHO, w3_EHD, b1_EH, b2_EO, activation,
                                out_dtype, num_valid_tokens)


decode_ffn_op = torch.library.custom_op("adaptmoe::decode_ffn", mutates_args=())(decode_ffn_impl)


@decode_ffn_op.register_fake
def _(x_TD, e_TK, w_TK, postscore, w1_EHD, w2_EHO, w3_EHD, b1_EH, b2_EO, activation, splits, out_dtype,
      num_valid_tokens=None):
    return x_TD.new_empty(x_TD.shape[0], w2_EHO.shape[2], dtype=out_dtype)


def act_mul_impl(g: Tensor, u: Tensor, activation: int) -> Tensor:
    """act(g) * u in one pass (inference: no autograd)."""
    native = _native.for_tensor(g)
    if native is not None:
        return native.act_mul(g, u, activation)
    return _FN_OF_CODE[activation](g) * u


act_mul_op = torch.library.custom_op("adaptmoe::act_mul", mutates_args=())(act_mul_impl)


@act_mul_op.register_fake
def _(g, u, activation):
    return torch.empty_like(g)


def act_mul(g: Tensor, u: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """act(g) * u, the gated FFN's product: one native pass (one rounding) on CUDA when no
    gradient is needed, else the PyTorch expression (two passes and a temporary)."""
    if not bypasses_dispatcher(g, g, u):   # autograd or a trace (inductor fuses the expression)
        return act(g) * u
    code = activation_code(act)
    if (code is None or g.dtype not in _DTYPE_CODES or g.shape != u.shape or g.dtype != u.dtype
            or not g.is_contiguous() or not u.is_contiguous() or g.data_ptr() % 16 or u.data_ptr() % 16):
        return act(g) * u
    return act_mul_impl(g, u, code)


def native_decode_blocker(x_TD: Tensor, weights: tuple, act: Callable, num_pairs: int) -> str | None:
    """None when the native decode kernels can serve this call, else why not (no device work;
    while tracing, only an extension loaded earlier counts)."""
    if x_TD.device.type != "cuda":
        return "not a CUDA tensor"
    if torch.compiler.is_compiling():
        if _native.loaded() is None:
            return "native extension not loaded before tracing"
    elif _native.load() is None:
        return f"native extension unavailable: {_native.status()}"
    if x_TD.dtype not in _DTYPE_CODES:
        return f"dtype {x_TD.dtype} (native takes float32, float16, bfloat16)"
    if activation_code(act) is None:
        return "custom activation (native fuses only the built-in ones)"
    if num_pairs > MAX_PAIRS:
        return f"{num_pairs} pairs > {MAX_PAIRS}"
    if weights[0].shape[0] > MAX_EXPERTS:
        return f"{weights[0].shape[0]} experts > {MAX_EXPERTS}"
    pack = 16 // x_TD.element_size()
    w1, w2 = weights[0], weights[1]
    if any(n % pack for n in (x_TD.shape[1], w1.shape[1], w2.shape[2])):
        return f"D, H, O not multiples of {pack} elements (16-byte rows)"
    if torch.is_grad_enabled() and (x_TD.requires_grad or any(t is not None and t.requires_grad for t in weights)):
        return "gradients requested (the native decode path is inference only)"
    return None


def _check_args(x_TD, e_TK, w_TK, w1, w2, b1, b2, w3, splits, out_dtype) -> None:
    """Clear errors (argument, allowed values) before any device work; the kernels check again."""
    if x_TD.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x_TD must be [T, D], w1_EHD and w2_EHO [E, H, *]; got {tuple(x_TD.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)}")
    T, D = x_TD.shape
    E, H, O = w1.shape[0], w1.shape[1], w2.shape[2]
    expected = {"w1_EHD": (w1, (E, H, D)), "w2_EHO": (w2, (E, H, O)), "w3_EHD": (w3, (E, H, D)),
                "b1_EH": (b1, (E, H)), "b2_EO": (b2, (E, O))}
    for name, (t, shape) in expected.items():
        if t is None:
            continue
        if tuple(t.shape) != shape or t.dtype != x_TD.dtype or t.device != x_TD.device:
            raise ValueError(f"{name} must be {list(shape)} of x_TD's dtype {x_TD.dtype} on {x_TD.device}; "
                             f"got {list(t.shape)} {t.dtype} on {t.device}")
    if e_TK.dim() != 2 or e_TK.shape[0] != T or e_TK.dtype != torch.int64:
        raise ValueError(f"e_TK must be int64 [T={T}, K]; got {e_TK.dtype} {list(e_TK.shape)}")
    if w_TK is not None and w_TK.shape != e_TK.shape:
        raise ValueError(f"w_TK must have e_TK's shape {list(e_TK.shape)}; got {list(w_TK.shape)}")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 0 <= splits <= H:
        raise ValueError(f"splits must be 0 (the kernel picks) or an int in [1, H={H}]; got {splits!r}")
    if out_dtype not in _DTYPE_CODES and out_dtype != torch.float64:
        raise ValueError(f"out_dtype must be one of {sorted(map(str, _DTYPE_CODES))} (float64 on the reference "
                         f"path); got {out_dtype}")


def decode_ffn(x_TD: Tensor, e_TK: Tensor, w_TK: Tensor | None, postscore: bool, weights: tuple,
               act: Callable, splits: int, out_dtype: torch.dtype, num_valid_tokens: Tensor | None = None) -> Tensor:
    """y_TO = sum_k w_TK * ffn_{e_TK}(x_TD) (postscore) or sum_k ffn_{e_TK}(w_TK * x_TD); experts
    outside [0, E) add nothing. ``weights``: (w1_EHD, w2_EHO, b1_EH, b2_EO, w3_EHD). ``splits``:
    slices of the hidden dim in the down projection, 0 = the kernel picks from the routing.
    ``num_valid_tokens`` (int64 device scalar): only the first tokens are real, the rest come back
    as zeros and read no weights (padded CUDA-graph buckets, without masking kernels)."""
    code = activation_code(act)
    if code is None:
        raise ValueError("decode_ffn fuses only the built-in activations "
                         f"{sorted(ACTIVATION_CODES)}; got a custom callable")
    w1, w2, b1, b2, w3 = weights
    _check_args(x_TD, e_TK, w_TK, w1, w2, b1, b2, w3, splits, out_dtype)
    if num_valid_tokens is not None and (num_valid_tokens.numel() != 1 or num_valid_tokens.dtype != torch.int64
                                         or num_valid_tokens.device != x_TD.device):
        raise ValueError(f"num_valid_tokens must be one int64 element on {x_TD.device}; got "
                         f"{num_valid_tokens.dtype} {list(num_valid_tokens.shape)} on {num_valid_tokens.device}")
    if bypasses_dispatcher(x_TD):   # inference only: nothing for autograd to record
        return decode_ffn_impl(x_TD, e_TK, w_TK, postscore, w1, w2, w3, b1, b2, code, splits, out_dtype,
                               num_valid_tokens)
    return decode_ffn_op(x_TD, e_TK, w_TK, postscore, w1, w2, w3, b1, b2, code, splits, out_dtype, num_valid_tokens)
