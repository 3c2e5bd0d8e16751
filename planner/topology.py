"""Ranks, links and what a collective costs on them (alpha-beta per link class and collective).

The graph has one vertex per rank, one per node switch and one for the inter-node fabric; a rank
links only to its node's switch ('intra' edges) and switches link only to the fabric ('inter'
edges). That is O(W) edges, so a 2048-GPU what-if builds in milliseconds, and the path between
two ranks says which link class bounds their traffic ('self', 'intra' or 'inter').

Cost conventions (NCCL's "bus bandwidth"): `bytes_per_rank` is each rank's send buffer for
all_to_all, its gathered output for all_gather and its input for reduce_scatter. A collective over
n ranks costs launch + peers * alpha + bytes_per_rank * (n - 1) / n / bandwidth, per link class,
where 'self' holds the per-collective launch latency. Flat all-to-all moves its intra- and
inter-node shares at once (the slower one bounds it); rings step at the pace of their slowest hop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Union

import networkx as nx

COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter")
LINK_CLASSES = ("self", "intra", "inter")
GROUPS = ("world", "intra", "inter")
DEFAULT_LAUNCH_US = 20.0       # NCCL launch + sync at 2 ranks (anchor: 1 MiB a2a ~28 us on NVLink)
Group = Union[str, int]        # a named group, or n contiguous (node-major) ranks


@dataclass(frozen=True)
class LinkCost:
    alpha_s: float          # seconds per peer step ('self': per collective launch)
    bandwidth_Bps: float    # bytes per second (bus bandwidth convention)


def uniform_links(alpha_s: float, bandwidth_Bps: float) -> dict[str, LinkCost]:
    return {c: LinkCost(alpha_s, bandwidth_Bps) for c in COLLECTIVES}


def _build_graph(world_size: int, local_size: int) -> nx.Graph:
    num_nodes = world_size // local_size
    graph = nx.Graph()
    graph.add_nodes_from((r, {"kind": "gpu", "node": r // local_size}) for r in range(world_size))
    graph.add_nodes_from((("switch", n), {"kind": "switch", "node": n}) for n in range(num_nodes))
    graph.add_edges_from((r, ("switch", r // local_size), {"link_class": "intra"})
                         for r in range(world_size))
    if num_nodes > 1:
        graph.add_node("fabric", kind="fabric", node=-1)
        graph.add_edges_from((("switch", n), "fabric", {"link_class": "inter"})
                             for n in range(num_nodes))
    return graph


class Topology:
    """W ranks in N nodes of L GPUs (node-major rank order) with alpha-beta costs per link class."""

    def __init__(self, world_size: int, local_size: int,
                 links: dict[str, dict[str, LinkCost]],
                 measured: dict[tuple[str, str], tuple[float, float]] | None = None) -> None:
        if world_size < 1 or local_size < 1 or world_size % local_size:
            raise ValueError(f"world_size {world_size} must be a positive multiple of "
                             f"local_size {local_size}")
        self._world_size, self._local_size = world_size, local_size
        self._links = {cls: dict(links[cls]) for cls in LINK_CLASSES}
        # Direct fits (seconds = c0 + c1 * bytes) for groups the probe measured: a measured group
        # answers from its own fit rather than from the structural model.
        self._measured = dict(measured or {})
        self.graph = _build_graph(world_size, local_size)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def local_size(self) -> int:
        return self._local_size

    @property
    def num_nodes(self) -> int:
        return self._world_size // self._local_size

    def link(self, link_class: str, collective: str) -> LinkCost:
        return self._links[link_class][collective]

    @classmethod
    def from_cluster(cls, nodes: int, gpus_per_node: int, intra_bw_gbps: float,
                     inter_bw_gbps: float, intra_latency_us: float = 0.5,
                     inter_latency_us: float = 0.5, launch_latency_us: float = DEFAULT_LAUNCH_US,
                     self_bw_gbps: float = 1500.0) -> Topology:
        """What-if cluster. Bandwidths are per-GPU bus bandwidths in GB/s (1e9 bytes/s);
        latencies are per peer, in microseconds (NCCL overlaps peers across its channels,
        so the serial share per peer is well under one network round trip)."""
        for name, value in (("nodes", nodes), ("gpus_per_node", gpus_per_node)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("intra_bw_gbps", intra_bw_gbps), ("inter_bw_gbps", inter_bw_gbps)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 GB/s, got {value!r}")
        links = {"self": uniform_links(launch_latency_us * 1e-6, self_bw_gbps * 1e9),
                 "intra": uniform_links(intra_latency_us * 1e-6, intra_bw_gbps * 1e9),
                 "inter": uniform_links(inter_latency_us * 1e-6, inter_bw_gbps * 1e9)}
        return cls(nodes * gpus_per_node, gpus_per_node, links)

    @classmethod
    def from_measurements(cls, world_size: int, local_size: int,
                          samples: Iterable[dict]) -> Topology:
        """Fit alpha-beta from the runtime probe's samples: dicts with collective, group
        ('world'|'intra'|'inter'), bytes_per_rank and seconds. See topology_fit for details."""
        from planner.topology_fit import fit_links
        links, measured = fit_links(world_size, local_size, list(samples))
        return cls(world_size, local_size, links, measured)

    # -- groups -------------------------------------------------------------------------------
    def group_shape(self, group: Group) -> tuple[int, int]:
        """(ranks, nodes) spanned by a group name or by n contiguous ranks."""
        if group == "world":
            return self._world_size, self.num_nodes
        if group == "intra":
            return self._local_size, 1
        if group == "inter":
            return self.num_nodes, self.num_nodes
        if isinstance(group, int) and not isinstance(group, bool) and group >= 1:
            if group > self._world_size:
                raise ValueError(f"a group of {group} ranks exceeds the world size "
                                 f"{self._world_size}")
            if self._local_size % group == 0:
                return group, 1
            # Groups that do not tile a node straddle node boundaries: inter links bound them.
            return group, max(2, -(-group // self._local_size))
        raise ValueError(f"group must be one of {list(GROUPS)} or a rank count, got {group!r}")

    def link_class(self, rank_a: int, rank_b: int) -> str:
        """Class of the link that bounds traffic between two ranks."""
        if rank_a == rank_b:
            return "self"
        nodes = self.graph.nodes
        return "intra" if nodes[rank_a]["node"] == nodes[rank_b]["node"] else "inter"

    def route(self, rank_a: int, rank_b: int) -> list[str]:
        """Link classes along the graph path between two ranks (what `link_class` summarises)."""
        path = nx.shortest_path(self.graph, rank_a, rank_b)
        return [self.graph.edges[u, v]["link_class"] for u, v in zip(path, path[1:])]

    # -- costs --------------------------------------------------------------------------------
    def collective_time(self, collective: str, bytes_per_rank: float,
                        group: Group = "world") -> float:
        """Seconds for one collective of `bytes_per_rank` bytes on each rank of `group`."""
        if collective not in COLLECTIVES:
            raise ValueError(f"collective must be one of {list(COLLECTIVES)}, got {collective!r}")
        n_ranks, n_nodes = self.group_shape(group)
        if n_ranks <= 1:
            return 0.0
        fit = self._measured.get((collective, group)) if isinstance(group, str) else None
        if fit is not None:
            return fit[0] + fit[1] * bytes_per_rank
        return self._structural_time(collective, bytes_per_rank, n_ranks, n_nodes)

    def _structural_time(self, collective: str, bytes_per_rank: float, n_ranks: int,
                         n_nodes: int) -> float:
        per_node = n_ranks // n_nodes
        launch = self._links["self"][collective].alpha_s
        intra, inter = self._links["intra"][collective], self._links["inter"][collective]
        if collective == "all_to_all":
            # Every peer gets bytes/n; NVLink and the NICs carry their shares concurrently.
            intra_peers, inter_peers = per_node - 1, n_ranks - per_node
            t_intra = intra_peers * (intra.alpha_s + bytes_per_rank / n_ranks / intra.bandwidth_Bps)
            t_inter = inter_peers * (inter.alpha_s + bytes_per_rank / n_ranks / inter.bandwidth_Bps)
            return launch + max(t_intra, t_inter)
        # Ring all_gather / reduce_scatter: n-1 steps of bytes/n at the slowest hop's pace.
        hop = inter if n_nodes > 1 else intra
        return launch + (n_ranks - 1) * (hop.alpha_s + bytes_per_rank / n_ranks / hop.bandwidth_Bps)

    def fingerprint_bucket(self) -> str:
        """Link bandwidths bucketed to the power of two below them: stable under measurement
        jitter (bucket edges 17, 34, 69, 137, 275, 550 GB/s sit away from common link speeds)."""
        parts = [f"W{self._world_size}", f"L{self._local_size}"]
        for cls in ("intra", "inter"):
            if (cls == "intra" and self._local_size == 1) or (cls == "inter" and self.num_nodes == 1):
                continue
            for coll in COLLECTIVES:
                exp = math.floor(math.log2(max(self._links[cls][coll].bandwidth_Bps, 1.0)))
                parts.append(f"{cls}.{coll}=2^{exp}")
        return "|".join(parts)

    def describe(self) -> str:
        lines = [f"{self.num_nodes} node(s) x {self._local_size} GPU(s) = {self._world_size} ranks"]
        for cls in LINK_CLASSES:
            cost = self._links[cls]["all_to_all"]
            lines.append(f"  {cls:5s} all_to_all: alpha {cost.alpha_s * 1e6:.2f} us, "
                         f"bandwidth {cost.bandwidth_Bps / 1e9:.1f} GB/s")
        return "\n".join(lines)
