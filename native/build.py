"""Build description of the native extension, shared by setup.py (``adaptmoe._C``) and the
just-in-time loader (``adaptmoe/ops/_native.py``). Kept free of torch imports at module level."""
from __future__ import annotations

import os
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
SOURCES = ("moe_kernels.cu", "gate_kernels.cu", "gating_backward.cu", "row_movers.cu", "slot_layout.cu", "decode_kernels.cu", "elementwise_kernels.cu",
           "blaslt.cpp", "layer_forward.cpp", "gathered_forward.cpp", "slotted_gemm.cpp", "triton_launch.cpp", "bindings.cpp")
CXX_FLAGS = ["-O3", "-std=c++17"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]


def cublaslt_link_flags() -> list[str]:
    """Linker flags: cuBLASLt (blaslt.cpp), the toolkit's library, else the pip wheel's
    (nvidia/cublas/lib), neither when none is found (torch has loaded cuBLASLt by then, and the
    extension's symbols resolve against it at load time); libdl (triton_launch.cpp)."""
    from torch.utils.cpp_extension import CUDA_HOME

    dirs = []
    if CUDA_HOME:
        dirs += [Path(CUDA_HOME) / sub for sub in ("lib64", "lib", "targets/x86_64-linux/lib")]
    try:
        import nvidia.cublas  # type: ignore[import-not-found]
        dirs += [Path(p) / "lib" for p in nvidia.cublas.__path__]
    except ImportError:
        pass
    for d in dirs:
        if (d / "libcublasLt.so").exists():
            return [f"-L{d}", "-lcublasLt", "-ldl"]
        versioned = sorted(d.glob("libcublasLt.so.*"), key=lambda p: len(p.name))
        if versioned:
            return [f"-L{d}", f"-l:{versioned[0].name}", "-ldl"]
    return ["-ldl"]   # triton_launch.cpp finds the driver's cuLaunchKernel with dlopen


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
        extra_link_args=cublaslt_link_flags(),
    )
    return [ext], {"build_ext": BuildExtension}
