"""Model integrations: swap a framework's MoE blocks for adaptmoe layers."""
from .hf_moe import AdaptMoEBlock, BlockSpec, HFRouterGate, inspect_block, replace_moe_blocks

__all__ = ["AdaptMoEBlock", "BlockSpec", "HFRouterGate", "inspect_block", "replace_moe_blocks"]
