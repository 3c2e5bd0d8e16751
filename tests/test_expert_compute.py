"""Grouped (dropless) expert math on CPU: the sync-free paths that a per-expert bound enables."""
import pytest
import torch

import adaptmoe as am
from adaptmoe import expert_compute
from adaptmoe.expert_compute import FFNWeights, ffn_grouped, ffn_grouped_loop


def weights(e, D, H, gated=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.3).requires_grad_()  # noqa: E731
    return FFNWeights(mk(e, H, D), mk(e, H, D), mk(e, H) if bias else None, mk(e, D) if bias else None,
                      mk(e, H, D) if gated else None)


def grads_of(y, inputs):
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    return torch.autograd.grad((y * probe).sum(), inputs)


@pytest.mark.parametrize("gated", [False, True])
def test_every_count_equal_to_the_bound_runs_as_one_padded_batch(gated, monkeypatch):
    """top_k == num_experts: every expert holds exactly T rows, so the grouped rows are a padded
    [e, T] buffer; no per-expert loop (which reads counts on the host) may run."""
    e, T, D, H = 3, 5, 4, 6
    x = torch.randn(e * T, D, dtype=torch.float64, requires_grad=True)
    w = weights(e, D, H, gated)
    counts = torch.full((e,), T)
    act = torch.nn.functional.silu
    ref = ffn_grouped_loop(x, counts, w, act)
    ref_grads = grads_of(ref, [x, *[t for t in w if t is not None]])

    def no_loop(*args, **kwargs):
        raise AssertionError("the per-expert loop ran although every count equals the bound")

    monkeypatch.setattr(expert_compute, "ffn_grouped_loop", no_loop)
    y = ffn_grouped(x, counts, w, act, max_rows_per_expert=T)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_of(y, [x, *[t for t in w if t is not None]]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_padded_fallback_pads_to_the_bound_not_to_all_rows():
    """The sync-free padded path with a bound: experts with 0 rows and a full expert included."""
    counts = torch.tensor([3, 0, 5, 2])
    R, D, H = int(counts.sum()), 4, 6
    x = torch.randn(R, D, dtype=torch.float64, requires_grad=True)
    w = weights(4, D, H)
    act = torch.relu
    inputs = [x, *[t for t in w if t is not None]]
    ref = ffn_grouped_loop(x, counts, w, act)
    y = expert_compute._ffn_grouped_padded(x, counts, w, act, rows_per_expert=5)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_of(y, inputs), grads_of(ref, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_single_expert_needs_no_bound():
    x = torch.randn(7, 4, dtype=torch.float64)
    w = weights(1, 4, 6)
    torch.testing.assert_close(ffn_grouped(x, torch.tensor([7]), w, torch.relu),
                               ffn_grouped_loop(x, torch.tensor([7]), w, torch.relu), rtol=1e-12, atol=1e-12)


class _Scale(torch.nn.Module):
    def __init__(self, model_dim, num_local_experts, sharded_count):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(1.0, num_local_experts + 1, dtype=torch.float64).view(-1, 1, 1))

    def forward(self, x_eCD):
        return x_eCD * self.w


def test_custom_experts_skip_the_host_read_when_counts_are_known():
    config = am.ExpertConfig(kind="custom", custom_module=_Scale)
    experts = am.experts.build_experts(config, model_dim=4, num_local_experts=2)
    x = torch.randn(6, 4, dtype=torch.float64)
    counts = torch.tensor([3, 3])
    expected = torch.cat([x[:3] * 1.0, x[3:] * 2.0])
    torch.testing.assert_close(experts.forward_grouped(x, counts), expected)
    counts_without_host_read = torch.tensor([3, 3])
    counts_without_host_read.tolist = None    # the bound must make reading counts unnecessary
    torch.testing.assert_close(experts.forward_grouped(x, counts_without_host_read, max_rows_per_expert=3), expected)
