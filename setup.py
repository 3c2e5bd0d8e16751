"""adaptmoe: installs everywhere; builds the native CUDA extension only where it can."""
from setuptools import find_packages, setup


def native_extensions():
    """``adaptmoe._C`` when a CUDA toolkit and a CUDA build of torch are present; else none
    (the runtime then JIT-builds on first GPU use, or falls back to PyTorch with a warning)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None:
        return [], {}
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # native/ beside setup.py
    if os.environ.get("ADAPTMOE_NO_NATIVE_BUILD"):
        return [], {}
    try:
        from native.build import extension_for_setup
    except ImportError:
        return [], {}
    return extension_for_setup()


ext_modules, cmdclass = native_extensions()

setup(
    name="adaptmoe",
    version="0.1.0",
    description="Adaptive Mixture-of-Experts runtime for PyTorch: per-call parallelism, planner, native kernels",
    packages=find_packages(include=["adaptmoe", "adaptmoe.*", "planner", "planner.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "networkx", "msgpack"],
    extras_require={"test": ["pytest>=7", "hypothesis"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
