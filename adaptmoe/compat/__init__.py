"""Compatibility surfaces: code written for FastMoE, sigma-MoE or ColossalAI's MoE runs on adaptmoe
with only the import changed. Each module is a thin adapter that builds the typed
``MoEConfig`` / ``MoELayer``; the README section "Migrating from FastMoE, sigma-MoE, ColossalAI" says what maps how.

- ``adaptmoe.compat.fastmoe``: FMoE, FMoETransformerMLP, NaiveGate/NoisyGate/GShardGate/SwitchGate,
  DistributedGroupedDataParallel, fmoefy
- ``adaptmoe.compat.sigma_moe``: MoE (forward returns (output, regularization_loss))
- ``adaptmoe.compat.colossal``: Top1Router/Top2Router, noise generators, Experts, MoeLayer, MoeLoss,
  moe_set_seed, MOE_CONTEXT and MoE parallel groups
"""
__all__ = ["fastmoe", "sigma_moe", "colossal"]
