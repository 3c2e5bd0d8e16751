"""Finds the native extension: the prebuilt ``adaptmoe._C``, else a just-in-time build of
``native/`` (cached on disk), else nothing, with the reason kept for ``native_status()``.

Nothing here runs at import time: the first CUDA use (or ``native_available()``) triggers the
search. When a CUDA tensor reaches an op and no extension can be had, the ops fall back to the
PyTorch reference and warn once, saying why.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

_NATIVE_DIR = Path(__file__).resolve().parents[2] / "native"
_lock = threading.Lock()
_tried = False
_module: ModuleType | None = None
_status = "not loaded yet (loads on first CUDA use)"
_warned = False
_enabled = True


def _build_description() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_adaptmoe_native_build", _NATIVE_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_directory() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        path = Path(root) / "adaptmoe_native"
    else:
        tag = f"torch{torch.__version__.split('+')[0]}_cu{torch.version.cuda or 'none'}"
        path = Path.home() / ".cache" / "adaptmoe" / "build" / tag
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _load() -> tuple[ModuleType | None, str]:
    if not _enabled:
        return None, "native kernels turned off by adaptmoe.ops.set_native_enabled(False)"
    try:
        from adaptmoe import _C  # type: ignore[attr-defined]
        return _C, "prebuilt extension adaptmoe._C"
    except ImportError as exc:
        prebuilt = f"no prebuilt adaptmoe._C ({exc})"
    if torch.version.cuda is None:
        return None, f"{prebuilt}, and torch {torch.__version__} is not a CUDA build"
    if not torch.cuda.is_available():
        return None, f"{prebuilt}, and CUDA is not available to torch {torch.__version__}"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return None, f"{prebuilt}, and no CUDA toolkit (nvcc, CUDA_HOME) for a just-in-time build"
    if not (_NATIVE_DIR / "build.py").exists():
        return None, f"{prebuilt}, and the sources {_NATIVE_DIR} are not there for a just-in-time build"
    try:
        desc = _build_description()
        module = cpp_extension.load(
            name="adaptmoe_native",
            sources=desc.source_paths(),
            extra_include_paths=[str(_NATIVE_DIR)],
            extra_cflags=desc.CXX_FLAGS,
            extra_cuda_cflags=desc.NVCC_FLAGS,
            extra_ldflags=desc.cublaslt_link_flags(),
            build_directory=_build_directory(),
            verbose=False,
        )
        return module, f"just-in-time build of {_NATIVE_DIR}"
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
        return None, f"{prebuilt}, and the just-in-time build failed: {type(exc).__name__}: {exc}"


def load() -> ModuleType | None:
    """The extension module, or None (then ``status()`` says why). Loads at most once."""
    global _tried, _module, _status
    if _tried:
        return _module
    with _lock:
        if not _tried:
            _module, _status = _load()
            _tried = True
    return _module


def loaded() -> ModuleType | None:
    """The extension if an earlier ``load()`` found it; never tries (safe while tracing)."""
    return _module if _tried else None


def set_enabled(enabled: bool) -> None:
    """Turns the native kernels off (the PyTorch reference runs) or back on for this process."""
    global _enabled, _tried, _module, _status
    with _lock:
        _enabled, _tried, _module = bool(enabled), False, None
        _status = "not loaded yet (loads on first CUDA use)"


def status() -> str:
    return _status


_KERNEL_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def for_tensor(t: torch.Tensor) -> ModuleType | None:
    """The extension if ``t`` is on CUDA in a dtype its kernels take and it can be had; warns once
    when a CUDA tensor must take the PyTorch path for want of the extension (float64 tensors take
    it silently: the kernels have no float64 instantiation, the reference is exact there)."""
    global _warned
    if not t.is_cuda or (t.is_floating_point() and t.dtype not in _KERNEL_FLOATS):
        return None
    module = load()
    if module is None and not _warned:
        _warned = True
        warnings.warn(f"adaptmoe: native CUDA kernels unavailable, using the PyTorch reference ops: {_status}",
                      RuntimeWarning, stacklevel=3)
    return module
