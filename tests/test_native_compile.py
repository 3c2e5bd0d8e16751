"""Compile check of the units in native/ that need no torch headers (the CUDA kernels, the Triton
launcher; compile only, nothing runs); skipped without nvcc. The torch-facing files are built on
GPU machines by the loader/setup.py."""
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[1] / "native"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("unit", sorted(p.name for p in NATIVE.glob("*.cu")) + ["triton_launch.cpp"])
def test_nvcc_compiles(unit, tmp_path):
    cmd = ["nvcc", "-arch=sm_90", "-O1", "-std=c++17", "-c", str(NATIVE / unit), "-o", str(tmp_path / "x.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
