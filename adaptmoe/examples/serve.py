"""Serving benchmark: a stream of requests with random token counts through one MoE layer.

    python -m adaptmoe.examples.serve                        # CPU, small shapes, float32
    python -m adaptmoe.examples.serve --device cuda          # Mixtral layer: D=4096 H=14336 E=8 k=2 bf16

Legend: T tokens of one request, D model dim, H expert hidden, E experts, K top-k.
Requests mix decode steps (T in 1..--max-decode) and prefills (T log-uniform up to
--max-prefill). Every strategy serves the same stream, one request at a time (each waits for its
result, as a server returns it):
  adaptive         ServingMoE: dropless, the planner's kernel per token bucket, eager
  adaptive+graphs  the same through CudaGraphRunner (CUDA only; buckets captured before the stream)
  fixed grouped    the layer's dropless grouped path for every size
  fixed bmm cf=1   the layer's capacity-padded path (capacity factor 1: may drop tokens)
  fixed decode     the sync-free decode kernel for every size
Eager strategies run ``ServingMoE.warmup`` (one call per bucket) and graph strategies capture
their buckets before the stream, as a server does at start-up; the stream's sizes are drawn
independently, so most requests still bring a token count the layer has not seen.
Reported per strategy and token bucket: p50/p99 latency and tokens/s; first call of each bucket
against that bucket's p50 (a new size must not stall); then the decode floor = bytes of the
distinct experts the tokens selected / device copy bandwidth measured in this run, for
T in --floor-tokens, and the prefill floor = balanced batched matmuls of the same experts.
GPU timing: CUDA events around each call, synchronized per call. CPU: perf_counter.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from typing import Callable

import torch

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
from adaptmoe import decode
from adaptmoe.serving import CudaGraphRunner, ServingMoE, token_bucket
from adaptmoe.examples.timing import median_ms, time_call

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CPU_DEFAULTS = dict(model_dim=64, hidden=128, dtype="float32", max_prefill=512, requests=60, iters=10)
GPU_DEFAULTS = dict(model_dim=4096, hidden=14336, dtype="bfloat16", max_prefill=8192, requests=200, iters=50)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    for name in ("model_dim", "hidden", "max_prefill", "requests", "iters"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                       help="default depends on the device")
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", dest="top_k", type=int, default=2)
    p.add_argument("--expert-kind", dest="expert_kind", default="gated_ffn", choices=["gated_ffn", "ffn"],
                   help="gated_ffn = Mixtral's 3 matrices (silu); ffn = 2 matrices (relu, Tutel helloworld)")
    p.add_argument("--max-decode", dest="max_decode", type=int, default=64)
    p.add_argument("--decode-fraction", dest="decode_fraction", type=float, default=0.7)
    p.add_argument("--floor-tokens", dest="floor_tokens", default="1,4,16,64")
    p.add_argument("--prefill-floor-tokens", dest="prefill_floor_tokens", default=None,
                   help="comma list (default: 4096,8192 on cuda, 256 on cpu)")
    p.add_argument("--split-k", dest="split_k", default="",
                   help="comma list of grouped_mm decode down-projection splits to add to the decode floor table")
    p.add_argument("--compare-methods", dest="compare_methods", default=None,
                   help="comma list of adaptmoe.decode methods to add to the decode floor table "
                        "(default: grouped_mm on cuda, none on cpu)")
    p.add_argument("--strategies", default="all", help="comma list of strategy names, or all")
    p.add_argument("--skip-stream", dest="skip_stream", action="store_true", help="floors only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="write all results to this file")
    args = p.parse_args(argv)
    for name, value in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.compare_methods is None:
        args.compare_methods = "grouped_mm" if args.device == "cuda" else ""
    if args.prefill_floor_tokens is None:
        args.prefill_floor_tokens = "4096,8192" if args.device == "cuda" else "256"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU visible")
    return args


def build_layer(args: argparse.Namespace) -> MoELayer:
    gated = args.expert_kind == "gated_ffn"
    config = MoEConfig(model_dim=args.model_dim, num_experts=args.experts,
                       gate=GateConfig(top_k=args.top_k, capacity_factor=1.0, losses=("none",)),
                       experts=ExpertConfig(kind=args.expert_kind, hidden_size=args.hidden,
                                            activation="silu" if gated else "relu",
                                            has_fc1_bias=False, has_fc2_bias=False))
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        layer = MoELayer(config)
    return layer.to(DTYPES[args.dtype]).eval()


def request_sizes(args: argparse.Namespace) -> list[int]:
    rng = random.Random(args.seed)
    sizes = []
    for _ in range(args.requests):
        if rng.random() < args.decode_fraction:
            sizes.append(rng.randint(1, args.max_decode))
        else:
            low = math.log(args.max_decode + 1)
            sizes.append(int(round(math.exp(rng.uniform(low, math.log(args.max_prefill))))))
    return sizes


# -- timing (adaptmoe.examples.timing) ----------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def copy_bandwidth(device: str, iters: int) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read + written (anchor-figures' convention)."""
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, max(iters // 2, 3))
    return 2 * nbytes / (ms * 1e-3)


# -- strategies and the stream ----------------------------------------------------------------
STRATEGIES = ("adaptive", "adaptive+graphs", "fixed grouped", "fixed bmm cf=1", "fixed decode")


def strategies(layer: MoELayer, args: argparse.Namespace) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    wanted = STRATEGIES if args.strategies == "all" else tuple(args.strategies.split(","))
    unknown = sorted(set(wanted) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; known: {list(STRATEGIES)}")
    if args.device != "cuda" and "adaptive+graphs" in wanted:
        print("note: adaptive+graphs needs CUDA; skipped on cpu")
    make = {
        "adaptive": lambda: ServingMoE(layer),
        "adaptive+graphs": lambda: CudaGraphRunner(ServingMoE(layer), max_graph_tokens=max(args.max_decode, 64)),
        "fixed grouped": lambda: ServingMoE(layer, kernel="grouped"),
        "fixed bmm cf=1": lambda: ServingMoE(layer, kernel="bmm", capacity_factor=1.0),
        "fixed decode": lambda: ServingMoE(layer, kernel="decode"),
    }
    return {name: make[name]() for name in STRATEGIES
            if name in wanted and (name != "adaptive+graphs" or args.device == "cuda")}


def warm_device(layer: MoELayer, x_TD: torch.Tensor, device: str) -> None:
    """Library init (cuBLAS, allocator, grouped_mm probe) on a throw-away wrapper: the measured
    strategies start with empty plan tables."""
    scratch = ServingMoE(layer)
    with torch.no_grad():
        for kernel in ("decode", "grouped"):
            for T in (1, 3, 200):
                scratch(x_TD[:T], kernel=kernel)
        scratch(x_TD[:200], kernel="bmm", capacity_factor=1.0)
    if device == "cuda":
        torch.cuda.synchronize()


def run_stream(fn: Callable, sizes: list[int], x_TD: torch.Tensor, device: str) -> list[tuple[int, float, bool]]:
    """(T, ms, first call of its bucket) per request."""
    seen: set[int] = set()
    records = []
    with torch.no_grad():
        for T in sizes:
            bucket = token_bucket(T)
            records.append((T, time_call(lambda: fn(x_TD[:T]), device), bucket not in seen))
            seen.add(bucket)
    return records


def summarize(records: list[tuple[int, float, bool]]) -> dict[int, dict[str, float]]:
    """Per bucket: count, p50/p99 ms and tokens/s of the steady calls; first-call ratio."""
    table: dict[int, dict[str, float]] = {}
    for bucket in sorted({token_bucket(T) for T, _, _ in records}):
        rows = [(T, ms, first) for T, ms, first in records if token_bucket(T) == bucket]
        steady = [ms for _, ms, first in rows if not first] or [ms for _, ms, _ in rows]
        p50 = statistics.median(steady)
        first_ms = next(ms for _, ms, first in rows if first)
        tokens, total_ms = sum(T for T, _, _ in rows), sum(ms for _, ms, _ in rows)
        table[bucket] = {"n": len(rows), "p50_ms": p50, "p99_ms": percentile(steady, 99),
                         "tok_per_s": tokens / (total_ms * 1e-3), "first_ms": first_ms,
                         "first_over_p50": first_ms / p50 if len(rows) > 1 else float("nan")}
    return table


def print_stream(name: str, table: dict[int, dict[str, float]], records: list) -> None:
    total_tok = sum(T for T, _, _ in records)
    total_s = sum(ms for _, ms, _ in records) * 1e-3
    print(f"\n[{name}] {len(records)} requests, {total_tok} tokens, {total_tok / total_s:,.0f} tok/s overall")
    print(f"  {'bucket':>7} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'tok/s':>12} {'first ms':>9} {'first/p50':>9}")
    for bucket, row in table.items():
        print(f"  {bucket:>7} {row['n']:>4} {row['p50_ms']:9.3f} {row['p99_ms']:9.3f} {row['tok_per_s']:12,.0f} "
              f"{row['first_ms']:9.3f} {row['first_over_p50']:9.2f}")


def print_comparison(tables: dict[str, dict[int, dict[str, float]]]) -> None:
    names = list(tables)
    buckets = sorted({b for t in tables.values() for b in t})
    print("\n=== p50 ms per bucket (lower is better) ===")
    print(f"  {'bucket':>7} " + " ".join(f"{n[:16]:>16}" for n in names))
    for b in buckets:
        cells = [f"{tables[n][b]['p50_ms']:16.3f}" if b in tables[n] else f"{'-':>16}" for n in names]
        print(f"  {b:>7} " + " ".join(cells))


# -- floors -----------------------------------------------------------------------------------
def expert_bytes(layer: MoELayer) -> int:
    """Bytes of one expert's weight matrices."""
    ex = layer.experts
    mats = [ex.batched_fc1_w, ex.batched_fc2_w] + ([ex.batched_fc3_w] if ex.batched_fc3_w is not None else [])
    return sum(m[0].numel() * m.element_size() for m in mats)


def decode_floors(layer: MoELayer, fns: dict[str, Callable], x_TD: torch.Tensor, bw: float,
                  args: argparse.Namespace) -> list[dict]:
    rows = []
    for T in [int(t) for t in args.floor_tokens.split(",") if t]:
        x_T = x_TD[:T]
        with torch.no_grad():
            indices_TK, _ = decode.route_tokens(layer, x_T, top_k=args.top_k)
        distinct = int(indices_TK.unique().numel())
        floor = distinct * expert_bytes(layer) / bw * 1e3
        row = {"T": T, "distinct": distinct,
               "expected_distinct": decode.expected_distinct_experts(T, args.experts, args.top_k), "floor_ms": floor}
        with torch.no_grad():
            for name, fn in fns.items():
                row[name] = median_ms(lambda: fn(x_T), args.device, args.iters)
        rows.append(row)
    return rows


def balanced_floor_fn(layer: MoELayer, T: int, args: argparse.Namespace) -> Callable[[], torch.Tensor]:
    """The same experts' arithmetic with perfectly balanced rows (T*K/E each): batched matmuls."""
    ex = layer.experts
    E, C = args.experts, max(T * args.top_k // args.experts, 1)
    xf = torch.randn(E, C, args.model_dim, device=args.device, dtype=DTYPES[args.dtype])

    def floor() -> torch.Tensor:
        h = torch.bmm(xf, ex.batched_fc1_w.transpose(1, 2))
        if ex.batched_fc3_w is not None:
            h = torch.nn.functional.silu(h) * torch.bmm(xf, ex.batched_fc3_w.transpose(1, 2))
        else:
            h = torch.relu(h)
        return torch.bmm(h, ex.batched_fc2_w)
    return floor


def prefill_floors(layer: MoELayer, fns: dict[str, Callable], x_TD: torch.Tensor,
                   args: argparse.Namespace) -> list[dict]:
    rows = []
    for T in [int(t) for t in args.prefill_floor_tokens.split(",") if t]:
        with torch.no_grad():
            row = {"T": T, "floor_ms": median_ms(balanced_floor_fn(layer, T, args), args.device, args.iters)}
            for name, fn in fns.items():
                row[name] = median_ms(lambda: fn(x_TD[:T]), args.device, args.iters)
        rows.append(row)
    return rows


def print_floors(title: str, rows: list[dict], names: list[str], extra: tuple[str, ...]) -> None:
    print(f"\n=== {title} ===")
    print(f"  {'T':>6} " + " ".join(f"{e:>9}" for e in extra) + f" {'floor ms':>9} "
          + " ".join(f"{n[:16]:>16} {'x floor':>7}" for n in names))
    for r in rows:
        cells = " ".join(f"{r[n]:16.3f} {r[n] / r['floor_ms']:7.2f}" for n in names)
        print(f"  {r['T']:>6} " + " ".join(f"{r[e]:9.2f}" for e in extra) + f" {r['floor_ms']:9.3f} " + cells)


def decode_variants(layer: MoELayer, args: argparse.Namespace) -> dict[str, Callable]:
    """Other decode implementations (eager, and graphs on CUDA) for the floor table: methods of
    adaptmoe.decode and the grouped_mm split-K down projection."""
    variants = {m: dict(decode_method=m) for m in args.compare_methods.split(",") if m}
    variants.update({f"split{s}": dict(decode_method="grouped_mm", decode_split_k=s)
                     for s in [int(v) for v in args.split_k.split(",") if v and int(v) > 1]})
    out: dict[str, Callable] = {}
    for name, options in variants.items():
        out[name] = ServingMoE(layer, **options)
        if args.device == "cuda":
            runner = CudaGraphRunner(ServingMoE(layer, **options), max_graph_tokens=max(args.max_decode, 64))
            _prepare_strategy(runner, [], args)
            out[f"{name}+graphs"] = runner
    return out


def _prepare_strategy(fn: Callable, sizes: list[int], args: argparse.Namespace) -> float:
    """Capture every bucket the stream and the floors use (graph runners) or warm every bucket
    up (eager ServingMoE) before timing, as a server does at start-up; returns the seconds it took."""
    t0 = time.perf_counter()
    if isinstance(fn, CudaGraphRunner):
        fn.capture(sizes + [int(t) for t in args.floor_tokens.split(",") if t], dtype=DTYPES[args.dtype])
    elif isinstance(fn, ServingMoE):
        fn.warmup(max([args.max_prefill, args.max_decode] + sizes))
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    layer = build_layer(args)
    floor_T = [int(t) for t in (args.floor_tokens + "," + args.prefill_floor_tokens).split(",") if t]
    rows = max([args.max_prefill, args.max_decode, 200] + floor_T)
    x_TD = torch.randn(rows, args.model_dim, device=args.device, dtype=DTYPES[args.dtype])
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name} | torch {torch.__version__} | {args.dtype} | D={args.model_dim} H={args.hidden} "
          f"E={args.experts} k={args.top_k} {args.expert_kind} | requests={args.requests} "
          f"(decode fraction {args.decode_fraction}, T<= {args.max_decode}; prefill T<= {args.max_prefill})")
    warm_device(layer, x_TD, args.device)
    fns = strategies(layer, args)
    results: dict = {"args": vars(args), "device": name, "streams": {}}
    sizes = request_sizes(args)
    for label, fn in fns.items():
        results.setdefault("prepare_s", {})[label] = _prepare_strategy(fn, sizes, args)
    if not args.skip_stream:
        tables = {}
        for label, fn in fns.items():
            planned_before = fn.planner.plans_computed if isinstance(fn, ServingMoE) else 0
            records = run_stream(fn, sizes, x_TD, args.device)
            tables[label] = summarize(records)
            print_stream(label, tables[label], records)
            if isinstance(fn, ServingMoE):
                results.setdefault("plans_computed", {})[label] = fn.planner.plans_computed
                results.setdefault("plans_during_stream", {})[label] = fn.planner.plans_computed - planned_before
        print_comparison(tables)
        results["streams"] = {k: {str(b): v for b, v in t.items()} for k, t in tables.items()}
    bw = copy_bandwidth(args.device, args.iters)
    timed = {k: v for k, v in fns.items() if k in ("adaptive", "adaptive+graphs", "fixed grouped")}
    timed.update(decode_variants(layer, args))
    results["copy_bw_GBps"] = bw / 1e9
    results["decode"] = decode_floors(layer, timed, x_TD, bw, args)
    print(f"\ncopy bandwidth (read+write): {bw / 1e9:,.1f} GB/s; one expert = {expert_bytes(layer) / 2**20:,.1f} MiB")
    print_floors("decode: latency vs weight-read floor (distinct selected experts' bytes / copy bandwidth)",
                 results["decode"], list(timed), ("distinct", "expected_distinct"))
    prefill = {k: v for k, v in fns.items() if k in ("adaptive", "fixed grouped", "fixed decode")}
    results["prefill"] = prefill_floors(layer, prefill, x_TD, args)
    print_floors("prefill: latency vs balanced batched-matmul floor of the same experts",
                 results["prefill"], list(prefill), ())
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
