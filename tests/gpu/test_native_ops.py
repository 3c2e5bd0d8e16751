"""Native CUDA ops against the PyTorch reference (run on the device machine: `pytest -m gpu tests/gpu`).

Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.
Outputs are poisoned before each native run (the caching allocator's free blocks are filled
with NaN / garbage bytes, which the next allocation reuses), so unwritten elements show up.
Tolerances come from adaptmoe.ops.TOLERANCES, declared next to the ops.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe.ops as ops  # noqa: E402
from adaptmoe.dispatch import combine_reference, dispatch_reference  # noqa: E402
from graph_replay import replays_and_eager  # noqa: E402
from adaptmoe.expert_compute import FFNWeights, ffn_grouped, ffn_grouped_loop  # noqa: E402
from adaptmoe.ops._ops import _assign_ref  # noqa: E402
from adaptmoe.routing import build_routing  # noqa: E402
from gpu_poison import poison  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(op, dtype):
    rtol, atol = ops.TOLERANCES[op][dtype]
    return dict(rtol=rtol, atol=atol)


def test_native_loaded():
    assert ops.native_available(), ops.native_status()
    print("native:", ops.native_status())


def make_routing(T, E, K, cf, skew=False, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    scores = torch.rand(T, E, generator=g, device=DEV)
    if skew and E > 2:  # only the first half of the experts get tokens
        scores[:, E // 2:] -= 2.0
    indices_TK = scores.topk(K, dim=1).indices
    weights_TK = torch.rand(T, K, generator=g, device=DEV)
    return build_routing(indices_TK, weights_TK, E, cf)


SHAPES = [  # T, E, K, D, cf, skew
    (1, 1, 1, 8, 0.0, False),
    (1, 4, 2, 7, 1.0, False),
    (37, 5, 5, 33, 1.0, False),      # k = E, odd D
    (64, 8, 2, 128, 0.5, False),     # drops
    (100, 16, 4, 256, 0.0, True),    # dropless, experts with zero tokens
    (50, 8, 2, 64, 1.0, True),       # capacity, experts with zero tokens
    (513, 64, 8, 2048, 1.0, False),
    (300, 7, 3, 1001, 0.0, False),   # odd D, scalar path
    (12, 4, 2, 16, 0.1, False),      # capacity 0: every choice dropped
]


def up(t):
    return None if t is None else t.detach().float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K,D,cf,skew", SHAPES)
def test_scatter_located_rows_vs_reference(T, E, K, D, cf, skew, dtype):
    """The no-grad layer forward's dispatch: the rows no choice feeds are found from counts_E
    (no inverse map); every element written (poisoned output memory), zeros where unfed; without
    zero_unfed (the layer forward) every fed row as with it."""
    r = make_routing(T, E, K, cf, skew, seed=T + D)
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    scale = torch.rand(T, K, device=DEV, dtype=dtype)
    native = ops._native.loaded()
    capacity = -1 if r.capacity is None else r.capacity
    fed_R = torch.zeros(r.num_rows, dtype=torch.bool, device=DEV)
    kept = r.slots_TK[r.slots_TK >= 0]
    fed_R[kept] = True
    for sc, zero_unfed in ((None, True), (scale, True), (scale, False)):
        ref = dispatch_reference(up(x), r.slots_TK, r.num_rows, up(sc))
        poison((r.num_rows + T) * D * 4 + (1 << 20))
        out = native.scatter_located_rows(x, r.slots_TK, r.counts_E, capacity, sc, zero_unfed)
        assert out.dtype == dtype and out.shape == (r.num_rows, D)
        if zero_unfed:
            torch.testing.assert_close(out.float(), ref, **tol("dispatch", dtype))
        else:
            torch.testing.assert_close(out.float()[fed_R], ref[fed_R], **tol("dispatch", dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K,D,cf,skew", SHAPES)
def test_dispatch_combine_fwd_bwd(T, E, K, D, cf, skew, dtype):
    """Native op (inputs in ``dtype``) vs the reference on the same values upcast to fp32."""
    r = make_routing(T, E, K, cf, skew, seed=T + D)
    R = r.num_rows
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    scale = torch.rand(T, K, device=DEV, dtype=dtype)
    y = torch.randn(R, D, device=DEV, dtype=dtype)
    w = r.weights_TK.to(torch.float32)
    nbytes = (R + T) * D * 4 + (1 << 20)
    for sc in (None, scale):
        ref = dispatch_reference(up(x), r.slots_TK, R, up(sc))
        poison(nbytes)
        out = ops.dispatch(x, r.slots_TK, R, sc)
        assert out.dtype == dtype and out.shape == (R, D)
        torch.testing.assert_close(out.float(), ref, **tol("dispatch", dtype))
    ref = combine_reference(up(y), r.slots_TK, w) if R else torch.zeros(T, D, device=DEV)
    poison(nbytes)
    out = ops.combine(y, r.slots_TK, w)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol("combine", dtype))

    # gradients against the reference's own autograd (fp32 on the same values)
    g_RD = torch.randn(R, D, device=DEV, dtype=dtype)
    g_TD = torch.randn(T, D, device=DEV, dtype=dtype)
    xa, sa = x.clone().requires_grad_(), scale.clone().requires_grad_()
    xb, sb = up(x).requires_grad_(), up(scale).requires_grad_()
    poison(nbytes)
    torch.autograd.backward(ops.dispatch(xa, r.slots_TK, R, sa), g_RD)
    torch.autograd.backward(dispatch_reference(xb, r.slots_TK, R, sb), up(g_RD))
    torch.testing.assert_close(xa.grad.float(), xb.grad, **tol("dispatch_backward", dtype))
    torch.testing.assert_close(sa.grad.float(), sb.grad, **tol("dispatch_backward", dtype))
    if R == 0:
        return
    ya, wa = y.clone().requires_grad_(), w.clone().requires_grad_()
    yb, wb = up(y).requires_grad_(), w.clone().requires_grad_()
    poison(nbytes)
    torch.autograd.backward(ops.combine(ya, r.slots_TK, wa), g_TD)
    torch.autograd.backward(combine_reference(yb, r.slots_TK, wb), up(g_TD))
    torch.testing.assert_close(ya.grad.float(), yb.grad, **tol("combine_backward", dtype))
    torch.testing.assert_close(wa.grad, wb.grad, **tol("combine_backward", dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K", [(1, 1, 1), (1, 8, 8), (37, 5, 2), (4096, 64, 8), (2000, 256, 8),
                                   (300, 1000, 4), (129, 33, 33)])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_route_topk(T, E, K, dtype, score_fn):
    logits = torch.randn(T, E, device=DEV, dtype=torch.float32).to(dtype)
    for normalize, capacity in ((True, None), (False, max(1, T * K // E)), (True, 0)):
        poison(T * E * 8 + T * K * 64, byte=0x7F)
        idx, w, scores, loc, counts, slots = ops.route_topk(logits, K, score_fn, normalize, capacity)
        p = torch.softmax(logits.float(), 1) if score_fn == "softmax" else torch.sigmoid(logits.float())
        torch.testing.assert_close(scores.float(), p, **tol("route_topk", dtype))
        # the chosen scores are the top-k scores (tie-insensitive), in descending order
        ref_top = p.topk(K, dim=1).values
        torch.testing.assert_close(p.gather(1, idx), ref_top, rtol=0, atol=0)
        assert ((idx >= 0) & (idx < E)).all() and (idx.sort(1).values.diff(dim=1) != 0).all()
        exp_w = p.gather(1, idx)
        if normalize:
            exp_w = exp_w / exp_w.sum(1, keepdim=True)
        torch.testing.assert_close(w.float(), exp_w, **tol("route_topk", dtype))
        rl, rc, rs = _assign_ref(idx, E, -1 if capacity is None else capacity)
        assert torch.equal(loc, rl) and torch.equal(counts, rc) and torch.equal(slots, rs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K", [(1, 1, 1), (1, 8, 8), (37, 5, 2), (4096, 64, 8), (2000, 256, 8),
                                   (300, 1000, 4), (129, 33, 33), (64, 2, 2)])
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_route_topk_backward(T, E, K, dtype, score_fn):
    """The native gating backward against the PyTorch form of the same gradient (route_topk_grad)
    and against autograd of the float32 reference (softmax/sigmoid, gather, renormalisation), for
    the weights' gradient, the scores' gradient, or both."""
    from adaptmoe.ops._ops import route_topk_backward_impl
    torch.manual_seed(T + E)
    logits = torch.randn(T, E, device=DEV).to(dtype)
    for normalize in (True, False):
        idx = ops.route_topk(logits, K, score_fn, normalize, None)[0]
        g_w = torch.randn(T, K, device=DEV).to(dtype)
        g_s = torch.randn(T, E, device=DEV).to(dtype)
        for gw, gs in ((g_w, g_s), (g_w, None), (None, g_s)):
            poison(T * E * 8 + (1 << 16))
            got = route_topk_backward_impl(logits, idx, gw, gs, score_fn, normalize)
            assert got.dtype == dtype and got.shape == (T, E)
            want = ops.route_topk_grad(logits, idx, gw, gs, score_fn, normalize)
            torch.testing.assert_close(got.float(), want.float(), **tol("route_topk_backward", dtype))
            lf = logits.detach().float().clone().requires_grad_()   # a fresh leaf (float() of fp32 is the same tensor)
            p = torch.softmax(lf, 1) if score_fn == "softmax" else torch.sigmoid(lf)
            sel = p.gather(1, idx)
            w = sel / sel.sum(1, keepdim=True) if normalize else sel
            loss = (w * gw.float()).sum() if gw is not None else p.new_zeros(())
            loss = loss + ((p * gs.float()).sum() if gs is not None else 0)
            loss.backward()
            torch.testing.assert_close(got.float(), lf.grad, **tol("route_topk_backward", dtype))


def test_eager_autograd_functions_match_the_registered_ops():
    """Eager CUDA calls that record autograd run plain autograd Functions (less host time); the
    registered ops (what torch.compile traces) give the same bits, forward and backward."""
    from adaptmoe.ops._ops import combine_op, dispatch_op, route_topk_op
    T, E, K, D = 300, 16, 4, 96
    torch.manual_seed(0)
    logits0 = torch.randn(T, E, device=DEV, dtype=torch.bfloat16)
    x0 = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)

    def run(route, dispatch, combine):
        logits, x = logits0.clone().requires_grad_(), x0.clone().requires_grad_()
        idx, w, scores, _, counts, slots = route(logits, K, "softmax", True, 80)
        x_RD = dispatch(x, slots, E * 80, None)
        y = combine(torch.relu(x_RD), slots, w)
        torch.autograd.backward([y, scores.float().square().sum()], [g, None])
        return y, logits.grad, x.grad

    eager = run(ops.route_topk, ops.dispatch, ops.combine)
    registered = run(route_topk_op, dispatch_op, combine_op)
    for a, b in zip(eager, registered):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,K", [(2, 2), (8, 3), (64, 8), (256, 8), (1000, 4)])
def test_route_topk_ties_zeros_and_nans(E, K, dtype):
    """The selection's order on equal logits (lower expert first, -0 equal to +0) and NaN logits
    (never preferred over a number): row 0 all equal, row 1 -0 at expert 1 and +0 at expert 0 over
    negatives, row 2 NaN at expert 0 over equal numbers, row 3 NaN everywhere but expert E-1."""
    logits = torch.full((4, E), -1.0, device=DEV, dtype=dtype)
    logits[0] = 0.5
    logits[1, 1], logits[1, 0] = -0.0, 0.0
    logits[2, 0] = float("nan")
    logits[3] = float("nan")
    logits[3, E - 1] = 2.0
    idx = ops.route_topk(logits, K, "softmax", True, None)[0].cpu().tolist()
    assert idx[0] == list(range(K))
    assert idx[1] == list(range(K))   # +0 (expert 0) and -0 (expert 1) tie: lower first
    assert idx[2] == (list(range(1, K + 1)) if K < E else list(range(1, E)) + [0])
    assert idx[3] == [E - 1] + list(range(K - 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K", [(0, 4, 2), (1, 1, 1), (37, 5, 5), (4096, 64, 8), (20000, 256, 8), (300, 1000, 4)])
@pytest.mark.parametrize("normalize_rows", [False, True], ids=["softmax", "sigmoid"])
def test_gshard_loss(T, E, K, dtype, normalize_rows):
    """The native gshard loss of a no-grad call against the float64 formula on the same scores
    (E * sum_e mean_t p_te * first-choice fraction_e), deterministic bits, 0 without tokens."""
    from adaptmoe.ops import _native
    g = torch.Generator(device=DEV).manual_seed(T + E)
    scores = torch.rand(T, E, generator=g, device=DEV).to(dtype)
    idx = torch.randint(0, E, (T, K), generator=g, device=DEV)
    if T > 4:
        idx[: T // 4, 0] = 0   # uneven first choices
    poison(1 << 20, byte=0x7F)
    loss = _native.loaded().gshard_loss(scores, idx, normalize_rows)
    assert loss.dtype == torch.float32 and loss.shape == ()
    if T == 0:
        assert float(loss) == 0.0
        return
    p = scores.double()
    if normalize_rows:
        p = p / p.sum(1, keepdim=True).clamp(min=1e-9)
    want = E * (p.mean(0) * torch.bincount(idx[:, 0], minlength=E).double() / T).sum()
    rtol, atol = ops.TOLERANCES["gshard_loss"][dtype]
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=atol)
    assert torch.equal(loss, _native.loaded().gshard_loss(scores, idx, normalize_rows))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,E,K", [(1, 1, 1), (37, 5, 5), (4096, 64, 8), (300, 1000, 4), (8192, 2, 2)])
def test_gshard_loss_with_autograd(T, E, K, dtype):
    """losses.gshard_loss on CUDA (native forward and backward) against autograd of the float64
    formula: the loss and d loss / d scores, for a non-unit upstream gradient."""
    from adaptmoe.losses import gshard_loss
    g = torch.Generator(device=DEV).manual_seed(T + E)
    scores = torch.rand(T, E, generator=g, device=DEV).to(dtype).requires_grad_()
    idx = torch.randint(0, E, (T, K), generator=g, device=DEV)
    if T > 4:
        idx[: T // 4, 0] = 0
    poison(T * E * 8 + (1 << 16))
    loss = gshard_loss(scores, idx)
    (loss * 3.0).backward()
    p = scores.detach().double().requires_grad_()
    want = E * (p.mean(0) * torch.bincount(idx[:, 0], minlength=E).double() / T).sum()
    (want * 3.0).backward()
    rtol, atol = ops.TOLERANCES["gshard_loss"][dtype]
    torch.testing.assert_close(loss.double(), want.detach(), rtol=rtol, atol=atol)
    assert scores.grad.dtype == dtype
    # every element is 3 * E * c_e / T^2, rounded once to the scores' dtype
    rtol = ops.TOLERANCES["route_topk_backward"][dtype][0]
    torch.testing.assert_close(scores.grad.double(), p.grad, rtol=rtol, atol=0)


@pytest.mark.parametrize("T,E,K,cap", [(1, 1, 1, None), (20000, 64, 8, None), (20000, 64, 8, 1000),
                                       (5000, 2048, 4, 3), (777, 9, 9, None), (3000, 16, 2, 0),
                                       (300, 40, 20, 5),        # choices loaded in rounds of 8, 8, 4
                                       (600, 2048, 7, None)])   # shared memory holds 6 choices' counts
def test_assign_slots_exact(T, E, K, cap):
    g = torch.Generator(device=DEV).manual_seed(T)
    s = torch.rand(T, E, generator=g, device=DEV)
    s[:, : E // 3] += 0.5  # skewed: some experts overflow, some get nothing
    s[:, E - 1:] -= 5
    idx = s.topk(K, dim=1).indices if K < E or E > 1 else torch.zeros(T, 1, dtype=torch.long, device=DEV)
    poison(T * K * 32, byte=0x7F)
    loc, counts, slots = ops.assign_slots(idx, E, cap)
    rl, rc, rs = _assign_ref(idx, E, -1 if cap is None else cap)
    assert torch.equal(loc, rl) and torch.equal(counts, rc) and torch.equal(slots, rs)


def test_cuda_graph_capture_and_replay():
    T, E, K, D = 256, 8, 2, 512
    r = make_routing(T, E, K, 0.0)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    logits = torch.randn(T, E, device=DEV)

    def step():
        idx, w, _, _, counts, slots = ops.route_topk(logits, K, "softmax", True, None)
        x_RD = ops.dispatch(x, slots, T * K)
        return ops.combine(x_RD * 2, slots, w), counts

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, counts = step()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_counts = step()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert torch.equal(counts, ref_counts)
    assert r.num_rows == T * K


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("E,K", [(8, 1), (4, 4)])
def test_dropless_layer_forward_captures_in_a_cuda_graph(dtype, E, K):
    """Dropless fp32/fp16 with 8 experts, top-1 (padding would cost 8x) reads counts on the host in
    eager calls; under capture it must take the padded, sync-free path and replay what eager
    calls compute (GEMMs of other shapes: rounding-level differences only)."""
    import adaptmoe as am
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=64, num_experts=E, gate=am.GateConfig(top_k=K, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=96))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=dtype).eval()
    x = torch.randn(200, 64, device=DEV, dtype=dtype)
    rt = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for out, ref in replays_and_eager(lambda: layer(x), x):
        torch.testing.assert_close(out, ref, rtol=rt, atol=rt)


def test_compile_fullgraph_cuda():
    T, E, K, D = 128, 8, 2, 256
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device=DEV, requires_grad=True)

    def f(x, logits):
        idx, w, scores, _, counts, slots = ops.route_topk(logits, K, "softmax", True, 40)
        x_RD = ops.dispatch(x, slots, E * 40)
        y = ops.combine(torch.relu(x_RD), slots, w)
        return y.float().square().mean() + scores.float().mean(0).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    a = compiled(x, logits)
    ga = torch.autograd.grad(a, (x, logits))
    b = f(x, logits)
    gb = torch.autograd.grad(b, (x, logits))
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("gated,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("counts_list,bound", [([37, 0, 100, 3], None), ([37, 0, 100, 3], 100), ([25] * 4, 25)])
def test_ffn_grouped_vs_loop(dtype, gated, bias, counts_list, bound):
    torch.manual_seed(0)
    # smooth activation: with relu, a pre-activation within bf16 rounding of 0 flips its gate
    # between the bf16 and fp32 runs and moves a whole row of the input gradient (seen on H100)
    act = torch.nn.functional.silu
    e, D, H = 4, 128, 96
    counts = torch.tensor(counts_list, device=DEV)
    R = int(counts.sum())
    x = torch.randn(R, D, device=DEV, dtype=dtype, requires_grad=True)
    mk = lambda *s: (torch.randn(*s, device=DEV, dtype=dtype) * 0.1).requires_grad_()  # noqa: E731
    w = FFNWeights(mk(e, H, D), mk(e, H, D), mk(e, H) if bias else None, mk(e, D) if bias else None,
                   mk(e, H, D) if gated else None)
    g = torch.randn(R, D, device=DEV, dtype=dtype)
    ffn_grouped(x, counts, w, act, bound)  # warm
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = ffn_grouped(x, counts, w, act, bound)
        grads = torch.autograd.grad(y, (x, *[t for t in w if t is not None]), g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # reference: the per-expert loop in fp32 on the same values
    x32 = x.detach().float().requires_grad_()
    w32 = FFNWeights(*[None if t is None else t.detach().float().requires_grad_() for t in w])
    y2 = ffn_grouped_loop(x32, counts, w32, act)
    grads2 = torch.autograd.grad(y2, (x32, *[t for t in w32 if t is not None]), g.float())
    rt = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), y2, rtol=rt, atol=rt)
    for a, b in zip(grads, grads2):  # bf16 GEMM outputs: absolute error scales with the largest value
        torch.testing.assert_close(a.float(), b, rtol=rt, atol=rt * max(1.0, b.abs().max().item()))


def test_ops_are_sync_free():
    T, E, K, D = 512, 16, 4, 256
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(T, E, device=DEV, requires_grad=True)
    ops.route_topk(logits, K)  # warm: loads the extension
    torch.cuda.set_sync_debug_mode("error")
    try:
        idx, w, scores, _, counts, slots = ops.route_topk(logits, K, "softmax", True, None)
        y = ops.combine(ops.dispatch(x, slots, T * K), slots, w)
        (y.float().sum() + scores.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_grouped_relu_in_place_without_grad_matches_autograd_path(monkeypatch):
    """bf16 dropless relu experts: the no-grad call applies relu in place on the grouped GEMM's
    output; it must equal the call that records autograd (out-of-place relu), bit for bit."""
    from adaptmoe.experts import ACTIVATION_FNS
    relu = ACTIVATION_FNS["relu"]    # what relu experts hold
    in_place_calls = []
    original = torch.Tensor.relu_
    monkeypatch.setattr(torch.Tensor, "relu_", lambda t: in_place_calls.append(1) or original(t))
    torch.manual_seed(0)
    e, D, H = 4, 128, 256
    counts = torch.tensor([40, 0, 17, 71], device=DEV)
    x = torch.randn(int(counts.sum()), D, device=DEV, dtype=torch.bfloat16)
    mk = lambda *s: (torch.randn(*s, device=DEV, dtype=torch.bfloat16) * 0.1).requires_grad_()  # noqa: E731
    w = FFNWeights(mk(e, H, D), mk(e, H, D))
    with torch.no_grad():
        y_nograd = ffn_grouped(x, counts, w, relu)
    assert in_place_calls, "the no-grad call did not take the in-place relu"
    y_grad = ffn_grouped(x, counts, w, relu)
    assert y_grad.requires_grad and len(in_place_calls) == 1
    torch.testing.assert_close(y_nograd, y_grad.detach(), rtol=0, atol=0)
