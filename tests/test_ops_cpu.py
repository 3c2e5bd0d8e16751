"""adaptmoe.ops on CPU: the reference path behind the torch.library ops (CI runs these).

Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.
"""
import pytest
import torch

import adaptmoe.ops as ops
from adaptmoe.dispatch import combine_reference, dispatch_reference
from adaptmoe.routing import build_routing


def _routing(T, E, K, cf, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices_TK = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K]
    weights_TK = torch.rand(T, K, generator=g, dtype=torch.float64)
    return build_routing(indices_TK, weights_TK, E, cf)


def test_extension_absence_is_handled():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert ops.native_available() is False
    status = ops.native_status()
    assert "CUDA" in status and len(status) > 20


@pytest.mark.parametrize("T,E,K,cf", [(0, 4, 2, 1.0), (1, 4, 2, 1.0), (1, 1, 1, 0.0), (9, 4, 2, 0.5),
                                      (16, 8, 3, 0.0), (7, 5, 5, 1.0), (12, 3, 2, 0.1)])
def test_ops_equal_reference(T, E, K, cf):
    r = _routing(T, E, K, cf)
    x_TD = torch.randn(T, 6, dtype=torch.float64)
    scale_TK = torch.rand(T, K, dtype=torch.float64)
    for scale in (None, scale_TK):
        ref = dispatch_reference(x_TD, r.slots_TK, r.num_rows, scale)
        torch.testing.assert_close(ops.dispatch(x_TD, r.slots_TK, r.num_rows, scale), ref, rtol=0, atol=0)
    y_RD = torch.randn(r.num_rows, 6, dtype=torch.float64)
    out = ops.combine(y_RD, r.slots_TK, r.weights_TK)
    assert out.shape == (T, 6)
    if r.num_rows:
        torch.testing.assert_close(out, combine_reference(y_RD, r.slots_TK, r.weights_TK))
    else:
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("T,E,K,cf", [(1, 4, 2, 1.0), (6, 4, 2, 0.5), (5, 3, 3, 0.0)])
def test_gradients_float64(T, E, K, cf):
    r = _routing(T, E, K, cf, seed=3)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    s = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    y = torch.randn(r.num_rows, 5, dtype=torch.float64, requires_grad=True)
    w = r.weights_TK.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, s: ops.dispatch(x, r.slots_TK, r.num_rows, s), (x, s))
    assert torch.autograd.gradcheck(lambda x: ops.dispatch(x, r.slots_TK, r.num_rows), (x,))
    assert torch.autograd.gradcheck(lambda y, w: ops.combine(y, r.slots_TK, w), (y, w))
    # and equal to the reference's own autograd
    g = torch.randn(T, 5, dtype=torch.float64)
    a = torch.autograd.grad((ops.combine(y, r.slots_TK, w) * g).sum(), (y, w))
    b = torch.autograd.grad((combine_reference(y, r.slots_TK, w) * g).sum(), (y, w))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_route_topk_matches_routing(score_fn, normalize):
    logits = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    for capacity in (None, 2, 0):
        idx, w, scores, loc, counts, slots = ops.route_topk(logits, 3, score_fn, normalize, capacity)
        cf = 0.0 if capacity is None else 1.0
        ref = build_routing(idx, w.detach(), 6, cf)
        torch.testing.assert_close(loc, ref.locations_TK, rtol=0, atol=0)
        torch.testing.assert_close(counts, ref.counts_E, rtol=0, atol=0)
        if capacity is None:
            torch.testing.assert_close(slots, ref.slots_TK, rtol=0, atol=0)
        else:
            expect = torch.where(loc < capacity, idx * capacity + loc, torch.full_like(idx, -1))
            torch.testing.assert_close(slots, expect, rtol=0, atol=0)
        l2, c2, s2 = ops.assign_slots(idx, 6, capacity)
        assert torch.equal(l2, loc) and torch.equal(c2, counts) and torch.equal(s2, slots)
    p = torch.softmax(logits, 1) if score_fn == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(scores, p)
    assert torch.autograd.gradcheck(
        lambda l: [t for t in ops.route_topk(l, 3, score_fn, normalize, None) if t.is_floating_point()], (logits,))


def test_compile_fullgraph_cpu():
    r = _routing(10, 4, 2, 1.0)
    x = torch.randn(10, 8, requires_grad=True)
    w = r.weights_TK.float().requires_grad_(True)
    logits = torch.randn(10, 4, requires_grad=True)

    def f(x, w, logits):
        x_RD = ops.dispatch(x, r.slots_TK, r.num_rows)
        y_TD = ops.combine(x_RD * 2, r.slots_TK, w)
        idx, wt, scores, loc, counts, slots = ops.route_topk(logits, 2, "softmax", True, 5)
        return y_TD.sum() + wt.sum() * 0.5 + scores.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, logits)
    out.backward()
    grads = (x.grad.clone(), w.grad.clone(), logits.grad.clone())
    x.grad = w.grad = logits.grad = None
    f(x, w, logits).backward()
    torch.testing.assert_close(out, f(x, w, logits))
    for a, b in zip(grads, (x.grad, w.grad, logits.grad)):
        torch.testing.assert_close(a, b)


def test_fake_impls_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(7, 16)
        slots = torch.empty(7, 2, dtype=torch.int64)
        w = torch.empty(7, 2)
        assert ops.dispatch(x, slots, 20).shape == (20, 16)
        assert ops.combine(torch.empty(20, 16), slots, w).shape == (7, 16)
        out = ops.route_topk(torch.empty(7, 5), 2)
        assert [tuple(t.shape) for t in out] == [(7, 2), (7, 2), (7, 5), (7, 2), (5,), (7, 2)]


def test_layer_dispatch_goes_through_ops():
    import adaptmoe.dispatch as d
    r = _routing(8, 4, 2, 0.0)
    x = torch.randn(8, 3)
    torch.testing.assert_close(d.dispatch(x, r.slots_TK, r.num_rows), dispatch_reference(x, r.slots_TK, r.num_rows))


def test_native_kernels_can_be_turned_off_and_on():
    from adaptmoe import ops
    ops.set_native_enabled(False)
    try:
        assert not ops.native_available()
        assert "set_native_enabled(False)" in ops.native_status()
    finally:
        ops.set_native_enabled(True)
    assert "set_native_enabled" not in ops.native_status()


@pytest.mark.parametrize("fp32", [False, True])
def test_gate_logits_cpu_is_the_reference_and_compiles(fp32):
    """ops.gate_logits on CPU is x @ W^T with the gate's casts; its registered op traces under
    torch.compile(fullgraph) with the fake implementation's dtype."""
    torch.manual_seed(0)
    x = torch.randn(9, 16, dtype=torch.bfloat16)
    w = torch.randn(3, 16, dtype=torch.bfloat16)
    want = torch.nn.functional.linear(x.float(), w.float()) if fp32 else torch.nn.functional.linear(x, w)
    assert torch.equal(ops.gate_logits(x, w, fp32), want)
    compiled = torch.compile(lambda a, b: ops.gate_logits(a, b, fp32) * 2, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x, w)
    assert got.dtype == want.dtype and torch.equal(got, want * 2)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        assert ops.gate_logits(torch.empty(5, 16), torch.empty(3, 16, dtype=torch.bfloat16), fp32).dtype == (
            torch.float32 if fp32 else torch.bfloat16)
