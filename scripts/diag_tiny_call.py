"""How steady is a host-bound training call on this machine? Times the planner's tiny calibration
call (autograd.grad with and without the float cast, .backward(), measure_call_ms) and a real
call of two bench_planner layers, median of 30 each.

    python scripts/diag_tiny_call.py

H100 (2026-11-22): the same call measured 2.27-3.08 ms across these variants and runs, so
host-bound predictions cannot be checked tighter than ~20% there.
"""
import statistics, torch, time
import adaptmoe as am
from adaptmoe.planning import PlanningOptions, measure_call_ms
from adaptmoe.examples.timing import median_ms
torch.manual_seed(0)
for (D, H, E, k, T) in [(1024, 4096, 16, 2, 512), (2048, 2048, 2, 2, 1024)]:
    cfg = am.MoEConfig(model_dim=D, num_experts=E, plan="fixed", gate=am.GateConfig(top_k=k, capacity_factor=1.0),
                       experts=am.ExpertConfig(hidden_size=H, has_fc1_bias=False, has_fc2_bias=False))
    layer = am.MoELayer(cfg, planning=PlanningOptions(tune=False, use_cache=False)).to("cuda", torch.bfloat16)
    sig = layer.planner.signature(k, 1.0, torch.bfloat16, True)
    dev = torch.device("cuda")
    res = {}
    for tokens in (max(E, 8), T):
        x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        params = [p for p in layer.parameters() if p.requires_grad]
        def grad_call():
            y = layer(x, plan="fixed")
            torch.autograd.grad(y.float().sum(), [x, *params], allow_unused=True)
        def grad_nofloat():
            y = layer(x, plan="fixed")
            torch.autograd.grad(y.sum(), [x, *params], allow_unused=True)
        def backward_call():
            layer(x, plan="fixed").sum().backward()
        for name, fn in (("grad+float", grad_call), ("grad", grad_nofloat), ("backward", backward_call)):
            res[(tokens, name)] = median_ms(fn, "cuda", 30, 10)
        res[(tokens, "measure_call_ms")] = measure_call_ms(layer, tokens, sig, dev)
    print(D, H, E, k, T, {f"T={t} {n}": round(v, 3) for (t, n), v in res.items()}, flush=True)
