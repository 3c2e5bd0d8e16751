"""CPU-side profile (torch.profiler) of the one-call native forward: which ATen calls inside it
cost host time. python scripts/profile_native_forward.py"""
import torch
from torch.profiler import profile, ProfilerActivity
from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, build_layer
layer = build_layer(CONFIGS["fine64"], "cuda")
x = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
knobs = layer.resolve_knobs()
with torch.no_grad():
    x_TD, _ = layer.flatten_input(x)
    plan = native_forward.plan_for(layer, x_TD, knobs, "fixed")
    for _ in range(5):
        native_forward.run(layer, x_TD, knobs, plan)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            native_forward.run(layer, x_TD, knobs, plan)
            torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))
