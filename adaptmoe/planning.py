"""Runtime side of the planner: which Plan a call runs, tuned during warmup, remembered on disk.

Per (layer signature, token bucket) key: a plan from the in-memory table (hot path, a dict
lookup), else from the plan cache file, else from the cost model (``planner.rank_plans``).
With ``tune=True`` the top few candidates are then measured on the real calls (switching plans
moves no weights and gives the same outputs, so warmup steps are ordinary steps), the slowest
rank's time decides, every rank picks the same winner, and rank 0 persists it: the next run with
the same signature starts with the measured plan and no tuning.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from planner import DeviceModel, LayerSignature, Plan, PlanCache, rank_plans, token_bucket
from planner.cache import fingerprint_key, hardware_fingerprint, nearest_fingerprint
from planner.cost import structural_reasons

from . import probe

log = logging.getLogger("adaptmoe.planning")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


@dataclass(frozen=True)
class PlanningOptions:
    tune: bool = True            # measure the top candidates on real calls before locking one
    candidates: int = 3          # how many of the model's best plans to measure
    trials: int = 2              # timed calls per candidate (each after one untimed call)
    cache_path: str | None = None
    use_cache: bool = True


@dataclass
class _Tuning:
    candidates: list             # planner Candidates under measurement
    tokens: int
    signature: LayerSignature
    ranked: list                 # every candidate, for the explanation logged at the decision
    times_ms: list = field(default_factory=list)   # per candidate, its timings
    calls: int = 0

    def __post_init__(self) -> None:
        self.times_ms = [[] for _ in self.candidates]

    def current(self, trials: int) -> tuple[int, bool]:
        """(candidate index, whether this call is timed) for the next call."""
        per_candidate = trials + 1
        return self.calls // per_candidate, self.calls % per_candidate != 0


class CallTimer:
    """Times one call's forward (and backward, when it runs) of the layer."""

    def __init__(self, device: torch.device):
        self.device, self.forward_ms, self.backward_ms = device, None, None
        self._cuda = device.type == "cuda"

    def mark(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self._cuda:
            end.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3

    def start(self) -> None:
        self._t0 = self.mark()

    def stop_forward(self, x_TD: torch.Tensor, y_TO: torch.Tensor) -> None:
        self.forward_ms = self.elapsed_ms(self._t0, self.mark())
        if torch.is_grad_enabled() and y_TO.requires_grad and x_TD.requires_grad:
            y_TO.register_hook(lambda g: self._set_backward_start())
            x_TD.register_hook(lambda g: self._set_backward_end())

    def _set_backward_start(self) -> None:
        self._b0 = self.mark()

    def _set_backward_end(self) -> None:
        self.backward_ms = self.elapsed_ms(self._b0, self.mark())

    def total_ms(self) -> float:
        return self.forward_ms + (self.backward_ms or 0.0)


class LayerPlanner:
    def __init__(self, layer, options: PlanningOptions | None = None):
        self.layer, self.options = layer, options or PlanningOptions()
        self.chosen: dict[str, Plan] = {}
        self.tuning: dict[str, _Tuning] = {}
        self.pending: list[tuple[str, CallTimer, int]] = []
        self.tuning_calls = 0
        self._signatures: dict[tuple, LayerSignature] = {}
        self._fingerprint: str | None = None
        self._cache: PlanCache | None = None
        self._calibrated_modes: set[bool] = set()

    # -- setup (first call) ------------------------------------------------------------------
    def _ensure_hardware(self, device: torch.device) -> None:
        if self._fingerprint is not None:
            return
        self._device = device
        layout = self.layer.layout
        self.topology = probe.probe_topology(self.layer.group, layout.world_size, layout.local_size, device)
        self.device_model = probe.device_model_for(device)
        # Links name the interconnect on GPUs; gloo over a shared CPU host measures noise (16x
        # apart between runs), so there the layout alone keys the cache.
        links = (self.topology.fingerprint_bucket() if device.type == "cuda"
                 else f"W{layout.world_size}|L{layout.local_size}")
        fp = hardware_fingerprint(device=probe.device_name(device), world_size=layout.world_size,
                                  local_size=layout.local_size, links=links,
                                  torch_version=torch.__version__, cuda_version=torch.version.cuda)
        if self.options.use_cache:
            self._cache = PlanCache(self.options.cache_path)
            fp = nearest_fingerprint(fp, [entry.fingerprint for entry in self._cache.entries().values()])
        self._fingerprint = fingerprint_key(fp)
        self._fingerprint_dict = fp

    def signature(self, top_k: int, capacity_factor: float, dtype: torch.dtype, training: bool) -> LayerSignature:
        key = (top_k, capacity_factor, dtype, training)
        sig = self._signatures.get(key)
        if sig is None:
            cfg = self.layer.config
            expert_type = cfg.experts.kind
            hidden = cfg.experts.hidden_size if expert_type != "custom" else cfg.model_dim
            sig = LayerSignature(model_dim=cfg.model_dim, hidden=hidden, num_experts=cfg.num_experts, top_k=top_k,
                                 dtype=DTYPE_NAMES.get(dtype, "float32"), expert_type=expert_type,
                                 training=training, capacity_factor=capacity_factor)
            self._signatures[key] = sig
        return sig

    # -- per call ----------------------------------------------------------------------------
    def plan_for(self, tokens: int, sig: LayerSignature, device: torch.device) -> tuple[Plan, CallTimer | None]:
        """The plan this call runs, and a timer when the call is a timed warmup trial."""
        self._ensure_hardware(device)
        key = f"{self._fingerprint}#{sig.key()}#T{token_bucket(tokens)}"
        plan = self.chosen.get(key)
        if plan is not None:
            return plan, None
        tuning = self.tuning.get(key)
        if tuning is None:
            plan = self._start(key, tokens, sig)
            if plan is not None:
                return plan, None
            tuning = self.tuning[key]
        return self._tuning_step(key, tuning, device)

    def _start(self, key: str, tokens: int, sig: LayerSignature) -> Plan | None:
        """Cache hit or model-only choice returns a plan; otherwise tuning starts (None)."""
        entry = self._cache.get_by_key(key) if self._cache is not None else None
        if entry is not None and (entry.source == "measured" or not self.options.tune):
            log.info("plan cache hit for %s: %s (%s)", key, entry.plan.label(), entry.source)
            self.chosen[key] = entry.plan
            return entry.plan
        ranked = self._rank(tokens, sig)
        feasible = [c for c in ranked if c.feasible]
        if not feasible:
            raise RuntimeError("the planner found no feasible plan: " +
                               "; ".join(sorted({r for c in ranked for r in c.rejected})))
        if not self.options.tune or len(feasible) == 1:
            self._lock(key, sig, tokens, feasible[0], None, ranked)
            return feasible[0].plan
        self.tuning[key] = _Tuning(feasible[: self.options.candidates], tokens, sig, ranked)
        return None

    def _rank(self, tokens: int, sig: LayerSignature):
        kernels = ("bmm",) if sig.capacity_factor > 0 else ("grouped",)
        algos = ("flat", "2d") if self.topology.num_nodes > 1 else ("flat",)
        degrees = (1,) if self.layer.layout.world_size == 1 else (1, 2, 4)
        return rank_plans(sig, tokens, self.topology, self.calibrated(sig), overlap_degrees=degrees, algos=algos,
                          kernels=kernels)

    def calibrated(self, sig: LayerSignature) -> DeviceModel:
        """The device model plus this layer's shortest possible call, measured once per mode
        (forward, or forward + backward) on a tiny call; the cost model takes the longer of that
        host-bound time and the device work it predicts. With more than one rank, also what one
        more overlap chunk adds (a tiny call at d=2 against d=1)."""
        if sig.training not in self._calibrated_modes:
            self._calibrated_modes.add(sig.training)
            prefix = "train_" if sig.training else ""
            tokens = max(self.layer.config.num_experts, 8)
            overhead_us = measure_call_ms(self.layer, tokens, sig, self._device) * 1e3
            measured = {f"{prefix}call_overhead_us": overhead_us}
            chunk_us = self._chunk_overhead_us(sig)
            if chunk_us is not None:
                measured[f"{prefix}chunk_overhead_us"] = chunk_us
            self.device_model = dataclasses.replace(self.device_model, **measured)
            log.info("shortest call (%s): %.0f us; each extra overlap chunk: %s", "train" if sig.training
                     else "forward", overhead_us, "n/a" if chunk_us is None else f"{chunk_us:.0f} us")
        return self.device_model

    def _chunk_overhead_us(self, sig: LayerSignature) -> float | None:
        """Extra time of a tiny call at overlap degree 2 over degree 1 (expert parallel, flat);
        None in one process or where that plan cannot run on a tiny call."""
        if self.layer.layout.world_size == 1:
            return None
        tokens = 4 * max(self.layer.config.num_experts, 8)     # >= 2 capacity slots per expert
        kernel = "bmm" if sig.capacity_factor > 0 else "grouped"
        if structural_reasons(Plan(adaptive_r=1, overlap_degree=2, expert_kernel=kernel), sig, tokens, self.topology):
            return None
        times = [measure_call_ms(self.layer, tokens, sig, self._device, adaptive_r=1, a2a_ffn_overlap_degree=d,
                                 a2a_algo="flat") for d in (1, 2)]
        return max(times[1] - times[0], 0.0) * 1e3

    def _tuning_step(self, key: str, tuning: _Tuning, device: torch.device) -> tuple[Plan, CallTimer | None]:
        index, timed = tuning.current(self.options.trials)
        tuning.calls += 1
        self.tuning_calls += 1
        timer = CallTimer(device) if timed else None
        if timer is not None:
            self.pending.append((key, timer, index))
        return tuning.candidates[index].plan, timer

    def after_call(self) -> None:
        """Collects finished timings; decides once every candidate has its trials."""
        still = []
        for key, timer, index in self.pending:
            if timer.forward_ms is None or (timer.backward_ms is None and getattr(timer, "_b0", None) is not None):
                still.append((key, timer, index))
                continue
            self.tuning[key].times_ms[index].append(timer.total_ms())
        self.pending = still
        for key, tuning in list(self.tuning.items()):
            if all(len(t) >= self.options.trials for t in tuning.times_ms):
                self._decide(key, tuning)

    def _decide(self, key: str, tuning: _Tuning) -> None:
        medians = torch.tensor([sorted(t)[len(t) // 2] for t in tuning.times_ms], dtype=torch.float64)
        # The slowest rank bounds the step; reducing with MAX makes every rank pick the same plan.
        medians = max_over_ranks(medians, self.layer)
        best = int(torch.argmin(medians))
        del self.tuning[key]
        self._lock(key, tuning.signature, tuning.tokens, tuning.candidates[best], float(medians[best]), tuning.ranked,
                   measured={c.plan.label(): float(m) for c, m in zip(tuning.candidates, medians)})

    def _lock(self, key, sig, tokens, candidate, measured_ms, ranked, measured=None) -> None:
        self.chosen[key] = candidate.plan
        log.info("%s", explain(candidate, measured_ms, ranked, measured))
        if self._cache is not None and self.layer.layout.rank == 0:
            self._cache.put(self._fingerprint_dict, sig, tokens, candidate.plan, candidate.predicted_ms,
                            measured_ms=measured_ms, source="measured" if measured_ms is not None else "model")


def measure_call_ms(layer, tokens: int, sig: LayerSignature, device: torch.device, reps: int = 21,
                    **knobs) -> float:
    """Lower quartile of ``reps`` timings (ms) of one tiny call of ``layer`` with its default knobs,
    or ``knobs`` (forward, plus backward when training), the slowest rank's. Host noise only adds
    time: medians of 5-9 calls of identical layers spread 24-40% within one H100 run.
    Leaves no trace: gradients are returned, not accumulated, and the layer's last-call
    attributes are restored."""
    saved = (layer.l_aux, layer.losses, layer.last_routing)
    dtype = next(layer.parameters()).dtype
    x = torch.randn(tokens, layer.config.model_dim, device=device, dtype=dtype, requires_grad=sig.training)
    params = [p for p in layer.parameters() if p.requires_grad]

    def call():
        with torch.set_grad_enabled(sig.training):
            y = layer(x, plan="fixed", top_k=sig.top_k, capacity_factor=sig.capacity_factor, **knobs)
            if sig.training:
                torch.autograd.grad(y.float().sum(), [x, *params], allow_unused=True)

    clock, samples = CallTimer(device), []
    for _ in range(reps + 3):    # 3 untimed: the first calls after a large one run slow
        start = clock.mark()
        call()
        samples.append(clock.elapsed_ms(start, clock.mark()))
    layer.l_aux, layer.losses, layer.last_routing = saved
    return float(max_over_ranks(torch.tensor([sorted(samples[3:])[reps // 4]], dtype=torch.float64), layer))


def max_over_ranks(values: torch.Tensor, layer) -> torch.Tensor:
    """Element-wise MAX of a small CPU tensor over the layer's group (itself with one rank)."""
    if layer.layout.world_size == 1:
        return values
    on_device = values.to("cuda" if dist.get_backend(layer.group) == "nccl" else "cpu")
    dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=layer.group)
    return on_device.cpu()


def explain(chosen, measured_ms, ranked, measured=None, runners_up: int = 3) -> str:
    """One log paragraph: the plan, its predicted/measured time, and why the next ones lost."""
    lines = [f"plan {chosen.plan.label()}: predicted {chosen.predicted_ms:.3f} ms"
             + (f", measured {measured_ms:.3f} ms" if measured_ms is not None else " (not measured)")]
    others = [c for c in ranked if c.feasible and c.plan != chosen.plan][:runners_up]
    for c in others:
        why = f"measured {measured[c.plan.label()]:.3f} ms" if measured and c.plan.label() in measured else \
            f"predicted {c.predicted_ms:.3f} ms"
        lines.append(f"  lost: {c.plan.label()} ({why})")
    for c in [c for c in ranked if not c.feasible][:runners_up]:
        lines.append(f"  rejected: {c.plan.label()}: {'; '.join(c.rejected)}")
    return "\n".join(lines)
