"""python -m planner: whatif, show, clear, argument errors; the package stays torch-free."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from planner import LayerSignature, Plan, PlanCache
from planner.__main__ import main

REPO = Path(__file__).resolve().parents[2]
WHATIF_2048 = ["whatif", "--nodes", "256", "--gpus-per-node", "8", "--intra-bw", "300",
               "--inter-bw", "25", "--model-dim", "4096", "--hidden", "14336", "--experts", "64",
               "--top-k", "2", "--tokens", "4096"]


def test_whatif_2048_gpus_prints_ranked_and_rejected_tables(capsys):
    assert main(WHATIF_2048) == 0
    out = capsys.readouterr().out
    assert "256 node(s) x 8 GPU(s) = 2048 ranks" in out
    assert "planned 168 candidates in" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank"))
    first = lines[header + 1].split()
    assert first[0] == "1" and first[3] in ("flat", "2d") and float(first[5]) > 0
    assert "rejected:" in out
    assert "decode kernel is inference-only (training=True)" in out


def test_whatif_inference_one_gpu_and_dropless(capsys):
    args = ["whatif", "--nodes", "1", "--gpus-per-node", "1", "--intra-bw", "300", "--inter-bw",
            "25", "--model-dim", "4096", "--hidden", "14336", "--experts", "8", "--top-k", "2",
            "--tokens", "1", "--infer", "--capacity-factor", "0", "--device", "H200"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "bmm needs a fixed capacity (capacity_factor > 0), got 0" in out
    first = out.splitlines()[[l.lstrip().startswith("rank") for l in out.splitlines()].index(True) + 1]
    assert first.split()[4] == "decode"


@pytest.mark.parametrize("change, named", [
    (("--nodes", "0"), "--nodes: must be a positive integer, got '0'"),
    (("--dtype", "int4"), "--dtype: invalid choice: 'int4'"),
    (("--device", "TPU"), "--device: invalid choice: 'TPU'"),
    (("--inter-bw", "-3"), "--inter-bw: must be a number > 0, got '-3'"),
    (("--top-k", "65"), "top_k must be in [1, 64] (num_experts), got 65"),
])
def test_whatif_argument_errors_name_the_argument(change, named, capsys):
    args = list(WHATIF_2048)
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_whatif_lists_allowed_dtypes_on_error(capsys):
    with pytest.raises(SystemExit):
        main(WHATIF_2048 + ["--dtype", "int4"])
    err = capsys.readouterr().err
    assert "bfloat16" in err and "float32" in err


def test_show_and_clear(tmp_path, capsys):
    path = tmp_path / "plans.msgpack"
    fp = {"device": "H100", "world_size": 2, "local_size": 2, "links": "x", "torch": "2.11",
          "cuda": "13.0"}
    PlanCache(path).put(fp, LayerSignature(4096, 14336, 8, 2), 8192, Plan(1, 2, "flat", "bmm"),
                        predicted_ms=21.5, measured_ms=22.0)
    assert main(["show", "--cache", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 entry" in out and "r=1 d=2 flat bmm" in out and "21.500" in out
    assert "D4096-H14336-E8-k2-bfloat16-ffn-train-cf1" in out and "measured" in out
    assert main(["clear", "--cache", str(path)]) == 0
    assert "cleared 1 entry" in capsys.readouterr().out
    main(["show", "--cache", str(path)])
    assert "0 entries" in capsys.readouterr().out


def test_module_entry_point_runs_as_a_subprocess(tmp_path):
    env = dict(os.environ, ADAPTMOE_PLAN_CACHE=str(tmp_path / "c.msgpack"), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "planner", "show"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "c.msgpack") in done.stdout


def test_planner_never_imports_torch():
    for source in (REPO / "planner").glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), source
    code = ("import sys, planner, planner.__main__; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.stdout.strip() == "False", done.stderr
