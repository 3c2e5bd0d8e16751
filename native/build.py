"""Build description of the native extension, shared by setup.py (``adaptmoe._C``) and the
just-in-time loader (``adaptmoe/ops/_native.py``). Kept free of torch imports at module level."""
from __future__ import annotations

import os
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
SOURCES = ("moe_kernels.cu", "decode_kernels.cu", "elementwise_kernels.cu", "bindings.cpp")
CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def source_paths() -> list[str]:
    return [str(NATIVE_DIR / name) for name in SOURCES]


def extension_for_setup():
    """(ext_modules, cmdclass) for setup.py: one CUDAExtension ``adaptmoe._C``."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    root = NATIVE_DIR.parent
    sources = [os.path.relpath(p, root) for p in source_paths()]
    ext = CUDAExtension(
        "adaptmoe._C",
        sources=sources,
        include_dirs=[str(NATIVE_DIR)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension}
