"""What the native extension is told about a compiled Triton kernel (adaptmoe/ops/_triton_native.py):
its runtime parameters in launch order, their 16-divisibility, and the arguments Triton folded into
constants; built here from a stand-in for Triton's compiled kernel (no GPU, no Triton needed)."""
from types import SimpleNamespace

import pytest

from adaptmoe.ops import _triton_native


def compiled_kernel(**metadata):
    # As Triton 3.6 records a launch of k(a_ptr, n, one, flag, BM: constexpr) with n % 16 == 0, one == 1.
    src = SimpleNamespace(
        signature={"a_ptr": "*bf16", "n": "i32", "one": "constexpr", "big": "i64", "c_ptr": "*i32",
                   "BM": "constexpr"},
        attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (3,): [], (4,): []},
        constants={(2,): 1, (5,): 128})
    md = dict(num_warps=8, shared=65536, num_ctas=1, launch_pdl=False, launch_cooperative_grid=False,
              global_scratch_size=0, profile_scratch_size=0)
    md.update(metadata)
    return SimpleNamespace(src=src, function=0x1234, metadata=SimpleNamespace(**md))


def test_registration_lists_runtime_parameters_in_order_with_their_specialization():
    function, warps, shared, params, kinds, div16, const_names, const_values = _triton_native.registration(
        compiled_kernel())
    assert (function, warps, shared) == (0x1234, 8, 65536)
    assert params == ["a_ptr", "n", "big", "c_ptr"]
    assert kinds == [0, 1, 2, 0]
    assert div16 == [True, True, False, False]
    assert dict(zip(const_names, const_values)) == {"one": 1, "BM": 128}


@pytest.mark.parametrize("metadata", [{"num_ctas": 2}, {"launch_pdl": True}, {"global_scratch_size": 64}])
def test_kernels_the_native_launcher_cannot_launch_are_refused(metadata, monkeypatch):
    monkeypatch.setattr(_triton_native, "triton", SimpleNamespace(__version__="3.6.0"))
    assert _triton_native.native_launch_blocker(compiled_kernel()) is None
    assert _triton_native.native_launch_blocker(compiled_kernel(**metadata)) is not None
    monkeypatch.setattr(_triton_native, "triton", SimpleNamespace(__version__="3.7.0"))
    assert "3.7.0" in _triton_native.native_launch_blocker(compiled_kernel())


class _FakeJit:
    """A stand-in for a @triton.jit function: records launches, returns a compiled-kernel stand-in."""
    arg_names = ["a_ptr", "n", "BM"]

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, num_warps, num_stages, **constexprs):
            self.launches.append((grid, args, constexprs))
            return SimpleNamespace(function=len(self.launches))
        return launch


class _FakeExtension:
    def __init__(self):
        self.fits, self.asked = True, []

    def launch_registered_triton(self, ids, names, values, programs, device):
        self.asked.append((list(ids), names, values, programs, device))
        return ids[-1] if self.fits else -1


def test_python_launches_go_through_the_extension_once_a_variant_is_registered(monkeypatch):
    """First launch: Triton's launcher, whose kernel is registered; then the extension's launcher
    with every argument by name (tensors as addresses); a launch no variant fits goes back to
    Triton's launcher and registers another; other constexprs are other variants; switched off,
    the extension is never asked."""
    import torch
    from adaptmoe.ops import _native
    jit, ext = _FakeJit(), _FakeExtension()
    monkeypatch.setattr(_native, "loaded", lambda: ext)
    monkeypatch.setattr(_triton_native, "register", lambda native, kernel: 100 + kernel.function)
    launches = _triton_native.RegisteredLaunches(jit)
    a = torch.zeros(4)

    def launch(bm=128):   # the id of the variant that ran
        return launches(3, a, 64, BM=bm, num_warps=8, num_stages=4)
    assert launch() == 101 and not ext.asked and len(jit.launches) == 1   # Triton's launcher; registered
    assert launch() == 101 and len(jit.launches) == 1                      # the extension launched it
    assert ext.asked[-1] == ([101], ["a_ptr", "n", "BM"], [a.data_ptr(), 64, 128], 3, a.device.index)
    ext.fits = False
    assert launch() == 102 and ext.asked[-1][0] == [101]      # none fits: Triton's launcher, a new variant
    ext.fits = True
    assert launch() == 102 and ext.asked[-1][0] == [101, 102] and len(jit.launches) == 2
    assert launch(bm=64) == 103 and ext.asked[-1][0] == [101, 102]   # other constexprs: Triton's launcher
    _triton_native.set_python_launches_native(False)
    try:
        asked = len(ext.asked)
        assert launch() == 104 and len(ext.asked) == asked and len(jit.launches) == 4
    finally:
        _triton_native.set_python_launches_native(True)
