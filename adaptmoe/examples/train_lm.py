"""Train a small MoE transformer language model on text this script generates (nothing downloaded).

    python -m adaptmoe.examples.train_lm --steps 50                 # CPU, ~10-20 s
    python -m adaptmoe.examples.train_lm --device cuda --steps 500
    torchrun --nproc_per_node=2 -m adaptmoe.examples.train_lm --device cuda

Legend: B batch, S sequence length, T = B*S tokens, D model dim, V vocabulary, E experts.

The corpus is sentences from a small random grammar (``generate_corpus``), or ``--text-file``;
tokens are characters. Every block is attention + an adaptmoe ``MoELayer``. Under torchrun the
experts are spread over the ranks (expert parallel) and the other weights are data parallel.
Each ``--log-interval`` steps one line reports step, loss, tokens/s and the expert load balance
(max / mean tokens per expert, 1.0 = perfectly even). With matplotlib installed the loss curve
is saved to ``<out>/loss_curve.png``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer

WORDS = {
    "det": ["the", "a", "every", "one", "that"],
    "adj": ["quiet", "small", "red", "old", "bright", "lazy", "clever", "cold", "green", "tall"],
    "noun": ["fox", "river", "lamp", "garden", "sailor", "clock", "mountain", "letter", "bird", "window"],
    "verb": ["carries", "watches", "finds", "paints", "follows", "opens", "hears", "draws", "keeps", "loses"],
    "prep": ["across", "under", "near", "behind", "beside", "over"],
}


def generate_corpus(num_sentences: int = 4000, seed: int = 0) -> str:
    """Sentences from a tiny grammar: det adj? noun verb det adj? noun (prep det noun)? ."""
    rng = random.Random(seed)

    def phrase() -> str:
        words = [rng.choice(WORDS["det"])]
        if rng.random() < 0.6:
            words.append(rng.choice(WORDS["adj"]))
        return " ".join(words + [rng.choice(WORDS["noun"])])

    sentences = []
    for _ in range(num_sentences):
        s = f"{phrase()} {rng.choice(WORDS['verb'])} {phrase()}"
        if rng.random() < 0.5:
            s += f" {rng.choice(WORDS['prep'])} {phrase()}"
        sentences.append(s[0].upper() + s[1:] + ".")
    return " ".join(sentences) + "\n"


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    seq_len: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 128
    capacity_factor: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, group=None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        gate = GateConfig(kind="softmax", top_k=cfg.top_k, capacity_factor=cfg.capacity_factor)
        experts = ExpertConfig(kind="ffn", hidden_size=cfg.expert_hidden, activation="gelu")
        self.moe = MoELayer(MoEConfig(model_dim=cfg.d_model, num_experts=cfg.num_experts, gate=gate,
                                      experts=experts), group=group)

    def attention(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, S, D))

    def forward(self, x_BSD: Tensor) -> Tensor:
        x_BSD = x_BSD + self.attention(self.ln1(x_BSD))
        return x_BSD + self.moe(self.ln2(x_BSD))


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig, group=None):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, group) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids_BS: Tensor) -> Tensor:
        x = self.tok(ids_BS) + self.pos(torch.arange(ids_BS.shape[1], device=ids_BS.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def aux_loss(self) -> Tensor:
        return sum(block.moe.l_aux for block in self.blocks)

    def load_balance(self) -> float:
        """max / mean tokens per expert of the last step, averaged over layers (1.0 = even)."""
        ratios = []
        for block in self.blocks:
            counts = block.moe.last_routing.counts_E.float()
            ratios.append((counts.max() / counts.mean().clamp(min=1e-9)).item())
        return sum(ratios) / len(ratios)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0, help="0 dropless, >0 fixed capacity")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-file", default=None, help="train on this text instead of the generated corpus")
    p.add_argument("--out", default="train_lm_out", help="folder for the loss-curve plot")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.log_interval < 1:
        p.error("--steps and --log-interval must be >= 1")
    return args


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    import torch.distributed as dist
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def sync_gradients(model: MoELM, world: int) -> None:
    """Makes every gradient that of the mean per-rank loss: replicated weights are averaged over the
    ranks; experts spread over the ranks already got every rank's tokens, so they are only scaled
    (``adaptmoe.grad_sync.sync_gradients`` does the same for any group layout)."""
    if world == 1:
        return
    import torch.distributed as dist
    spread = model.blocks[0].moe.layout.world_size > 1
    grads, own = [], []
    for p in model.parameters():
        if p.grad is not None:
            (own if spread and getattr(p, "_adaptmoe_expert", False) else grads).append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
    for g in own:
        g /= world


def batches(data: Tensor, batch_size: int, seq_len: int, seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
        rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()])
        yield rows[:, :-1].to(device), rows[:, 1:].to(device)


def save_plot(losses: list[float], out_dir: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "loss_curve.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.set_title("adaptmoe MoE LM")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def build(args, device: torch.device, world: int) -> tuple[MoELM, Tensor]:
    text = open(args.text_file).read() if args.text_file else generate_corpus(seed=args.seed)
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    if data.numel() <= args.seq_len + 1:
        raise ValueError(f"the text must be longer than --seq-len + 1 = {args.seq_len + 1} characters")
    cfg = ModelConfig(vocab_size=len(vocab), seq_len=args.seq_len, d_model=args.d_model, n_layers=args.layers,
                      num_experts=args.experts, top_k=args.top_k, expert_hidden=2 * args.d_model,
                      capacity_factor=args.capacity_factor)
    torch.manual_seed(args.seed)   # the same non-expert weights on every rank
    group = None if world > 1 and args.experts % world == 0 else _replicated_group(world)
    return MoELM(cfg, group).to(device), data


def _replicated_group(world: int):
    if world == 1:
        return None
    import torch.distributed as dist
    return dist.new_group([dist.get_rank()], use_local_synchronization=True)   # each rank keeps all experts


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    model, data = build(args, device, world)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    stream = batches(data, args.batch_size, args.seq_len, args.seed + 1 + rank, device)
    losses: list[float] = []
    tokens_per_step = args.batch_size * args.seq_len * world
    last, last_step = time.perf_counter(), 0
    for step in range(1, args.steps + 1):
        ids, targets = next(stream)
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + args.aux_weight * model.aux_loss()).backward()
        sync_gradients(model, world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if rank == 0 and (step % args.log_interval == 0 or step == 1 or step == args.steps):
            now = time.perf_counter()
            print(f"step {step:5d} | loss {losses[-1]:.4f} | {(step - last_step) * tokens_per_step / (now - last):9.0f}"
                  f" tok/s | expert load max/mean {model.load_balance():.2f}", flush=True)
            last, last_step = now, step
    plot = save_plot(losses, args.out) if rank == 0 and not args.no_plot else None
    if plot:
        print(f"loss curve saved to {plot}")
    return {"losses": losses, "plot": plot, "perplexity": math.exp(losses[-1])}


if __name__ == "__main__":
    main()
