"""python -m planner show | clear | whatif: inspect the plan cache, plan a cluster that isn't here.

    python -m planner whatif --nodes 256 --gpus-per-node 8 --intra-bw 300 --inter-bw 25 \\
        --model-dim 4096 --hidden 14336 --experts 64 --top-k 2 --tokens 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from typing import Sequence

from planner.cache import PlanCache
from planner.device import PRESETS, DeviceModel
from planner.plan import DTYPE_BYTES, EXPERT_TYPES, Candidate, LayerSignature
from planner.search import rank_plans
from planner.shapes import shards_per_expert
from planner.topology import Topology

MAIN_COMPONENTS = ("a2a", "experts", "weight_gather", "overlap_hidden")


def _bounded(convert, low: float, inclusive: bool, what: str):
    """argparse type: `convert(text)` that must be >= low (or > low); errors say what it must be."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not (value >= low if inclusive else value > low):   # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_positive_int = _bounded(int, 1, True, "a positive integer")
_non_negative_int = _bounded(int, 0, True, "an integer >= 0")
_positive_float = _bounded(float, 0.0, False, "a number > 0")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{show,clear,whatif}")
    for name, text in (("show", "print the plan cache as a table"),
                       ("clear", "delete every cached plan")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--cache", help="cache file (default: $ADAPTMOE_PLAN_CACHE or "
                                         "$XDG_CACHE_HOME/adaptmoe/plans.msgpack)")
    w = sub.add_parser("whatif", help="rank plans for a described cluster and layer")
    w.add_argument("--nodes", type=_positive_int, required=True)
    w.add_argument("--gpus-per-node", type=_positive_int, required=True)
    w.add_argument("--intra-bw", type=_positive_float, required=True, help="GB/s per GPU")
    w.add_argument("--inter-bw", type=_positive_float, required=True, help="GB/s per GPU")
    w.add_argument("--intra-latency-us", type=_positive_float, default=0.5)
    w.add_argument("--inter-latency-us", type=_positive_float, default=0.5)
    w.add_argument("--model-dim", type=_positive_int, required=True)
    w.add_argument("--hidden", type=_positive_int, required=True)
    w.add_argument("--experts", type=_positive_int, required=True)
    w.add_argument("--top-k", type=_positive_int, required=True)
    w.add_argument("--tokens", type=_non_negative_int, required=True, help="tokens per rank")
    w.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16")
    w.add_argument("--expert-type", choices=list(EXPERT_TYPES), default="ffn")
    mode = w.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="training", action="store_true", default=True,
                      help="forward + backward (default)")
    mode.add_argument("--infer", dest="training", action="store_false", help="forward only")
    w.add_argument("--capacity-factor", type=float, default=1.0,
                   help=">0 fixed capacity, 0 dropless, <0 dropless capped at -cf")
    w.add_argument("--device", choices=sorted(PRESETS), default="H100")
    w.add_argument("--top", type=_positive_int, default=20, help="feasible rows to print")
    return parser


def _breakdown_cells(candidate: Candidate) -> str:
    parts = candidate.breakdown
    other = sum(v for k, v in parts.items() if k not in MAIN_COMPONENTS)
    cells = [parts.get(k, 0.0) for k in MAIN_COMPONENTS] + [other]
    return "".join(f"{v:>10.3f}" for v in cells)


def _print_ranked(ranked: list[Candidate], top: int) -> None:
    feasible = [c for c in ranked if c.feasible]
    print(f"{'rank':>4} {'r':>3} {'d':>2} {'algo':<5}{'kernel':<8}{'pred ms':>10}"
          f"{'a2a':>10}{'experts':>10}{'gather':>10}{'hidden':>10}{'other':>10}")
    for i, c in enumerate(feasible[:top], start=1):
        p = c.plan
        print(f"{i:>4} {p.adaptive_r:>3} {p.overlap_degree:>2} {p.a2a_algo:<5}"
              f"{p.expert_kernel:<8}{c.predicted_ms:>10.3f}{_breakdown_cells(c)}")
    if len(feasible) > top:
        print(f"     ... {len(feasible) - top} more feasible (--top to see them)")
    if not feasible:
        print("     no feasible plan")


def _print_rejected(ranked: list[Candidate]) -> None:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for c in ranked:
        for reason in c.rejected:
            by_reason[reason].append(c.plan.label())
    rejected = sum(1 for c in ranked if not c.feasible)
    print(f"\nrejected: {rejected} candidate(s)")
    for reason, labels in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        print(f"  - {reason}  [{len(labels)} candidate(s), e.g. {labels[0]}]")


def cmd_whatif(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        signature = LayerSignature(
            model_dim=args.model_dim, hidden=args.hidden, num_experts=args.experts,
            top_k=args.top_k, dtype=args.dtype, expert_type=args.expert_type,
            training=args.training, capacity_factor=args.capacity_factor)
    except ValueError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    topology = Topology.from_cluster(args.nodes, args.gpus_per_node, args.intra_bw, args.inter_bw,
                                     intra_latency_us=args.intra_latency_us,
                                     inter_latency_us=args.inter_latency_us)
    device = DeviceModel.preset(args.device)
    ranked = rank_plans(signature, args.tokens, topology, device)
    elapsed_ms = (time.perf_counter() - started) * 1e3
    shards = shards_per_expert(signature.num_experts, topology.world_size)
    print(f"cluster: {topology.describe()}")
    print(f"device:  {device.name} ({device.gemm_tflops:g} TFLOP/s, {device.mem_bw_gbps:g} GB/s, "
          f"{device.memory_gib:g} GiB)")
    print(f"layer:   {signature.key()}, {args.tokens} tokens per rank, "
          f"{shards} shard(s) per expert; times are per call "
          f"({'forward + backward' if signature.training else 'forward'})")
    print(f"planned {len(ranked)} candidates in {elapsed_ms:.1f} ms (topology + search)\n")
    _print_ranked(ranked, args.top)
    _print_rejected(ranked)
    return 0 if ranked and ranked[0].feasible else 1


def cmd_show(args: argparse.Namespace) -> int:
    cache = PlanCache(args.cache)
    entries = cache.entries()
    print(f"plan cache {cache.path}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    if not entries:
        return 0
    print(f"{'device':<10}{'W':>5}{'L':>3}  {'layer':<46}{'tokens':>7}  {'plan':<22}"
          f"{'pred ms':>9}{'meas ms':>9}  {'source':<9}{'age':>8}")
    now = time.time()
    for entry in sorted(entries.values(), key=lambda e: e.created):
        fp, sig = entry.fingerprint, entry.signature
        layer = LayerSignature.from_dict(sig).key() if sig else "?"
        pred = "-" if entry.predicted_ms is None else f"{entry.predicted_ms:.3f}"
        meas = "-" if entry.measured_ms is None else f"{entry.measured_ms:.3f}"
        age_h = (now - entry.created) / 3600
        print(f"{str(fp.get('device', '?')):<10}{str(fp.get('world_size', '?')):>5}"
              f"{str(fp.get('local_size', '?')):>3}  {layer:<46}{entry.token_bucket:>7}  "
              f"{entry.plan.label():<22}{pred:>9}{meas:>9}  {entry.source:<9}{age_h:>7.1f}h")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    cache = PlanCache(args.cache)
    removed = cache.clear()
    print(f"cleared {removed} entr{'y' if removed == 1 else 'ies'} from {cache.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "whatif":
        return cmd_whatif(args, parser)
    return cmd_show(args) if args.command == "show" else cmd_clear(args)


if __name__ == "__main__":
    sys.exit(main())
