"""adaptmoe: an adaptive Mixture-of-Experts runtime for PyTorch."""
from .config import ExpertConfig, GateConfig, MoEConfig
from .layer import MoELayer
from .routing import Routing

__version__ = "0.1.0"
__all__ = ["MoELayer", "MoEConfig", "GateConfig", "ExpertConfig", "Routing", "__version__"]
