"""Fit link-class alpha-beta costs from the runtime probe's timing samples (numpy least squares).

A sample is {collective, group ('world'|'intra'|'inter'), bytes_per_rank, seconds}. Each
(collective, group) gets its own affine fit seconds = c0 + c1 * bytes, which answers queries for
that exact group; the fits are also turned into per-peer latency and bandwidth of the link class
the group exercises, so that groups the probe did not time (2D stages, weight-gather groups) get
a structural estimate. Fits are robust to a single size and to noise: both terms stay positive.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from planner.topology import COLLECTIVES, DEFAULT_LAUNCH_US, GROUPS, LinkCost, uniform_links

SELF_BW_BPS = 1500e9   # local copy share of an all-to-all; not probed (it never bounds a collective)


def fit_affine(bytes_per_rank, seconds) -> tuple[float, float]:
    """Least-squares seconds = c0 + c1 * bytes with relative-error weights, both kept positive."""
    b, t = np.asarray(bytes_per_rank, float), np.asarray(seconds, float)
    if len(np.unique(b)) < 2:
        # One size cannot separate latency from bandwidth: charge at most a launch to latency.
        t0, b0 = float(np.median(t)), float(np.max(b))
        if b0 <= 0:
            return t0, 1e-15
        c0 = min(t0 / 2, DEFAULT_LAUNCH_US * 1e-6)
        return c0, max((t0 - c0) / b0, 1e-15)
    w = 1.0 / np.maximum(t, 1e-12)     # relative error: small and large sizes count alike
    design = np.stack([np.ones_like(b), b], axis=1) * w[:, None]
    (c0, c1), *_ = np.linalg.lstsq(design, np.ones_like(b), rcond=None)
    if c1 <= 0:        # noise made bigger messages faster: keep the largest message's bandwidth
        c1 = float(t[np.argmax(b)] / np.max(b))
        c0 = max(float(np.min(t - c1 * b)), 0.0)
    if c0 < 0:         # negative latency: refit through the origin
        c0, c1 = 0.0, float(np.sum(w * w * b * t) / np.sum(w * w * b * b))
    return float(c0), float(max(c1, 1e-15))


def _validate(sample: dict) -> tuple[str, str, float, float]:
    try:
        coll, group = sample["collective"], sample["group"]
        nbytes, secs = float(sample["bytes_per_rank"]), float(sample["seconds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"a probe sample needs collective, group, bytes_per_rank and seconds; "
                         f"got {sample!r}") from exc
    if coll not in COLLECTIVES:
        raise ValueError(f"sample collective must be one of {list(COLLECTIVES)}, got {coll!r}")
    if group not in GROUPS:
        raise ValueError(f"sample group must be one of {list(GROUPS)}, got {group!r}")
    if nbytes < 0 or not secs > 0:
        raise ValueError(f"sample needs bytes_per_rank >= 0 and seconds > 0, got {sample!r}")
    return coll, group, nbytes, secs


def _group_ranks(group: str, world_size: int, local_size: int) -> tuple[int, int]:
    num_nodes = world_size // local_size
    return {"world": (world_size, num_nodes), "intra": (local_size, 1),
            "inter": (num_nodes, num_nodes)}[group]


def _source_group(link_class: str, world_size: int, local_size: int) -> list[str]:
    """Groups whose timings reveal a link class, best first."""
    multi_node = world_size > local_size
    if link_class == "intra":
        return ["intra"] + ([] if multi_node else ["world"])
    return ["inter"] + (["world"] if multi_node else [])


def _class_cost(coll: str, fit: tuple[float, float], n_ranks: int, n_nodes: int,
                link_class: str, launch_s: float) -> LinkCost:
    """Invert the structural model: c0 = launch + peers * alpha, c1 = fraction / bandwidth."""
    per_node = n_ranks // n_nodes
    if coll == "all_to_all":
        peers = per_node - 1 if link_class == "intra" else n_ranks - per_node
    else:
        peers = n_ranks - 1
    peers = max(peers, 1)
    fraction = peers / n_ranks
    return LinkCost(alpha_s=max(fit[0] - launch_s, 0.0) / peers, bandwidth_Bps=fraction / fit[1])


def _class_links(link_class: str, fits: dict, world_size: int, local_size: int,
                 launch_s: float) -> dict[str, LinkCost] | None:
    costs: dict[str, LinkCost] = {}
    for coll in COLLECTIVES:
        for group in _source_group(link_class, world_size, local_size):
            n_ranks, n_nodes = _group_ranks(group, world_size, local_size)
            if (coll, group) in fits and n_ranks > 1:
                costs[coll] = _class_cost(coll, fits[(coll, group)], n_ranks, n_nodes,
                                          link_class, launch_s)
                break
    if not costs:
        return None
    # A collective the probe skipped borrows a measured one on the same links.
    fallback = costs.get("all_to_all") or next(iter(costs.values()))
    return {coll: costs.get(coll, fallback) for coll in COLLECTIVES}


def _default_links(link_class: str, needed: bool) -> dict[str, LinkCost]:
    if needed:
        warnings.warn(f"the probe measured nothing on the {link_class!r} links; using a default "
                      f"(300 GB/s intra-node, 25 GB/s inter-node): plans may be off", stacklevel=4)
    return uniform_links(1e-6, 300e9) if link_class == "intra" else uniform_links(2e-6, 25e9)


def fit_links(world_size: int, local_size: int, samples: list[dict]
              ) -> tuple[dict[str, dict[str, LinkCost]], dict[tuple[str, str], tuple[float, float]]]:
    """Per-class link costs and per-(collective, group) affine fits from probe samples."""
    if world_size < 1 or local_size < 1 or world_size % local_size:
        raise ValueError(f"world_size {world_size} must be a positive multiple of "
                         f"local_size {local_size}")
    grouped: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for sample in samples:
        coll, group, nbytes, secs = _validate(sample)
        grouped[(coll, group)].append((nbytes, secs))
    fits = {key: fit_affine([b for b, _ in rows], [t for _, t in rows])
            for key, rows in grouped.items()}
    # Launch latency is shared by every group; the smallest intercept bounds it.
    launch_s = DEFAULT_LAUNCH_US * 1e-6
    if fits:
        launch_s = min(launch_s, 0.5 * min(c0 for c0, _ in fits.values()))
    links = {"self": uniform_links(launch_s, SELF_BW_BPS)}
    for link_class in ("intra", "inter"):
        needed = local_size > 1 if link_class == "intra" else world_size > local_size
        links[link_class] = (_class_links(link_class, fits, world_size, local_size, launch_s)
                             or _default_links(link_class, needed))
    return links, fits
