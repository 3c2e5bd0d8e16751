"""Save a layer's expert shards per rank and load them at any world size or layout, online.

Legend: E global experts, W ranks, e local experts, s ranks sharing one expert, H hidden,
O output dim. Files in ``directory``:
- ``experts.rank{r}-of{W}.pt``: rank r's stored expert parameters plus the layout that
  produced them (W, s, e, E, H, O, names);
- ``shared.pt`` (rank 0): the layer's other state (gates, buffers), replicated on every rank;
- ``manifest.pt`` (rank 0, written last): the world size of the save, so that shard files left
  by an earlier save at another world size in the same directory are ignored.
Loading rebuilds each global expert parameter [E, ...] from the shard files (whole experts are
concatenated in rank order; a sharded expert's hidden slices are concatenated and the padded
output-bias slices trimmed) and slices what this rank stores in its own layout: trained on 2
ranks and served on 1, 8 experts over 4 ranks read back on 2, sharded <-> whole experts.
Every file is written to a temporary name, fsynced and renamed (atomic). A mismatch of expert
count, hidden size, model or output dim, or parameter names raises with both values.
"""
from __future__ import annotations

import glob
import os
import re
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .grad_sync import is_expert_param

FORMAT = "adaptmoe.experts/1"
_SHARD = re.compile(r"experts\.rank(\d+)-of(\d+)\.pt$")

__all__ = ["save", "load", "save_experts", "load_experts", "full_expert_state", "atomic_save"]


def atomic_save(obj: Any, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _meta(layer) -> dict:
    ex, lay = layer.experts, layer.layout
    return {"format": FORMAT, "world_size": lay.world_size, "rank": lay.rank, "num_experts": lay.num_experts,
            "num_local_experts": lay.num_local_experts, "sharded_count": lay.sharded_count,
            "model_dim": getattr(ex, "model_dim", None), "hidden_size": getattr(ex, "hidden_size", None),
            "output_dim": getattr(ex, "output_dim", None)}


def _barrier(group: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def save_experts(layer, directory: str) -> str:
    """Write this rank's expert shard; returns the file name."""
    meta = _meta(layer)
    state = {name: p.detach().cpu().clone() for name, p in layer.experts.named_parameters()}
    path = os.path.join(directory, f"experts.rank{meta['rank']}-of{meta['world_size']}.pt")
    atomic_save({"meta": meta, "state": state}, path)
    return path


def _shard_files(directory: str) -> list[str]:
    files = glob.glob(os.path.join(directory, "experts.rank*-of*.pt"))
    manifest = os.path.join(directory, "manifest.pt")
    if os.path.exists(manifest):
        saved_world = torch.load(manifest, map_location="cpu", weights_only=True)["world_size"]
        files = [f for f in files if int(_SHARD.search(f).group(2)) == saved_world]
    worlds = {int(_SHARD.search(f).group(2)) for f in files}
    if not files:
        raise FileNotFoundError(f"no expert shard files (experts.rank<r>-of<W>.pt) in {directory!r}")
    if len(worlds) != 1:
        raise ValueError(f"{directory!r} mixes shard files of world sizes {sorted(worlds)}")
    (W,) = worlds
    by_rank = {int(_SHARD.search(f).group(1)): f for f in files}
    missing = [r for r in range(W) if r not in by_rank]
    if missing:
        raise FileNotFoundError(f"{directory!r} lacks the shards of ranks {missing} (of {W})")
    return [by_rank[r] for r in range(W)]


def full_expert_state(directory: str) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, {name: global tensor [E, ...]}) rebuilt from every rank's shard file."""
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in _shard_files(directory)]
    meta = shards[0]["meta"]
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown expert checkpoint format {meta.get('format')!r} (expected {FORMAT!r})")
    s, E, O = meta["sharded_count"], meta["num_experts"], meta["output_dim"]
    full = {}
    for name in shards[0]["state"]:
        parts = [sh["state"][name] for sh in shards]
        if s == 1:
            full[name] = torch.cat(parts, dim=0)                      # [W*e, ...] = [E, ...]
        else:                                                         # rank = expert * s + slice
            per_expert = [torch.cat(parts[x * s:(x + 1) * s], dim=1) for x in range(E)]
            tensor = torch.cat(per_expert, dim=0)
            if name == "batched_fc2_bias" and O is not None:
                tensor = tensor[:, :O]
            full[name] = tensor
    return meta, full


def _slice_for(tensor: Tensor, name: str, layout, output_dim: int | None) -> Tensor:
    s, rank = layout.sharded_count, layout.rank
    if s == 1:
        e = layout.num_local_experts
        return tensor[rank * e:(rank + 1) * e]
    ex, j = divmod(rank, s)
    if name == "batched_fc2_bias":
        width = -(-tensor.shape[1] // s)
        padded = tensor.new_zeros(tensor.shape[0], width * s)
        padded[:, :tensor.shape[1]] = tensor
        return padded[ex:ex + 1, j * width:(j + 1) * width]
    h = tensor.shape[1] // s
    return tensor[ex:ex + 1, j * h:(j + 1) * h]


def load_experts(layer, directory: str) -> None:
    """Fill ``layer``'s expert shard from a checkpoint of any world size / layout."""
    pieces = _expert_pieces(layer, directory)
    with torch.no_grad():
        for p, piece in pieces:
            p.copy_(piece)


def _expert_pieces(layer, directory: str) -> list[tuple[Tensor, Tensor]]:
    """(parameter, the checkpoint slice it receives) for every expert parameter; raises on any
    mismatch before anything is copied."""
    meta, full = full_expert_state(directory)
    mine = _meta(layer)
    for key in ("num_experts", "model_dim", "hidden_size", "output_dim"):
        if meta.get(key) != mine.get(key):
            raise ValueError(f"checkpoint in {directory!r} has {key}={meta.get(key)}, this layer has "
                             f"{key}={mine.get(key)}")
    params = dict(layer.experts.named_parameters())
    if set(full) != set(params):
        raise ValueError(f"checkpoint expert parameters {sorted(full)} differ from the layer's {sorted(params)}")
    pieces = []
    for name, p in params.items():
        piece = _slice_for(full[name], name, layer.layout, mine["output_dim"])
        if piece.shape != p.shape:
            raise ValueError(f"{name}: checkpoint slice {tuple(piece.shape)} does not fit the stored "
                             f"{tuple(p.shape)}")
        pieces.append((p, piece))
    return pieces


def save(layer: nn.Module, directory: str, group: Any = "layer") -> None:
    """Expert shards (every rank) + the replicated rest (rank 0), then a barrier over the layer's
    group so that the checkpoint is complete when this returns on any rank."""
    group = layer.group if group == "layer" else group
    save_experts(layer, directory)
    if layer.layout.rank == 0:
        shared = {k: v.detach().cpu().clone() for k, v in layer.state_dict().items()
                  if not k.startswith("experts.")}
        atomic_save(shared, os.path.join(directory, "shared.pt"))
    if layer.layout.world_size > 1:
        _barrier(group)     # every shard is on disk before the manifest names this save
    if layer.layout.rank == 0:
        atomic_save({"format": FORMAT, "world_size": layer.layout.world_size}, os.path.join(directory, "manifest.pt"))
    if layer.layout.world_size > 1:
        _barrier(group)


def load(layer: nn.Module, directory: str) -> None:
    """Load what ``save`` wrote, at this layer's world size and layout (any may differ)."""
    shared = torch.load(os.path.join(directory, "shared.pt"), map_location="cpu", weights_only=True)
    expected = {k for k in layer.state_dict() if not k.startswith("experts.")}
    if set(shared) != expected:
        raise ValueError(f"shared state keys {sorted(shared)} differ from the layer's {sorted(expected)}")
    if int(shared["_num_global_experts"]) != layer.config.num_experts:
        raise ValueError(f"checkpoint holds {int(shared['_num_global_experts'])} global experts, this layer has "
                         f"{layer.config.num_experts}")
    # Validate everything (expert shards included) before the first copy: a load that raises
    # leaves the layer as it was.
    pieces = _expert_pieces(layer, directory)
    state = {k: v for k, v in layer.state_dict().items() if k in shared}
    for k, v in state.items():
        if shared[k].shape != v.shape:
            raise ValueError(f"shared state {k!r}: checkpoint shape {tuple(shared[k].shape)}, this layer has "
                             f"{tuple(v.shape)}")
    with torch.no_grad():
        for k, v in state.items():
            v.copy_(shared[k])
        for p, piece in pieces:
            p.copy_(piece)


def expert_state_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if is_expert_param(p)]
