"""MoELayer: builds gate(s) and experts from typed configs and runs one call per forward.

Legend: T tokens on this rank, D model dim, E global experts, e local experts, K top-k,
W ranks in the expert-parallel group, s ranks sharing one expert (W/E when E < W).

Every knob of ``forward`` is per call: ``None`` means the layer's default, any other value
(0 included) is used as given, and nothing a call passes sticks to the layer. All knobs are
validated before anything runs, so a bad call changes no state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import executor, native_forward
from .config import A2A_ALGOS, PLAN_MODES, MoEConfig, check_capacity_factor
from .experts import _param, build_experts
from .gates import add_noise, build_gate, select_experts
from .losses import compute_losses
from .planning import LayerPlanner, PlanningOptions
from .routing import Routing, build_routing, confidence_rank, fusable_gate, fused_routing
from .topology import GroupLayout, layout_for_group

# Distinct knob tuples remembered per layer (a handful in practice; the bound keeps a caller that
# varies a float knob per call from growing the memo without end).
_MAX_RESOLVED_CALLS = 256


class MoELayer(nn.Module):
    def __init__(self, config: MoEConfig, *, group: Any = None, scan_expert_func: Callable | None = None,
                 result_func: Callable | None = None, seeds: tuple | None = None,
                 planning: PlanningOptions | None = None):
        super().__init__()
        config.validate()
        self.planning_options = planning or PlanningOptions()
        self._planner: LayerPlanner | None = None
        self.config = config
        self.group = group
        self.layout: GroupLayout = layout_for_group(group, config.num_experts)
        self._check_adaptive_r(config.adaptive_r)
        self.result_func = result_func
        seeds = tuple(seeds or ())
        self.gates = nn.ModuleList()
        for index, gate_config in enumerate(config.gates):
            _seed(seeds, 0, offset=index)
            self.gates.append(build_gate(gate_config, config.model_dim, config.num_experts))
        _seed(seeds, 1)
        self.experts = build_experts(config.experts, config.model_dim, self.layout.num_local_experts,
                                     self.layout.sharded_count)
        _seed(seeds, 2)
        for param in self.experts.parameters():
            param._adaptmoe_expert = True   # gradient helpers sync these over the expert-DP group
            param._tutel_expert = True      # what Tutel-era training scripts look for
        if scan_expert_func is not None:
            for name, param in self.experts.named_parameters():
                scan_expert_func(name, param)
        # Saved in the state dict like Tutel's, so checkpoints carry the global expert count.
        self.register_buffer("_num_global_experts", torch.tensor(config.num_experts))
        self.l_aux: Tensor | None = None
        self.losses: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    @property
    def num_global_experts(self) -> int:
        return self.config.num_experts

    @property
    def num_local_experts(self) -> int:
        return self.layout.num_local_experts

    @property
    def sharded_count(self) -> int:
        return self.layout.sharded_count

    @property
    def valid_adaptive_rs(self) -> list[int]:
        return self.layout.valid_rs

    def _check_adaptive_r(self, r: Any) -> None:
        if isinstance(r, bool) or r not in self.layout.valid_rs:
            raise ValueError(f"adaptive_r must be one of {self.layout.valid_rs} for {self.config.num_experts} experts "
                             f"over {self.layout.world_size} rank(s), got {r!r}")

    def resolve_knobs(self, *, gate_index: int = 0, top_k: int | None = None, capacity_factor: float | None = None,
                      adaptive_r: int | None = None, a2a_ffn_overlap_degree: int | None = None,
                      a2a_algo: str | None = None, megablocks_size: int | None = None) -> executor.CallKnobs:
        """Per-call knobs merged with the layer defaults; raises before any state changes."""
        cfg = self.config
        if isinstance(gate_index, bool) or not isinstance(gate_index, int) or not 0 <= gate_index < len(self.gates):
            raise ValueError(f"gate_index must be an integer in [0, {len(self.gates) - 1}], got {gate_index!r}")
        gate_cfg = cfg.gates[gate_index]
        k = gate_cfg.top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.num_experts:
            raise ValueError(f"top_k must be an integer in [1, {cfg.num_experts}] (num_experts), got {k!r}")
        cf = check_capacity_factor(gate_cfg.capacity_factor if capacity_factor is None else capacity_factor)
        r = cfg.adaptive_r if adaptive_r is None else adaptive_r
        self._check_adaptive_r(r)
        d = cfg.overlap_degree if a2a_ffn_overlap_degree is None else a2a_ffn_overlap_degree
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"a2a_ffn_overlap_degree must be an integer >= 1, got {d!r}")
        algo = cfg.a2a_algo if a2a_algo is None else a2a_algo
        if algo not in A2A_ALGOS:
            raise ValueError(f"a2a_algo must be one of {list(A2A_ALGOS)}, got {algo!r}")
        mb = cfg.megablocks_size if megablocks_size is None else megablocks_size
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
            raise ValueError(f"megablocks_size must be an integer >= 0, got {mb!r}")
        return executor.CallKnobs(gate_index, k, cf, r, d, algo)

    def forward(self, x: Tensor, *, gate_index: int = 0, capacity_factor: float | None = None,
                top_k: int | None = None, adaptive_r: int | None = None, a2a_ffn_overlap_degree: int | None = None,
                a2a_algo: str | None = None, megablocks_size: int | None = None, reserve_dims: int = 1,
                inequivalent_tokens: bool = False, plan: str | None = None) -> Any:
        args = (gate_index, top_k, capacity_factor, adaptive_r, a2a_ffn_overlap_degree, a2a_algo, megablocks_size, plan,
                reserve_dims, inequivalent_tokens)
        key = self._memo_key(args)
        repeat = self._memo_get("_repeat_calls", key)
        if repeat is not None:   # a native call with these knob arguments ran before: the short way
            result = native_forward.repeat(self, repeat, x)
            if result is not None:
                return self._finish(x, x, (x.shape[0],), reserve_dims, repeat.knobs, *result, None)
        knobs, mode = self._resolved_call(key, *args[:8])
        x_TD, lead_shape = self._tokens_of(x, reserve_dims)
        timer = None
        if mode == "auto":
            explicit = {"adaptive_r": adaptive_r, "overlap_degree": a2a_ffn_overlap_degree, "a2a_algo": a2a_algo}
            knobs, timer = self._planned_knobs(knobs, x_TD, explicit)
            if timer is not None:
                timer.start()
        native_plan = native_forward.plan_for(self, x_TD, knobs)
        if native_plan is not None:   # inference on one GPU: the whole chain from one native call
            result = native_forward.run(self, x_TD, knobs, native_plan)
            if key is not None and mode != "auto" and x_TD is x:
                self._memo_put("_repeat_calls", key, native_forward.RepeatCall(self, x_TD, knobs, native_plan))
        else:
            routing, loss_inputs = self._route(x_TD, knobs)
            result = (self._run(x_TD, routing, knobs), routing, loss_inputs, None)
        return self._finish(x, x_TD, lead_shape, reserve_dims, knobs, *result, timer)

    def _finish(self, x: Tensor, x_TD: Tensor, lead_shape: tuple, reserve_dims: int, knobs: executor.CallKnobs,
                y_TO: Tensor, routing: Routing, loss_inputs: tuple | None, losses: dict | None, timer) -> Any:
        """The call's output from the experts' y_TO: losses (unless the native call computed them),
        the input's leading shape and dtype restored, l_aux and last_routing kept."""
        # Losses are enqueued after the experts: their small kernels then run under the expert
        # GEMMs instead of delaying the dispatch (fine64 forward on an H100: dispatch 0.28 ms earlier).
        if losses is None:
            losses = self._losses(knobs, routing, loss_inputs)
        if timer is not None:
            timer.stop_forward(x_TD, y_TO)
        if x_TD is x and y_TO.shape == x.shape and y_TO.dtype == x.dtype:
            y = y_TO   # nothing to restore (two dispatcher calls less per call)
        else:
            y = y_TO.reshape(*lead_shape, *self._output_tail(y_TO, x, reserve_dims)).to(x.dtype)
        if len(losses) == 1:   # the common case: no Python sum (one add kernel less per call)
            l_aux = next(iter(losses.values()))
        else:
            l_aux = sum(losses.values()) if losses else x_TD.new_zeros((), dtype=torch.float32)
        if torch.compiler.is_compiling():   # dynamo (torch 2.11) cannot trace the __dict__ update below
            self.l_aux, self.losses, self.last_routing = l_aux, losses, routing
        else:
            # Plain attributes: nn.Module.__setattr__'s parameter/buffer/module checks cost ~10 us
            # each per call on the host, and these names are never parameters, buffers or modules.
            self.__dict__.update(l_aux=l_aux, losses=losses, last_routing=routing)
        y.l_aux = l_aux
        return self.result_func(y) if self.result_func is not None else y

    def _memo_key(self, args: tuple) -> tuple | None:
        """The key of forward's per-layer memos (``_resolved_calls``, ``_repeat_calls``) for these
        knob arguments: the arguments and their types, so ``True`` never passes as a memoised ``1``.
        None while dynamo traces (it folds the checks into guards; it cannot trace a memo) and for
        an unhashable argument (never remembered: the checks name it)."""
        if torch.compiler.is_compiling():
            return None
        key = args + tuple(map(type, args))
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _memo_get(self, memo: str, key: tuple | None) -> Any:
        return None if key is None else self.__dict__.get(memo, {}).get(key)

    def _memo_put(self, memo: str, key: tuple, value: Any) -> None:
        entries = self.__dict__.setdefault(memo, {})
        if len(entries) >= _MAX_RESOLVED_CALLS:   # e.g. a server passing a new capacity factor per call
            entries.clear()
        entries[key] = value

    def _resolved_call(self, key: tuple | None, *args) -> tuple[executor.CallKnobs, str]:
        """(knobs, plan mode) of a call's knob arguments (``forward``'s order), memoised under
        ``key`` (``_memo_key``): the checks cost ~15 us of host time at the start of a call on an
        idle GPU (H100 machine), time the GPU waits. The config is frozen, so a resolution stays
        valid; only calls that passed every check are remembered."""
        hit = self._memo_get("_resolved_calls", key)
        if hit is not None:
            return hit
        gate_index, top_k, capacity_factor, adaptive_r, overlap, a2a_algo, megablocks_size, plan = args
        knobs = self.resolve_knobs(gate_index=gate_index, top_k=top_k, capacity_factor=capacity_factor,
                                   adaptive_r=adaptive_r, a2a_ffn_overlap_degree=overlap, a2a_algo=a2a_algo,
                                   megablocks_size=megablocks_size)
        mode = self.config.plan if plan is None else plan
        if mode not in PLAN_MODES:
            raise ValueError(f"plan must be one of {list(PLAN_MODES)}, got {plan!r}")
        if key is not None:
            self._memo_put("_resolved_calls", key, (knobs, mode))
        return knobs, mode

    def _tokens_of(self, x: Any, reserve_dims: Any) -> tuple[Tensor, tuple[int, ...]]:
        """``flatten_input`` with a shortcut for the common call (a plain 2-D tensor of
        (tokens, model_dim) already in the compute dtype): a few attribute reads instead of
        the general checks (~5 us less host time in front of the first kernel). Whatever the
        shortcut returns, flatten_input would return the same tensor."""
        if (type(x) is Tensor and reserve_dims == 1 and type(reserve_dims) is int and x.dim() == 2
                and x.shape[1] == self.config.model_dim and x.is_floating_point()
                and x.dtype is _compute_dtype(x, self._modules["experts"])):
            return x, (x.shape[0],)
        return self.flatten_input(x, reserve_dims)

    def forget_last_call(self) -> None:
        """Drops ``l_aux``, ``losses`` and ``last_routing`` of the last call.

        They keep that call's autograd graph alive (Tutel's API reads ``layer.l_aux`` after the
        forward), and with it AccumulateGrad nodes bound to the stream the call ran on. Capturing a
        training step in a CUDA graph (``torch.cuda.make_graphed_callables``) after eager steps on
        the default stream fails while they live (cudaErrorStreamCaptureImplicit); call this first.
        It also frees that graph early when nothing else needs it."""
        self.l_aux, self.losses, self.last_routing = None, {}, None

    def native_forward_blocker(self, x: Tensor, reserve_dims: int = 1, **knobs) -> str | None:
        """Why a forward of ``x`` with these knobs would not run as one native call (see
        ``adaptmoe.native_forward``), or None when it would. Reads the grad mode of the caller."""
        x_TD, _ = self.flatten_input(x, reserve_dims)
        return native_forward.native_forward_blocker(self, x_TD, self.resolve_knobs(**knobs))

    @property
    def planner(self) -> LayerPlanner:
        if self._planner is None:
            self._planner = LayerPlanner(self, self.planning_options)
        return self._planner

    def _planned_knobs(self, knobs: executor.CallKnobs, x_TD: Tensor, explicit: dict):
        """The planner fills the knobs the caller left as None; explicit knobs always win."""
        planner = self.planner
        planner.after_call()
        sig = planner.signature(knobs.top_k, knobs.capacity_factor, x_TD.dtype, self.training and torch.is_grad_enabled())
        chosen, timer = planner.plan_for(x_TD.shape[0], sig, x_TD.device)
        merged = {name: getattr(chosen, name) if explicit[name] is None else getattr(knobs, name)
                  for name in explicit}
        return dataclasses.replace(knobs, expert_kernel=chosen.expert_kernel, **merged), timer

    def flatten_input(self, x: Tensor, reserve_dims: int = 1) -> tuple[Tensor, tuple[int, ...]]:
        """Validated tokens ``x_TD`` in the compute dtype, and the leading dims to restore."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = type(x).__name__ if not isinstance(x, Tensor) else x.dtype
            raise TypeError(f"input must be a floating-point tensor (float32, float64, bfloat16, float16), got {got}")
        if isinstance(reserve_dims, bool) or not isinstance(reserve_dims, int) or not 1 <= reserve_dims <= x.dim():
            raise ValueError(f"reserve_dims must be an integer in [1, {x.dim()}] (input dims), got {reserve_dims!r}")
        token_dim = math.prod(x.shape[x.dim() - reserve_dims:])
        if token_dim != self.config.model_dim:
            raise ValueError(f"input's last {reserve_dims} dim(s) {tuple(x.shape[x.dim() - reserve_dims:])} must hold "
                             f"model_dim={self.config.model_dim} values, got {token_dim}")
        x_TD = x if x.dim() == 2 and reserve_dims == 1 else x.reshape(-1, token_dim)
        compute_dtype = _compute_dtype(x, self.experts)
        if x_TD.dtype != compute_dtype:
            x_TD = x_TD.to(compute_dtype)
        return x_TD, tuple(x.shape[: x.dim() - reserve_dims])

    def _output_tail(self, y_TO: Tensor, x: Tensor, reserve_dims: int) -> tuple[int, ...]:
        if y_TO.shape[1] == self.config.model_dim:
            return tuple(x.shape[x.dim() - reserve_dims:])
        return (y_TO.shape[1],)

    def _route(self, x_TD: Tensor, knobs: executor.CallKnobs) -> tuple[Routing, tuple[Tensor, Tensor, Tensor]]:
        """Routing of the call, and (clean logits, noisy logits, scores) for `_losses`."""
        gate_cfg = self.config.gates[knobs.gate_index]
        # Routing decides discrete choices: keep it out of autocast so bf16 rounding cannot flip them.
        with _autocast_off(x_TD.device.type):
            logits_TE = self.gates[knobs.gate_index](x_TD)
            noisy_TE = add_noise(logits_TE, gate_cfg.noise_std, self.training)
            if fusable_gate(gate_cfg, self.training):
                routing, probs_TE = fused_routing(noisy_TE, gate_cfg, knobs.top_k, knobs.capacity_factor)
            else:
                indices_TK, weights_TK, probs_TE = select_experts(noisy_TE, gate_cfg, knobs.top_k, self.training)
                priority_T = confidence_rank(probs_TE.detach()) if gate_cfg.batch_prioritized else None
                routing = build_routing(indices_TK, weights_TK, self.config.num_experts, knobs.capacity_factor,
                                        priority_T)
        return routing, (logits_TE, noisy_TE, probs_TE)

    def _losses(self, knobs: executor.CallKnobs, routing: Routing,
                loss_inputs: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        gate_cfg = self.config.gates[knobs.gate_index]
        logits_TE, noisy_TE, probs_TE = loss_inputs
        with _autocast_off(logits_TE.device.type):
            return compute_losses(gate_cfg.losses, clean_logits_TE=logits_TE, noisy_logits_TE=noisy_TE,
                                  scores_TE=probs_TE, indices_TK=routing.indices_TK, noise_std=gate_cfg.noise_std)

    def _run(self, x_TD: Tensor, routing: Routing, knobs: executor.CallKnobs) -> Tensor:
        if self.layout.world_size == 1:
            return executor.run_local(x_TD, routing, self.experts, num_experts=self.config.num_experts,
                                      is_postscore=self.config.is_postscore)
        from . import parallel  # imported lazily: single-process users never need torch.distributed
        return parallel.run_parallel(x_TD, routing, self.experts, knobs, self.layout,
                                     is_postscore=self.config.is_postscore, group=self.group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_num_global_experts"
        if key not in state_dict:
            warnings.warn(f"checkpoint has no {key!r} (an old format); assuming {self.config.num_experts} experts")
            state_dict[key] = self._num_global_experts.clone()
        elif int(state_dict[key]) != self.config.num_experts:
            error_msgs.append(f"checkpoint holds {int(state_dict[key])} global experts, this layer has "
                              f"{self.config.num_experts}; use adaptmoe.checkpoint to re-shard across layouts")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        gates = ", ".join(f"{g.kind} k={g.top_k} noise={g.noise_std}" for g in self.config.gates)
        return (f"gates=[{gates}], experts={self.config.num_experts} over {self.layout.world_size} rank(s), "
                f"local={self.layout.num_local_experts}, shards={self.layout.sharded_count}")


def _seed(seeds: tuple, index: int, offset: int = 0) -> None:
    if len(seeds) > index and seeds[index] is not None:
        torch.manual_seed(int(seeds[index]) + offset)


def _autocast_off(device_type: str):
    """Autocast disabled for a block; a no-op context (no host cost) when it is not enabled."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(x: Tensor, experts: nn.Module) -> torch.dtype:
    """Autocast's dtype when active, else the experts' parameter dtype (Tutel's rule), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    param = _param(experts, "batched_fc1_w", None)   # built-in experts: no parameter walk per call
    if param is None:
        param = next(experts.parameters(), None)
    return param.dtype if param is not None else x.dtype
