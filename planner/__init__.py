"""adaptmoe planner: picks how an MoE layer call runs (adaptive_r, overlap degree, all-to-all
algorithm, expert kernel) from a cost model of the hardware, and remembers the answer.

Torch-free (numpy, networkx, msgpack): the runtime passes plain data in and gets plain data back.
"""
from planner.cache import (SCHEMA_VERSION, CacheEntry, PlanCache, default_cache_path, nearest_fingerprint,
                           token_bucket)
from planner.cost import estimate, feasibility
from planner.device import PRESETS, DeviceModel
from planner.plan import Candidate, LayerSignature, Plan
from planner.search import NoFeasiblePlan, best_plan, rank_plans
from planner.shapes import valid_adaptive_rs
from planner.topology import LinkCost, Topology

__all__ = [
    "SCHEMA_VERSION", "CacheEntry", "PlanCache", "default_cache_path", "nearest_fingerprint", "token_bucket",
    "estimate", "feasibility", "PRESETS", "DeviceModel", "Candidate", "LayerSignature", "Plan",
    "NoFeasiblePlan", "best_plan", "rank_plans", "valid_adaptive_rs", "LinkCost", "Topology",
]
