"""Hands compiled Triton kernels to the native extension, which then launches them itself
(``native/triton_launch.h``): a native call can enqueue a Triton GEMM between its own kernels
instead of returning to Python for Triton's launcher (the dropless forward's gathered first GEMM:
~0.1-0.2 ms of host time per call on the H100 machines, time the GPU idled), and Python's own
launches of our kernels skip Triton's launcher once a variant is registered (``RegisteredLaunches``).

A registration records what Triton compiled the kernel for (its runtime parameters in order, their
16-divisibility, the arguments folded into constants); the native side launches it only for
arguments it computes right for (those assumptions hold), and the caller otherwise takes Triton's
own launcher, which compiles or picks a variant for them and may register it too.
"""
from __future__ import annotations

from typing import Any

import torch

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


_python_launches_native = True
_MAX_VARIANTS = 8
_LAUNCH_OPTIONS = ("num_warps", "num_stages")   # keyword arguments of a launch that are not constexprs


def set_python_launches_native(enabled: bool) -> None:
    """Whether ``RegisteredLaunches`` may launch registered variants through the extension (else
    always Triton's launcher), e.g. for A/B runs."""
    global _python_launches_native
    _python_launches_native = bool(enabled)


class RegisteredLaunches:
    """Python's launches of one Triton kernel: through the extension's launcher once Triton has
    compiled and launched a variant that fits the arguments (registered then), else through
    Triton's. Why: Triton's launcher (binder, specialization key, launch metadata) costs tens of
    us of host time per launch, and a dropless training step in capacity slots makes seven
    (``ops._triton_slotted``), host time the GPU waits for on small layers.

    Variants are kept per device, launch shape and constexprs; the extension picks the first
    whose specialization (16-divisibility, folded arguments) the arguments satisfy."""

    def __init__(self, jit_fn: Any):
        self._jit_fn = jit_fn
        self._variants: dict[tuple, list[int]] = {}
        # per launch items: (argument names, constexpr values), what a native launch passes
        # besides the runtime values (built once: host time per launch)
        self._prepared: dict[tuple, tuple[list[str], list[int]]] = {}

    def variants(self, device: int | None, launch: tuple[tuple[str, Any], ...]) -> list[int]:
        """The registered variants (extension ids) of launches on ``device`` with these keyword
        arguments (constexprs, num_warps, num_stages: ``tuple(kwargs.items())`` in call order); the
        list grows as launches register more."""
        return self._variants.setdefault((device, launch), [])

    def _prepare(self, items: tuple, num_args: int, launch: dict) -> tuple[list[str], list[int]]:
        constexprs = {name: v for name, v in launch.items() if name not in _LAUNCH_OPTIONS}
        names = list(self._jit_fn.arg_names[:num_args]) + list(constexprs)
        prepared = self._prepared[items] = (names, [int(v) for v in constexprs.values()])
        return prepared

    def __call__(self, programs: int, *args: Any, **launch: Any) -> int | None:
        """Launches ``jit_fn[(programs,)](*args, **launch)`` (``args``: the runtime parameters in
        order, the first a CUDA tensor; ``launch``: constexprs, num_warps, num_stages). Returns the
        extension's id of the variant that ran (registered now when Triton's launcher ran it), or
        None when the extension cannot launch it (no extension, or ``native_launch_blocker``)."""
        items = tuple(launch.items())
        prepared = self._prepared.get(items)
        if prepared is None:
            prepared = self._prepare(items, len(args), launch)
        names, constants = prepared
        device = args[0].device.index
        ids = self.variants(device, items)
        native = _native_module()
        if ids and _python_launches_native and native is not None:
            # (type(a) is int first: isinstance against torch.Tensor costs ~0.1 us per argument)
            values = [a if type(a) is int else a.data_ptr() if isinstance(a, torch.Tensor) else int(a) for a in args]
            launched = native.launch_registered_triton(ids, names, values + constants, programs, device)
            if launched >= 0:
                return launched
        kernel = self._jit_fn[(programs,)](*args, **launch)
        if native is None or not hasattr(native, "launch_registered_triton"):
            return None
        kernel_id = register(native, kernel)
        if kernel_id is not None and kernel_id not in ids and len(ids) < _MAX_VARIANTS:
            ids.append(kernel_id)
        return kernel_id


def _native_module() -> Any:
    from . import _native   # lazy: _native imports the extension machinery
    return _native.loaded()
