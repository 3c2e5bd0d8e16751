"""Train one MoE layer for a few steps, Tutel-helloworld style (same flags, same printout).

    python -m adaptmoe.examples.helloworld                      # CPU if no GPU, small shapes
    python -m adaptmoe.examples.helloworld --device cuda --batch_size 16 --dtype bfloat16
    torchrun --nproc_per_node 2 -m adaptmoe.examples.helloworld  # experts spread over 2 ranks

The synthetic loss (NLL of the summed output, label 0) and the TFLOP/s figure
(4 * tokens * D * H * k, x3 when training) follow Tutel's helloworld so numbers compare.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from adaptmoe import moe as tutel_moe

CPU_DEFAULTS = dict(batch_size=4, num_tokens=256, model_dim=512, hidden_size=1024)
GPU_DEFAULTS = dict(batch_size=16, num_tokens=512, model_dim=2048, hidden_size=2048)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("batch_size", "num_tokens", "model_dim", "hidden_size"):
        p.add_argument(f"--{name}", type=int, default=None, help="default depends on the device")
    p.add_argument("--num_local_experts", type=int, default=2, help="experts per rank; -n: n ranks share one")
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--fp32_gate", action="store_true")
    p.add_argument("--l_aux_wt", type=float, default=0.0)
    p.add_argument("--a2a_ffn_overlap_degree", type=int, default=1)
    p.add_argument("--allreduce_degree", type=int, default=1)
    p.add_argument("--num_steps", type=int, default=20)
    p.add_argument("--parallel_type", default="adaptive:1")
    p.add_argument("--checkpoint_path", default="")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--use_2dh", action="store_true")
    p.add_argument("--eval", action="store_true")
    p.add_argument("--capacity_factor", type=float, default=1.0)
    p.add_argument("--megablocks_size", type=int, default=0)
    p.add_argument("--use_tensorcore", action="store_true")
    p.add_argument("--expert_type", default="ffn", choices=["ffn", "llama_ffn"])
    p.add_argument("--lr", type=float, default=1e-5)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name, value in (GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE; a plain `python -m` run is a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, torch.device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


class ExampleModel(torch.nn.Module):
    def __init__(self, args, rank: int, world: int):
        super().__init__()
        # Tutel's helloworld clamps --top to the expert count (e.g. --num_local_experts=-2 with the
        # default --top=2 gives one expert); the layer itself rejects k > E, so clamp here.
        top = min(args.top, tutel_moe.global_expert_count(args.num_local_experts, world))
        experts = {"type": args.expert_type, "num_experts_per_device": args.num_local_experts,
                   "hidden_size_per_expert": args.hidden_size}
        if args.expert_type == "ffn":
            experts["activation_fn"] = torch.nn.functional.relu
        self.moe = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": top, "fp32_gate": args.fp32_gate, "capacity_factor": args.capacity_factor},
            model_dim=args.model_dim, experts=experts, seeds=(1, rank + 1, 1),
            a2a_ffn_overlap_degree=args.a2a_ffn_overlap_degree, parallel_type=args.parallel_type, use_2dh=args.use_2dh,
            scan_expert_func=lambda name, param: setattr(param, "skip_allreduce", True))

    def forward(self, x):
        y = self.moe(x)
        return torch.log_softmax(y.sum(dim=2), dim=1), y.l_aux


def sync_shared_grads(model: torch.nn.Module, world: int) -> None:
    """Average non-expert gradients over ranks; expert gradients belong to their owners."""
    if world <= 1:
        return
    for param in model.parameters():
        if param.grad is not None and not getattr(param, "skip_allreduce", False):
            dist.all_reduce(param.grad)
            param.grad /= world


def run(args) -> list[float]:
    rank, world, device = init_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.use_tensorcore
    dtype = getattr(torch, args.dtype)
    model = ExampleModel(args, rank, world).to(device=device, dtype=dtype)
    if args.checkpoint_path and os.path.exists(args.checkpoint_path.format(rank=rank, size=world)):
        model.load_state_dict(torch.load(args.checkpoint_path.format(rank=rank, size=world), map_location=device))
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, args.num_tokens, args.model_dim, device=device, dtype=dtype)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    if rank == 0:
        experts = sum(p.numel() for p in model.moe.experts.parameters())
        gate = sum(p.numel() for p in model.moe.gates.parameters())
        print(f"[Statistics] param count for MoE local_experts = {experts}, param count for MoE gate = {gate}.")
        print(f"[Benchmark] world_size = {world}, dtype = {args.dtype}, model_dim = {args.model_dim}, "
              f"hidden_size = {args.hidden_size}, samples = {args.batch_size * args.num_tokens}, "
              f"num_local_experts = {args.num_local_experts}, topK = {args.top}, "
              f"a2a_ffn_overlap_degree = {args.a2a_ffn_overlap_degree}, parallel_type = `{args.parallel_type}`, "
              f"device = `{device}`")
    flops_per_step = 4 * args.batch_size * args.num_tokens * args.model_dim * args.hidden_size * \
        min(args.top, model.moe.num_global_experts) * (1 if args.eval else 3)
    return train_loop(args, model, optimizer, x, y, rank, world, flops_per_step)


def train_loop(args, model, optimizer, x, y, rank, world, flops_per_step) -> list[float]:
    losses, times = [], []
    for step in range(args.num_steps):
        start = _now(x.device)
        if args.eval:
            with torch.no_grad():
                output, l_aux = model(x)
                loss = torch.nn.functional.nll_loss(output, y)
        else:
            optimizer.zero_grad(set_to_none=True)
            output, l_aux = model(x)
            loss = torch.nn.functional.nll_loss(output, y) + args.l_aux_wt * l_aux
            loss.backward()
            sync_shared_grads(model, world)
            optimizer.step()
        elapsed = _now(x.device) - start
        losses.append(loss.item())
        times.append(elapsed)
        if rank == 0:
            print(f"STEP-{step}: loss = {losses[-1]:.5f}, step_time = {elapsed:.6f} sec, "
                  f"perf = {flops_per_step / elapsed * 1e-12:.2f} tflops.")
    if rank == 0:
        tail = times[-10:]
        print(f"\n[Summary] Average synchronized step_time = {sum(tail) / len(tail)} sec.")
    return losses


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main(argv=None) -> list[float]:
    try:
        losses = run(parse_args(argv))
        if dist.is_available() and dist.is_initialized():
            # A rank whose last collective returned may still have a peer reading from it:
            # closing its sockets then aborts that peer (gloo IoException; seen once in CI).
            dist.barrier()
        return losses
    finally:
        # An initialized group left to interpreter exit can abort the process ("terminate called
        # without an active exception") and turn a good run into a failed one.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
