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
