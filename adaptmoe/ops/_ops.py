"""torch.library registrations: adaptmoe::dispatch, ::combine, ::route_topk, ::assign_slots and the
backward ops of dispatch/combine.

Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.

Each op has one implementation for every device: CUDA tensors go to the native kernels when the
extension loads (``_native``), everything else (and CUDA without the extension) to the PyTorch
reference. A fake (meta) implementation gives output shapes from input shapes alone, and
``register_autograd`` gives the backward, so ``torch.compile(fullgraph=True)`` traces the ops as
opaque nodes and CUDA graphs capture them (the native path never synchronizes with the host).
Outputs never alias inputs. Double backward is not supported.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import combine_reference, dispatch_reference
from ..routing import assign_locations
from . import _native

# Tolerances per dtype, next to the ops; the GPU tests read them. (rtol, atol) against the
# PyTorch reference run on the same inputs. Row movers in bf16/fp16 round once per output
# element (the reference may round the weight first), hence one bf16/fp16 ulp of slack.
TOLERANCES: dict[str, dict[torch.dtype, tuple[float, float]]] = {
    "dispatch": {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)},
    "combine": {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)},
    # gradients (dot products over D accumulate in fp32 in the kernels)
    "dispatch_backward": {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    "combine_backward": {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)},
    # weights / scores (indices, locations, counts and slots must match exactly)
    "route_topk": {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)},
    # d logits: fp32 inside, one rounding to the logits dtype (the reference sums in another order)
    "route_topk_backward": {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 1e-3)},
    # the native gshard loss of a no-grad call sums in fp32 whatever the scores' dtype
    "gshard_loss": {dt: (2e-5, 1e-6) for dt in (torch.float32, torch.float16, torch.bfloat16)},
}

SCORE_FNS = ("softmax", "sigmoid")


def bypasses_dispatcher(t: Tensor, *differentiable: Tensor | None) -> bool:
    """True for an eager CUDA call that autograd need not record: it may call an op's
    implementation directly (``*_impl``), skipping torch.library's dispatch, which cost ~0.15 ms
    of host time per op on the H100 machine. Traced calls (torch.compile) and calls that need a
    gradient keep the registered op; kernels and results are the same either way."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(d is not None and d.requires_grad for d in differentiable))


def _empty_like_tk(slots_TK: Tensor, dtype: torch.dtype) -> Tensor:
    return slots_TK.new_empty((0,), dtype=dtype)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _picked_rows(rows_RD: Tensor, slots_TK: Tensor) -> tuple[Tensor, Tensor]:
    """(rows_RD[slots] as [T, K, D] with dropped choices zeroed, kept mask [T, K])."""
    kept_TK = slots_TK >= 0
    T, K = slots_TK.shape
    if rows_RD.shape[0] == 0:
        return rows_RD.new_zeros(T, K, rows_RD.shape[1]), kept_TK
    safe_TK = torch.where(kept_TK, slots_TK, torch.zeros_like(slots_TK))
    picked = rows_RD.index_select(0, safe_TK.reshape(-1)).view(T, K, rows_RD.shape[1])
    return picked * kept_TK.unsqueeze(-1).to(picked.dtype), kept_TK


def _combine_ref(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    if y_RD.shape[0] == 0:  # capacity 0: every choice dropped
        return y_RD.new_zeros(slots_TK.shape[0], y_RD.shape[1])
    return combine_reference(y_RD, slots_TK, weights_TK)


def _dots_ref(rows_RD: Tensor, slots_TK: Tensor, tok_TD: Tensor, out_dtype: torch.dtype) -> Tensor:
    """[t, k] = <tok_TD[t], rows_RD[slots[t, k]]>, 0 for dropped choices."""
    picked_TKD, _ = _picked_rows(rows_RD, slots_TK)
    acc = _acc_dtype(tok_TD.dtype)
    return (picked_TKD.to(acc) * tok_TD.to(acc).unsqueeze(1)).sum(-1).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# dispatch
def dispatch_impl(x_TD: Tensor, slots_TK: Tensor, num_rows: int, scale_TK: Tensor | None) -> Tensor:
    native = _native.for_tensor(x_TD)
    if native is not None:
        return native.scatter_rows(x_TD, slots_TK, num_rows, scale_TK, None)[0]
    return dispatch_reference(x_TD, slots_TK, num_rows, scale_TK)


dispatch_op = torch.library.custom_op("adaptmoe::dispatch", mutates_args=())(dispatch_impl)


@dispatch_op.register_fake
def _(x_TD, slots_TK, num_rows, scale_TK):
    return x_TD.new_empty(num_rows, x_TD.shape[1])


def dispatch_backward_impl(grad_RD: Tensor, x_TD: Tensor, slots_TK: Tensor, scale_TK: Tensor | None,
                           need_scale_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_x_TD, grad_scale_TK); grad_scale is empty unless asked for."""
    scale_dtype = scale_TK.dtype if scale_TK is not None else torch.float32
    native = _native.for_tensor(grad_RD)
    if native is not None:
        grad_x, grad_scale = native.gather_rows(grad_RD, slots_TK, scale_TK, x_TD if need_scale_grad else None)
        return grad_x, grad_scale
    w_TK = scale_TK if scale_TK is not None else torch.ones(slots_TK.shape, dtype=grad_RD.dtype, device=grad_RD.device)
    grad_x = _combine_ref(grad_RD, slots_TK, w_TK)
    if need_scale_grad:
        return grad_x, _dots_ref(grad_RD, slots_TK, x_TD, scale_dtype)
    return grad_x, _empty_like_tk(slots_TK, scale_dtype)


dispatch_backward_op = torch.library.custom_op("adaptmoe::dispatch_backward", mutates_args=())(dispatch_backward_impl)


@dispatch_backward_op.register_fake
def _(grad_RD, x_TD, slots_TK, scale_TK, need_scale_grad):
    scale_dtype = scale_TK.dtype if scale_TK is not None else torch.float32
    grad_x = grad_RD.new_empty(slots_TK.shape[0], grad_RD.shape[1])
    if need_scale_grad:
        return grad_x, grad_RD.new_empty(slots_TK.shape, dtype=scale_dtype)
    return grad_x, grad_RD.new_empty((0,), dtype=scale_dtype)


def _dispatch_setup(ctx, inputs, output):
    x_TD, slots_TK, num_rows, scale_TK = inputs
    ctx.has_scale = scale_TK is not None
    ctx.save_for_backward(x_TD if scale_TK is not None else None, slots_TK, scale_TK)


def _dispatch_backward_with(backward_op, ctx, grad_RD):
    x_TD, slots_TK, scale_TK = ctx.saved_tensors
    need_scale = ctx.has_scale and ctx.needs_input_grad[3]
    if x_TD is None:
        x_TD = grad_RD.new_empty(0, grad_RD.shape[1])
    grad_x, grad_scale = backward_op(grad_RD, x_TD, slots_TK, scale_TK, need_scale)
    return grad_x, None, None, (grad_scale if need_scale else None)


def _dispatch_backward(ctx, grad_RD):
    return _dispatch_backward_with(dispatch_backward_op, ctx, grad_RD)


dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


# ---------------------------------------------------------------------------------------------
# combine
def combine_impl(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    native = _native.for_tensor(y_RD)
    if native is not None:
        return native.gather_rows(y_RD, slots_TK, weights_TK, None)[0]
    return _combine_ref(y_RD, slots_TK, weights_TK)


combine_op = torch.library.custom_op("adaptmoe::combine", mutates_args=())(combine_impl)


@combine_op.register_fake
def _(y_RD, slots_TK, weights_TK):
    return y_RD.new_empty(slots_TK.shape[0], y_RD.shape[1])


def combine_backward_impl(grad_TD: Tensor, y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor,
                          need_weights_grad: bool) -> tuple[Tensor, Tensor]:
    """(grad_y_RD, grad_weights_TK); grad_weights is empty unless asked for."""
    native = _native.for_tensor(grad_TD)
    if native is not None:
        grad_y, grad_w = native.scatter_rows(grad_TD, slots_TK, y_RD.shape[0], weights_TK,
                                             y_RD if need_weights_grad else None)
        return grad_y, grad_w
    grad_y = dispatch_reference(grad_TD, slots_TK, y_RD.shape[0], weights_TK)
    if need_weights_grad:
        return grad_y, _dots_ref(y_RD, slots_TK, grad_TD, weights_TK.dtype)
    return grad_y, _empty_like_tk(slots_TK, weights_TK.dtype)


combine_backward_op = torch.library.custom_op("adaptmoe::combine_backward", mutates_args=())(combine_backward_impl)


@combine_backward_op.register_fake
def _(grad_TD, y_RD, slots_TK, weights_TK, need_weights_grad):
    grad_y = grad_TD.new_empty(y_RD.shape[0], grad_TD.shape[1])
    if need_weights_grad:
        return grad_y, grad_TD.new_empty(slots_TK.shape, dtype=weights_TK.dtype)
    return grad_y, grad_TD.new_empty((0,), dtype=weights_TK.dtype)


def _combine_setup(ctx, inputs, output):
    y_RD, slots_TK, weights_TK = inputs
    ctx.save_for_backward(y_RD, slots_TK, weights_TK)


def _combine_backward_with(backward_op, ctx, grad_TD):
    y_RD, slots_TK, weights_TK = ctx.saved_tensors
    need_w = ctx.needs_input_grad[2]
    grad_y, grad_w = backward_op(grad_TD, y_RD, slots_TK, weights_TK, need_w)
    return (grad_y if ctx.needs_input_grad[0] else None), None, (grad_w if need_w else None)


def _combine_backward(ctx, grad_TD):
    return _combine_backward_with(combine_backward_op, ctx, grad_TD)


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---------------------------------------------------------------------------------------------
# routing: scores + top-k + slot assignment
def _slots_from_locations(indices_TK: Tensor, locations_TK: Tensor, position_TK: Tensor, capacity: int) -> Tensor:
    if capacity < 0:
        return position_TK
    kept_TK = locations_TK < capacity
    return torch.where(kept_TK, indices_TK * capacity + locations_TK, torch.full_like(indices_TK, -1))


def _assign_ref(indices_TK: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    locations_TK, counts_E, position_TK = assign_locations(indices_TK, num_experts)
    return locations_TK, counts_E, _slots_from_locations(indices_TK, locations_TK, position_TK, capacity)


def _native_routing_ok(native, num_experts: int) -> bool:
    return native is not None and num_experts <= getattr(native, "max_locate_experts", 0)


def _native_topk(logits_TE: Tensor, entry: str):
    """The extension when its top-k kernels (``entry``: the binding to call) serve these logits
    (CUDA, a float dtype they take, few enough experts for the top-k and the slot assignment),
    else None."""
    native = _native.for_tensor(logits_TE)
    E = logits_TE.shape[1]
    if (_native_routing_ok(native, E) and hasattr(native, entry) and E <= native.max_topk_experts
            and logits_TE.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return native
    return None


@torch.library.custom_op("adaptmoe::assign_slots", mutates_args=())
def assign_slots_op(indices_TK: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """(locations_TK, counts_E, slots_TK) in GShard priority order; capacity < 0 means dropless."""
    native = _native.for_tensor(indices_TK)
    if _native_routing_ok(native, num_experts) and indices_TK.dtype == torch.int64:
        locations, counts, slots = native.assign_slots(indices_TK, num_experts, capacity)
        return locations, counts, slots
    return _assign_ref(indices_TK, num_experts, capacity)


@assign_slots_op.register_fake
def _(indices_TK, num_experts, capacity):
    return (torch.empty_like(indices_TK, dtype=torch.int64), indices_TK.new_empty(num_experts, dtype=torch.int64),
            torch.empty_like(indices_TK, dtype=torch.int64))


def _scores_fp32(logits_TE: Tensor, score_fn: str) -> Tensor:
    acc = _acc_dtype(logits_TE.dtype)
    return torch.softmax(logits_TE.to(acc), dim=1) if score_fn == "softmax" else torch.sigmoid(logits_TE.to(acc))


def route_topk_impl(logits_TE: Tensor, k: int, score_fn: str, normalize: bool,
                  capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK).

    scores = softmax or sigmoid of the logits (computed in fp32, returned in the logits dtype);
    the top-k by score, weights renormalised to sum 1 when ``normalize``; slots as assign_slots."""
    if score_fn not in SCORE_FNS:
        raise ValueError(f"score_fn must be one of {list(SCORE_FNS)}, got {score_fn!r}")
    T, E = logits_TE.shape
    native = _native_topk(logits_TE, "route_topk")
    if native is not None:
        out = native.route_topk(logits_TE, k, SCORE_FNS.index(score_fn), normalize, capacity, True)
        return tuple(out)
    scores_TE = _scores_fp32(logits_TE, score_fn)
    top_TK, indices_TK = torch.topk(scores_TE, k, dim=1)
    if normalize:
        top_TK = top_TK / top_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(top_TK.dtype).tiny)
    locations_TK, counts_E, slots_TK = _assign_ref(indices_TK, E, capacity)
    return (indices_TK, top_TK.to(logits_TE.dtype), scores_TE.to(logits_TE.dtype), locations_TK, counts_E, slots_TK)


route_topk_op = torch.library.custom_op("adaptmoe::route_topk", mutates_args=())(route_topk_impl)


@route_topk_op.register_fake
def _(logits_TE, k, score_fn, normalize, capacity):
    T, E = logits_TE.shape
    i64 = dict(dtype=torch.int64)
    return (logits_TE.new_empty(T, k, **i64), logits_TE.new_empty(T, k), logits_TE.new_empty(T, E),
            logits_TE.new_empty(T, k, **i64), logits_TE.new_empty(E, **i64), logits_TE.new_empty(T, k, **i64))


def _route_setup(ctx, inputs, output):
    logits_TE, k, score_fn, normalize, capacity = inputs
    ctx.score_fn, ctx.normalize = score_fn, normalize
    ctx.set_materialize_grads(False)   # gradients of unused outputs stay None (no zero tensors)
    ctx.save_for_backward(logits_TE, output[0])


def route_topk_grad(logits_TE: Tensor, indices_TK: Tensor, grad_w_TK: Tensor | None, grad_scores_TE: Tensor | None,
                    score_fn: str, normalize: bool) -> Tensor:
    """d loss / d logits from the gradients of weights_TK and scores_TE (recomputes the scores)."""
    acc = _acc_dtype(logits_TE.dtype)
    p_TE = _scores_fp32(logits_TE, score_fn)
    g_TE = torch.zeros_like(p_TE) if grad_scores_TE is None else grad_scores_TE.to(acc)
    if grad_w_TK is not None:
        g_TK = grad_w_TK.to(acc)
        if normalize:
            sel_TK = p_TE.gather(1, indices_TK)
            total_T1 = sel_TK.sum(dim=1, keepdim=True).clamp(min=torch.finfo(acc).tiny)
            w_TK = sel_TK / total_T1
            g_TK = (g_TK - (g_TK * w_TK).sum(dim=1, keepdim=True)) / total_T1
        g_TE = g_TE.scatter_add(1, indices_TK, g_TK)
    if score_fn == "softmax":
        grad_TE = p_TE * (g_TE - (g_TE * p_TE).sum(dim=1, keepdim=True))
    else:
        grad_TE = g_TE * p_TE * (1 - p_TE)
    return grad_TE.to(logits_TE.dtype)


def route_topk_backward_impl(logits_TE: Tensor, indices_TK: Tensor, grad_w_TK: Tensor | None,
                             grad_scores_TE: Tensor | None, score_fn: str, normalize: bool) -> Tensor:
    """``route_topk_grad`` in one native kernel on CUDA (the scores recomputed as the forward
    kernel computes them: a NaN logit scores 0 under softmax there), else that reference."""
    native = _native_topk(logits_TE, "route_topk_backward")
    if native is not None:
        return native.route_topk_backward(logits_TE, indices_TK, grad_w_TK, grad_scores_TE,
                                          SCORE_FNS.index(score_fn), normalize)
    return route_topk_grad(logits_TE, indices_TK, grad_w_TK, grad_scores_TE, score_fn, normalize)


route_topk_backward_op = torch.library.custom_op("adaptmoe::route_topk_backward",
                                                 mutates_args=())(route_topk_backward_impl)


@route_topk_backward_op.register_fake
def _(logits_TE, indices_TK, grad_w_TK, grad_scores_TE, score_fn, normalize):
    return torch.empty_like(logits_TE)


def _route_backward_with(backward_op, ctx, g_idx, g_w, g_scores, g_loc, g_counts, g_slots):
    logits_TE, indices_TK = ctx.saved_tensors
    return backward_op(logits_TE, indices_TK, g_w, g_scores, ctx.score_fn, ctx.normalize), None, None, None, None


def _route_backward(ctx, *grads):
    return _route_backward_with(route_topk_backward_op, ctx, *grads)


route_topk_op.register_autograd(_route_backward, setup_context=_route_setup)


# ---------------------------------------------------------------------------------------------
# Eager autograd: the same implementations and backward rules as the registered ops, as plain
# autograd Functions. A registered op's autograd (torch.library) costs ~0.1-0.2 ms of host time
# per op and again per backward on the H100 machine (redispatch, Python wrappers), which a
# training step with short GPU work waits for (README layer in bf16: forward + backward ~1.5 ms
# of GPU work, ~2.8 ms per step). Traced calls (torch.compile) and functorch transforms keep the
# registered ops.
# torch 2.x's private check; a torch without it is treated as running no functorch transform.
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def eager_autograd(t: Tensor) -> bool:
    """Whether a call on ``t`` that records autograd may use the Functions below."""
    return (type(t) is Tensor and t.is_cuda and not torch.compiler.is_compiling()
            and not _functorch_transforms_active())


def _eager_function(name: str, impl, setup_context, backward_with, backward_impl) -> type:
    """An autograd Function running ``impl`` forward and ``backward_with(backward_impl, ...)`` back.
    Its forward takes ctx (no setup_context staticmethod): ``Function.apply`` binds the arguments
    of a setup_context Function through ``inspect.signature`` on every call, a quarter of a cf=1
    training forward's Python time (fine-grained layer, cProfile on the H100 machine,
    ``docs/results/2026-11-23/h100_profile_train_python_session12.log``). Functorch transforms,
    which need setup_context, take the registered ops instead (``eager_autograd``)."""
    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def backward(ctx, *grads):
        return backward_with(backward_impl, ctx, *grads)
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


DispatchFunction = _eager_function("DispatchFunction", dispatch_impl, _dispatch_setup, _dispatch_backward_with,
                                   dispatch_backward_impl)
CombineFunction = _eager_function("CombineFunction", combine_impl, _combine_setup, _combine_backward_with,
                                  combine_backward_impl)
RouteTopkFunction = _eager_function("RouteTopkFunction", route_topk_impl, _route_setup, _route_backward_with,
                                    route_topk_backward_impl)


class _GshardLossFunction(torch.autograd.Function):
    """The GShard loss of ``losses.gshard_loss`` in the native kernels: forward in two launches
    (fp32 sums in a fixed order), backward in one (every row E * c_e / T^2 times the gradient)
    instead of ~5 ops each way."""

    @staticmethod
    def forward(ctx, scores_TE: Tensor, indices_TK: Tensor) -> Tensor:   # ctx first: see _eager_function
        ctx.num_experts, ctx.dtype = scores_TE.shape[1], scores_TE.dtype
        ctx.save_for_backward(indices_TK)
        return _native.loaded().gshard_loss(scores_TE, indices_TK, False)

    @staticmethod
    def backward(ctx, grad):
        (indices_TK,) = ctx.saved_tensors
        return _native.loaded().gshard_loss_backward(indices_TK, grad.float(), ctx.num_experts, ctx.dtype), None


def gshard_loss_native(scores_TE: Tensor, indices_TK: Tensor) -> Tensor | None:
    """``losses.gshard_loss`` from the native kernels (with autograd) for an eager CUDA call they
    serve (T > 0), else None. Not while a CUDA graph is captured: a replay has no host time to
    save, and a capture of a training step through torch.cuda.make_graphed_callables with this
    loss failed (cudaErrorStreamCaptureInvalidated, H100; not understood yet: NOTES.md)."""
    if (not eager_autograd(scores_TE) or torch.cuda.is_current_stream_capturing() or scores_TE.shape[0] == 0
            or scores_TE.shape[1] == 0):
        return None
    # The scores are the top-k kernels' output: the same dtypes and expert counts.
    if _native_topk(scores_TE, "gshard_loss_backward") is None:
        return None
    return _GshardLossFunction.apply(scores_TE, indices_TK)

