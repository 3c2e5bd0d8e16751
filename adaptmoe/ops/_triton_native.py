"""Hands compiled Triton kernels to the native extension, which then launches them itself
(``native/triton_launch.h``): a native call can enqueue a Triton GEMM between its own kernels
instead of returning to Python for Triton's launcher (the dropless forward's gathered first GEMM:
~0.1-0.2 ms of host time per call on the H100 machines, time the GPU idled).

A registration records what Triton compiled the kernel for (its runtime parameters in order, their
16-divisibility, the arguments folded into constants); the native side launches it only for
arguments it computes right for (those assumptions hold), and the caller otherwise takes Triton's
own launcher, which compiles or picks a variant for them and may register it too.
"""
from __future__ import annotations

from typing import Any

try:
    import triton
except ImportError:   # the native launches are then never registered
    triton = None

# Triton versions whose launcher passes what native/triton_launch.cpp passes: the runtime
# parameters, then the global and the profile scratch pointers (3.6's CudaLauncher).
_LAUNCHER_VERSIONS = ("3.6.",)
_KINDS = {"i32": 1, "i64": 2}   # native TritonParamKind; pointers are 0


def native_launch_blocker(kernel: Any) -> str | None:
    """Why the native launcher cannot launch this compiled kernel (Triton's return value of a
    launch), or None."""
    if triton is None or not triton.__version__.startswith(_LAUNCHER_VERSIONS):
        return f"triton {getattr(triton, '__version__', None)}: the native launcher knows {_LAUNCHER_VERSIONS}"
    md = kernel.metadata
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False) or getattr(md, "launch_cooperative_grid", False):
        return "clusters, programmatic dependent launch or cooperative grids"
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0) or getattr(md, "tensordesc_meta", None):
        return "scratch memory or tensor descriptors"
    if not kernel.function:
        return "not loaded on a device yet"
    if any(not ty.startswith("*") and ty not in _KINDS for ty in kernel.src.signature.values() if ty != "constexpr"):
        return "parameters other than pointers, i32 and i64"
    return None


def registration(kernel: Any) -> tuple:
    """``register_triton_kernel``'s arguments for a kernel without a blocker."""
    src = kernel.src
    names = list(src.signature)
    params, kinds, div16 = [], [], []
    for idx, (name, ty) in enumerate(src.signature.items()):
        if ty == "constexpr":
            continue
        params.append(name)
        kinds.append(0 if ty.startswith("*") else _KINDS[ty])
        div16.append(["tt.divisibility", 16] in src.attrs.get((idx,), []))
    folded = [(names[path[0]], int(value)) for path, value in src.constants.items()
              if len(path) == 1 and isinstance(value, (bool, int))]
    return (int(kernel.function), int(kernel.metadata.num_warps), int(kernel.metadata.shared), params, kinds, div16,
            [name for name, _ in folded], [value for _, value in folded])


_ids_by_function: dict[int, int] = {}   # a kernel registered twice keeps its first id


def register(native: Any, kernel: Any) -> int | None:
    """The native id of a compiled kernel, or None when it cannot be launched natively."""
    if native_launch_blocker(kernel) is not None:
        return None
    kernel_id = _ids_by_function.get(int(kernel.function))
    if kernel_id is None:
        kernel_id = native.register_triton_kernel(*registration(kernel))
        if kernel_id < 0:
            return None
        _ids_by_function[int(kernel.function)] = kernel_id
    return kernel_id
