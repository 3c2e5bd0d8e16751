"""Native decode kernels (adaptmoe::decode_ffn) against the float64 PyTorch reference of the same
op, on the device machine: `pytest -m gpu tests/gpu/test_decode_native.py`.

Legend: T tokens, K top-k, E experts, D model dim, H expert hidden, O output dim.
Outputs are poisoned before each native run (free cached memory filled with NaN bytes, which the
next allocation reuses), so an unwritten element shows up. Tolerances: adaptmoe.ops.DECODE_TOLERANCES.
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe.ops as ops  # noqa: E402
from adaptmoe.ops._decode_op import ACTIVATION_CODES, decode_ffn_op, decode_ffn_reference  # noqa: E402
from gpu_poison import poison  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(T, D, H, E, K, dtype, gated, bias, seed=0, masked=0):
    g = torch.Generator(device=DEV).manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)

    x = rnd(T, D)
    w1, w2 = rnd(E, H, D, scale=D ** -0.5), rnd(E, H, D, scale=H ** -0.5)
    w3 = rnd(E, H, D, scale=D ** -0.5) if gated else None
    b1 = rnd(E, H, scale=0.1) if bias else None
    b2 = rnd(E, D, scale=0.1) if bias else None
    scores = torch.rand(T, E, generator=g, device=DEV)
    w_TK, e_TK = scores.topk(K, dim=1)
    if masked:
        e_TK[-masked:] = E   # padding tokens: select nothing
    return x, e_TK.contiguous(), w_TK.float().contiguous(), (w1, w2, w3, b1, b2)


def run_both(x, e_TK, w_TK, postscore, weights, act, splits, out_dtype):
    w1, w2, w3, b1, b2 = weights
    d64 = [None if t is None else t.double() for t in (w1, w2, w3, b1, b2)]
    ref = decode_ffn_reference(x.double(), e_TK, w_TK.double(), postscore, d64[0], d64[1], d64[2], d64[3], d64[4],
                               act, torch.float64)
    poison(4 * (e_TK.numel() * (w1.shape[1] + max(splits, 132) * w2.shape[2]) + x.shape[0] * w2.shape[2]))
    got = decode_ffn_op(x, e_TK, w_TK, postscore, w1, w2, w3, b1, b2, act, splits, out_dtype)
    torch.cuda.synchronize()
    return got, ref


def assert_close_scaled(got, ref, dtype):
    rtol, atol = ops.DECODE_TOLERANCES[dtype]
    assert torch.isfinite(got).all(), "unwritten (poisoned) or non-finite elements"
    scale = max(ref.abs().max().item(), 1e-6)
    err = (got.double() - ref).abs().max().item()
    assert err <= atol * scale + rtol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def test_native_decode_loaded():
    assert ops.native_available(), ops.native_status()


SHAPES = [  # T, D, H, E, K
    (1, 64, 128, 8, 2),
    (3, 72, 136, 8, 2),      # D, H not multiples of the warp's 256-element stride
    (16, 256, 512, 64, 8),   # many experts, some with zero pairs
    (64, 128, 64, 8, 8),     # K = E: every expert gets every token (more pairs than one pass)
    (5, 64, 64, 1, 1),       # E = 1
    (128, 64, 64, 4, 4),      # 512 pairs, 128 per expert: 16 passes of 8 pairs
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated, bias, postscore", [(True, False, True), (False, True, True), (False, True, False)])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_ffn_matches_reference(dtype, gated, bias, postscore, shape):
    T, D, H, E, K = shape
    x, e_TK, w_TK, weights = make_case(T, D, H, E, K, dtype, gated, bias)
    act = ACTIVATION_CODES["silu" if gated else "relu"]
    out_dtype = torch.promote_types(dtype, torch.float32) if postscore else dtype
    for splits in (0, 1, 3):
        got, ref = run_both(x, e_TK, w_TK, postscore, weights, act, splits, out_dtype)
        assert got.dtype == out_dtype and got.shape == (T, D)
        assert_close_scaled(got, ref, dtype)


@pytest.mark.parametrize("name", sorted(ACTIVATION_CODES))
def test_every_activation(name):
    x, e_TK, w_TK, weights = make_case(4, 64, 96, 8, 2, torch.float32, gated=False, bias=True, seed=1)
    got, ref = run_both(x, e_TK, w_TK, True, weights, ACTIVATION_CODES[name], 2, torch.float32)
    assert_close_scaled(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_padding_tokens_come_back_zero(dtype):
    x, e_TK, w_TK, weights = make_case(8, 64, 128, 8, 2, dtype, gated=True, bias=False, masked=3)
    x[-3:] = float("nan")   # padding content must not leak
    got, ref = run_both(x[:5].contiguous(), e_TK[:5].contiguous(), w_TK[:5].contiguous(), True, weights,
                        ACTIVATION_CODES["silu"], 2, torch.float32)
    assert_close_scaled(got, ref, dtype)
    full = decode_ffn_op(x, e_TK, w_TK, True, weights[0], weights[1], weights[2], None, None,
                         ACTIVATION_CODES["silu"], 2, torch.float32)
    assert torch.equal(full[-3:], torch.zeros_like(full[-3:]))
    assert torch.equal(full[:5], got)   # bitwise: fixed summation order, padding changes nothing
    # the same padding given as a device count: the kernels skip the tail themselves
    e_all = e_TK.clone()
    e_all[-3:] = 0                       # padding rows may hold any expert: the count decides
    counted = decode_ffn_op(x, e_all, w_TK, True, weights[0], weights[1], weights[2], None, None,
                            ACTIVATION_CODES["silu"], 2, torch.float32, torch.tensor(5, device=DEV))
    assert torch.equal(counted[-3:], torch.zeros_like(counted[-3:]))
    assert torch.equal(counted[:5], got)


def test_unselected_experts_are_never_read():
    x, e_TK, w_TK, weights = make_case(2, 64, 128, 8, 2, torch.bfloat16, gated=True, bias=False, seed=3)
    unused = sorted(set(range(8)) - set(e_TK.flatten().tolist()))
    assert unused
    for w in (weights[0], weights[1], weights[2]):
        w[unused] = float("nan")
    got = decode_ffn_op(x, e_TK, w_TK, True, weights[0], weights[1], weights[2], None, None,
                        ACTIVATION_CODES["silu"], 4, torch.float32)
    assert torch.isfinite(got).all()


def test_mixtral_shapes_bf16():
    """The decode benchmark's shapes (D=4096, H=14336, E=8, k=2), T = 1 and 16."""
    for T in (1, 16):
        x, e_TK, w_TK, weights = make_case(T, 4096, 14336, 8, 2, torch.bfloat16, gated=True, bias=False, seed=T)
        got, ref = run_both(x, e_TK, w_TK, True, weights, ACTIVATION_CODES["silu"], 0, torch.float32)
        assert_close_scaled(got, ref, torch.bfloat16)
        del weights
        torch.cuda.empty_cache()


def test_graph_capture_replays_the_same():
    x, e_TK, w_TK, weights = make_case(4, 128, 256, 8, 2, torch.bfloat16, gated=True, bias=False)
    args = (True, weights[0], weights[1], weights[2], None, None, ACTIVATION_CODES["silu"], 3, torch.float32)
    eager = decode_ffn_op(x, e_TK, w_TK, *args)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_ffn_op(x, e_TK, w_TK, *args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_ffn_op(x, e_TK, w_TK, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, decode_ffn_op(x, e_TK, w_TK, *args))
    assert not torch.equal(out, eager)


def test_bad_inputs_name_the_argument():
    """The Python wrapper names the argument before any device work; the kernels' own checks
    (reached through the raw op) raise too, and leave the process usable."""
    x, e_TK, w_TK, weights = make_case(2, 64, 128, 8, 2, torch.bfloat16, gated=False, bias=False)
    w1, w2 = weights[0], weights[1]
    silu = ops._decode_op.ACTIVATION_FNS["silu"]
    with pytest.raises(ValueError, match="w2_EHO"):
        ops.decode_ffn(x, e_TK, w_TK, True, (w1, w2.float(), None, None, None), silu, 0, torch.float32)
    with pytest.raises(ValueError, match="splits"):
        ops.decode_ffn(x, e_TK, w_TK, True, (w1, w2, None, None, None), silu, -1, torch.float32)
    with pytest.raises(RuntimeError, match="w2_EHO"):
        decode_ffn_op(x, e_TK, w_TK, True, w1, w2.float(), None, None, None, 1, 1, torch.float32)
    with pytest.raises(RuntimeError, match="splits"):
        decode_ffn_op(x, e_TK, w_TK, True, w1, w2, None, None, None, 1, -1, torch.float32)
    big = torch.zeros(1025, 1, dtype=torch.long, device=DEV)
    with pytest.raises(RuntimeError, match="pairs"):
        decode_ffn_op(torch.zeros(1025, 64, dtype=torch.bfloat16, device=DEV), big, None, False, w1, w2, None, None,
                      None, 1, 1, torch.bfloat16)
    assert torch.isfinite(decode_ffn_op(x, e_TK, w_TK, True, w1, w2, None, None, None, 1, 0, torch.float32)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [8, 1000, 4099])   # 4099: a tail shorter than one 16-byte pack
def test_act_mul_matches_reference(dtype, n):
    from adaptmoe.ops._decode_op import act_mul_op
    g = torch.randn(n, device=DEV, dtype=dtype)
    u = torch.randn(n, device=DEV, dtype=dtype)
    for name in ("silu", "gelu", "relu"):
        poison(4 * n)
        got = act_mul_op(g, u, ACTIVATION_CODES[name])
        ref = ops._decode_op.ACTIVATION_FNS[name](g.double()) * u.double()
        assert_close_scaled(got.view(-1), ref.view(-1), dtype)
