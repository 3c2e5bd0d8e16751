"""Worker bodies for the multi-process tests (run inside ``harness.run_world``).

Parity: every rank builds the same global layer single-process (a group of one rank, same
seeds), slices its expert weights into this rank's shard, and compares outputs and ALL
gradients (input, gate, expert shards) of the parallel layer with the single-process layer
applied to each rank's own tokens (capacity is per source rank; with uneven token counts the
reference uses the capacity the ranks agree on, from the largest count).
"""
from __future__ import annotations

import itertools
import os
import zlib

import torch
import torch.distributed as dist

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, executor
from adaptmoe.parallel import with_capacity
from adaptmoe.routing import capacity_for

RTOL, ATOL = 1e-5, 1e-6
VERBOSE = os.environ.get("ADAPTMOE_TEST_VERBOSE") == "1"


def solo_group():
    from adaptmoe import comm
    return comm.subgroup(None, [dist.get_rank()])


_SOLO = {}


def reference_layer(config: MoEConfig) -> MoELayer:
    if "g" not in _SOLO:
        _SOLO["g"] = solo_group()
    return MoELayer(config, group=_SOLO["g"], seeds=(1, 2, 3))


def shard_of(full, name: str, layout, output_dim: int):
    """This rank's stored shard of a global (s = 1) expert parameter [E, ...]."""
    s, W, rank = layout.sharded_count, layout.world_size, layout.rank
    if s == 1:
        e = layout.num_local_experts
        return full[rank * e:(rank + 1) * e]
    ex, j = divmod(rank, s)
    if name == "batched_fc2_bias":
        width = -(-output_dim // s)
        padded = full.new_zeros(full.shape[0], width * s)
        padded[:, :output_dim] = full
        return padded[ex:ex + 1, j * width:(j + 1) * width]
    h = full.shape[1] // s
    return full[ex:ex + 1, j * h:(j + 1) * h]


def load_from_reference(layer: MoELayer, ref: MoELayer) -> None:
    with torch.no_grad():
        for p, q in zip(layer.gates.parameters(), ref.gates.parameters()):
            p.copy_(q)
        ref_params = dict(ref.experts.named_parameters())
        for name, p in layer.experts.named_parameters():
            p.copy_(shard_of(ref_params[name], name, layer.layout, ref.experts.output_dim))


def reference_output(ref: MoELayer, x, cf: float, t_agreed: int, k: int):
    knobs = ref.resolve_knobs(capacity_factor=cf, top_k=k)
    x_TD = x.reshape(-1, ref.config.model_dim)
    if x_TD.shape[0] == 0:   # nothing to compare; keeps the reference off zero-row kernel paths
        return x_TD.new_zeros(0, ref.experts.output_dim) + x_TD.sum() * 0
    routing, _ = ref._route(x_TD, knobs)
    if not routing.dropless:
        routing = with_capacity(routing, capacity_for(cf, t_agreed, ref.config.num_experts, k))
    return executor.run_local(x_TD, routing, ref.experts, num_experts=ref.config.num_experts,
                              is_postscore=ref.config.is_postscore)


def close(name, got, want, failures, tag):
    if got is None:
        got = torch.zeros_like(want)
    if want is None:
        want = torch.zeros_like(got)
    if got.shape != want.shape:
        failures.append(f"{tag}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}")
    elif not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        err = (got - want).abs().max().item()
        failures.append(f"{tag}: {name} max abs err {err:.3g}")


def storage(layer):
    return [(n, p.data_ptr(), tuple(p.shape)) for n, p in layer.named_parameters()]


def parity_worker(rank, world_size, layer_specs, token_profiles, degrees, algos, cfs, device="cpu", tol=None):
    global RTOL, ATOL
    if tol is not None:
        RTOL, ATOL = tol
    failures = []
    cases = 0
    for spec in layer_specs:
        config = MoEConfig(model_dim=spec.get("D", 8), num_experts=spec["E"],
                           gate=GateConfig(top_k=spec.get("k", min(2, spec["E"])), capacity_factor=1.0),
                           experts=ExpertConfig(kind=spec.get("kind", "ffn"), hidden_size=spec.get("H", 16),
                                                activation="relu", output_dim=spec.get("O")),
                           is_postscore=spec.get("postscore", True))
        ref = reference_layer(config)
        layer = MoELayer(config, seeds=(1, 2, 3))
        load_from_reference(layer, ref)
        ref.to(device)
        layer.to(device)
        before = storage(layer)
        k = config.gate.top_k
        for cf, r, d, algo, profile in itertools.product(cfs, layer.valid_adaptive_rs, degrees, algos,
                                                         token_profiles):
            counts = profile[:world_size]
            tag = f"W={world_size} {spec} cf={cf} r={r} d={d} {algo} T={counts}"
            if VERBOSE:
                print(f"rank {rank} case {cases}: {tag}", flush=True)
            gen = torch.Generator().manual_seed(zlib.crc32(repr((counts, cf, r, d, algo)).encode()))
            xs = [torch.randn(t, config.model_dim, generator=gen).to(device) for t in counts]
            out_dim = ref.experts.output_dim
            dys = [torch.randn(t, out_dim, generator=gen).to(device) for t in counts]
            # parallel
            x = xs[rank].clone().requires_grad_(True)
            y = layer(x, capacity_factor=cf, adaptive_r=r, a2a_ffn_overlap_degree=d, a2a_algo=algo)
            (y * dys[rank]).sum().backward()
            gate_grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.gates.parameters()]
            for g in gate_grads:
                dist.all_reduce(g)
            # reference: every rank's tokens through the global layer
            t_agreed = max(counts)
            ref_xs = [xq.clone().requires_grad_(True) for xq in xs]
            loss = sum((reference_output(ref, xq, cf, t_agreed, k) * dq).sum() for xq, dq in zip(ref_xs, dys))
            loss.backward()
            ref_y = reference_output(ref, xs[rank], cf, t_agreed, k).detach()
            close("output", y.detach(), ref_y, failures, tag)
            close("input grad", x.grad, ref_xs[rank].grad, failures, tag)
            for i, (g, q) in enumerate(zip(gate_grads, ref.gates.parameters())):
                close(f"gate grad {i}", g, q.grad, failures, tag)
            ref_params = dict(ref.experts.named_parameters())
            for name, p in layer.experts.named_parameters():
                want = ref_params[name].grad
                want = shard_of(want, name, layer.layout, out_dim) if want is not None else None
                close(f"expert grad {name}", p.grad, want, failures, tag)
            if storage(layer) != before:
                failures.append(f"{tag}: parameter storage changed")
            layer.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
            cases += 1
    if failures:
        raise AssertionError(f"rank {rank}: {len(failures)} mismatches in {cases} cases:\n" + "\n".join(failures[:40]))


# ----------------------------------------------------------------------------- checkpoint, grads, net
def _layer_config(E, O=None, H=16, D=8):
    return MoEConfig(model_dim=D, num_experts=E, gate=GateConfig(top_k=min(2, E), capacity_factor=1.0),
                     experts=ExpertConfig(hidden_size=H, activation="relu", output_dim=O))


def checkpoint_worker(rank, world_size, directory):
    """Save at W=4 (whole and sharded experts), load at W=2 (pairs) and W=1; same outputs."""
    from adaptmoe import checkpoint, comm
    pair = comm.subgroup(None, range(rank // 2 * 2, rank // 2 * 2 + 2))
    solo = solo_group()
    for E, O in ((8, None), (2, 7), (1, None)):
        config = _layer_config(E, O)
        src = MoELayer(config, seeds=(7, 8 + rank, 9))          # experts differ per rank, like Tutel's seeds
        path = f"{directory}/E{E}"
        checkpoint.save(src, path)
        gen = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(10, 8, generator=gen)
        for cf in (1.0, 0.0):
            want = src(x, capacity_factor=cf)
            for group in (pair, solo):
                dst = MoELayer(config, group=group, seeds=(0, 0, 0))
                checkpoint.load(dst, path)
                for r in dst.valid_adaptive_rs:
                    got = dst(x, capacity_factor=cf, adaptive_r=r)
                    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                        raise AssertionError(f"E={E} cf={cf} r={r} W={dst.layout.world_size}: "
                                             f"err {(got - want).abs().max():.3g}")
        # round trip back to 4 ranks: identical stored shards
        back = MoELayer(config, seeds=(0, 0, 0))
        checkpoint.load(back, path)
        lay = back.layout
        for (n, p), q in zip(back.state_dict().items(), src.state_dict().values()):
            if n == "experts.batched_fc2_bias" and lay.sharded_count > 1:   # padding columns are unused
                width = p.shape[1]
                valid = min(width, back.experts.output_dim - lay.rank % lay.sharded_count * width)
                p, q = p[:, :valid], q[:, :valid]
            assert torch.equal(p, q), n
        wrong = MoELayer(_layer_config(E, O, H=32), seeds=(0, 0, 0))
        untouched = {k: v.clone() for k, v in wrong.state_dict().items()}
        try:
            checkpoint.load(wrong, path)
        except ValueError as err:
            assert "hidden_size" in str(err), err
        else:
            raise AssertionError("loading a checkpoint with another hidden size must raise")
        # a load that raises changes nothing (validation runs before the first copy)
        changed = [k for k, v in wrong.state_dict().items() if not torch.equal(v, untouched[k])]
        assert not changed, f"a failed checkpoint.load changed {changed}"


class _Model(torch.nn.Module):
    def __init__(self, config, group):
        super().__init__()
        torch.manual_seed(3)
        self.pre = torch.nn.Linear(config.model_dim, config.model_dim)
        self.moe = MoELayer(config, group=group, seeds=(1, 2, 3))

    def forward(self, x, **kw):
        return self.moe(torch.tanh(self.pre(x)), **kw)


def grad_sync_worker(rank, world_size):
    """EP inside a 'node' (pairs), DP across nodes: plain loop and the DDP recipe."""
    from adaptmoe import grad_sync, net
    env = net.create_groups_from_world(-2)              # model groups {0,1},{2,3}; data {0,2},{1,3}
    config = _layer_config(2)
    ref = _Model(config, solo_group())
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 8, generator=gen) for _ in range(world_size)]
    dys = [torch.randn(6, 8, generator=gen) for _ in range(world_size)]
    loss = sum((ref(x, capacity_factor=0.0) * dy).sum() for x, dy in zip(xs, dys)) / world_size
    loss.backward()
    ref_grads = dict(ref.named_parameters())
    for use_ddp in (False, True):
        model = _Model(config, env.model_group)
        model.pre.load_state_dict(ref.pre.state_dict())
        load_from_reference(model.moe, ref.moe)
        runner = model
        if use_ddp:
            assert grad_sync.ddp_ignore_expert_params(model)
            runner = torch.nn.parallel.DistributedDataParallel(model)
        for r in model.moe.valid_adaptive_rs:
            model.zero_grad(set_to_none=True)
            (runner(xs[rank], capacity_factor=0.0, adaptive_r=r) * dys[rank]).sum().backward()
            grad_sync.sync_gradients(model, dp_group=None, expert_dp_group=env.data_group,
                                     include_non_expert=not use_ddp)
            for name, p in model.named_parameters():
                want = ref_grads[name].grad
                if name.startswith("moe.experts."):
                    want = shard_of(want, name.split(".")[-1], model.moe.layout, 8)
                if not torch.allclose(p.grad, want, rtol=RTOL, atol=ATOL):
                    raise AssertionError(f"ddp={use_ddp} r={r} {name}: err {(p.grad - want).abs().max():.3g}")


def net_worker(rank, world_size):
    """Tutel-style helpers: values, autograd, 2D == flat, sub-group splitting, bad r, no hang."""
    from adaptmoe import comm, net
    W = world_size
    x = (torch.arange(W * 3 * 2, dtype=torch.float64).view(W * 3, 2) + 100 * rank).requires_grad_(True)
    for use_2dh in (False, True):
        y = net.all_to_all(x, 1, 0, use_2dh=use_2dh)           # [3, 2W]: row block w of every rank
        want = torch.cat([torch.arange(W * 3 * 2, dtype=torch.float64).view(W * 3, 2)[rank * 3:(rank + 1) * 3]
                          + 100 * src for src in range(W)], dim=1)
        assert torch.equal(y.detach(), want), (use_2dh, y, want)
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        (gx,) = torch.autograd.grad(y, x, g)
        back = net.all_to_all(g, 0, 1, use_2dh=use_2dh)      # the transposed exchange
        assert torch.equal(gx, back)
    full = net.all_gather(x.detach(), dim=0)
    assert full.shape == (W * W * 3, 2) and torch.equal(full[rank * W * 3:(rank + 1) * W * 3], x.detach())
    # variable size
    counts = [rank + w for w in range(W)]
    data = torch.arange(sum(counts), dtype=torch.float32) + 1000 * rank
    (out,), out_counts = net.batch_all_to_all_v([data], counts)
    assert out_counts.tolist() == [src + rank for src in range(W)]
    pieces = []
    for src in range(W):
        src_counts = [src + w for w in range(W)]
        lo = sum(src_counts[:rank])
        pieces.append(torch.arange(lo, lo + src_counts[rank], dtype=torch.float32) + 1000 * src)
    assert torch.equal(out, torch.cat(pieces))
    v = torch.full((rank + 1,), float(rank), requires_grad=True)
    (gathered,), sizes = net.batch_all_gather_v([v])
    assert sizes == [[w + 1 for w in range(W)]]
    assert torch.equal(gathered.detach(), torch.cat([torch.full((w + 1,), float(w)) for w in range(W)]))
    gathered.sum().backward()
    assert torch.equal(v.grad, torch.full((rank + 1,), float(W)))
    # splitting a sub-group (Tutel #292 raises here)
    env = net.create_groups_from_world(-2)
    inner = net.create_groups_from_world(2, parent_group=env.data_group)
    assert net.get_world_size(inner.model_group) == 1 and net.get_world_size(inner.data_group) == 2
    t = torch.ones(1)
    dist.all_reduce(t, group=inner.data_group)
    assert t.item() == 2
    # an invalid r raises before any communication; the ranks then go on together (no hang)
    layer = MoELayer(_layer_config(2), seeds=(1, 2, 3))
    try:
        layer(torch.randn(4, 8), adaptive_r=3)
    except ValueError as err:
        assert "adaptive_r" in str(err)
    else:
        raise AssertionError("adaptive_r=3 must raise")
    layer(torch.randn(4, 8), adaptive_r=2).sum().backward()
    assert comm.block_group(None, 2) is comm.block_group(None, 2)   # cached


# ----------------------------------------------------------------------------- custom experts
class _Project(torch.nn.Module):
    """Custom experts whose output width differs from model_dim: [e, C, D] -> [e, C, *out]."""

    def __init__(self, model_dim, num_local_experts, sharded_count, out=(5,)):
        super().__init__()
        self.out = tuple(out)
        width = 1
        for n in self.out:
            width *= n
        self.w = torch.nn.Parameter(torch.randn(num_local_experts, model_dim, width,
                                                generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.bmm(x, self.w).reshape(*x.shape[:2], *self.out)


def custom_experts_worker(rank, world_size):
    """Custom experts with an output width != model_dim, W=2, E=2, k=1: a rank that receives no
    rows (dropless), a capacity of 0 and a multi-dim output all match the single-process layer."""
    failures = []
    for out in ((5,), (2, 3)):
        config = MoEConfig(model_dim=8, num_experts=2, gate=GateConfig(top_k=1, capacity_factor=1.0),
                           experts=ExpertConfig(kind="custom", custom_module=_Project,
                                                custom_kwargs=(("out", out),)))
        ref = reference_layer(config)
        layer = MoELayer(config, seeds=(1, 2, 3))
        with torch.no_grad():
            layer.experts.module.w.copy_(ref.experts.module.w[rank:rank + 1])
        # (cf, tokens per rank, route every token to expert 0 so rank 1 receives nothing)
        for cf, counts, to_expert0 in ((0.0, [6, 6], True), (0.1, [1, 1], False), (1.0, [6, 5], True),
                                       (1.0, [6, 5], False), (0.0, [6, 5], False)):
            tag = f"out={out} cf={cf} T={counts} to_expert0={to_expert0}"
            with torch.no_grad():
                for lay in (layer, ref):
                    wg = lay.gates[0].wg.weight
                    wg.copy_(torch.randn(wg.shape, generator=torch.Generator().manual_seed(4)))
                    if to_expert0:
                        wg.zero_()
                        wg[0].fill_(1.0)
            gen = torch.Generator().manual_seed(11)
            xs = [torch.rand(t, 8, generator=gen) + 0.1 for t in counts]
            x = xs[rank].clone().requires_grad_(True)
            try:
                y = layer(x, capacity_factor=cf)
                y.sum().backward()
            except Exception as err:   # noqa: BLE001 - reported with the case
                failures.append(f"{tag}: {type(err).__name__}: {err}")
                break
            xr = xs[rank].clone().requires_grad_(True)
            want = reference_output(ref, xr, cf, max(counts), 1)
            want.sum().backward()
            close("output", y.detach().reshape(want.shape[0], -1), want.detach(), failures, tag)
            close("input grad", x.grad, xr.grad, failures, tag)
    if failures:
        raise AssertionError(f"rank {rank}:\n" + "\n".join(failures))
