"""The shipped examples run and do what they print."""
from adaptmoe.examples import helloworld


def test_helloworld_trains_and_loss_falls(capsys):
    losses = helloworld.main(["--device", "cpu", "--num_steps", "4", "--batch_size", "2", "--num_tokens", "16",
                              "--model_dim", "32", "--hidden_size", "64", "--lr", "1e-3"])
    out = capsys.readouterr().out
    assert "STEP-3: loss" in out and "[Summary]" in out
    assert losses[-1] < losses[0]


def test_helloworld_eval_and_dropless():
    losses = helloworld.main(["--device", "cpu", "--num_steps", "2", "--batch_size", "1", "--num_tokens", "8",
                              "--model_dim", "16", "--hidden_size", "16", "--eval", "--capacity_factor", "0",
                              "--expert_type", "llama_ffn", "--dtype", "float64"])
    assert len(losses) == 2 and losses[0] == losses[1]


def test_helloworld_under_torchrun_with_sharded_expert():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "adaptmoe.examples.helloworld", "--device", "cpu", "--num_steps", "2", "--batch_size", "1",
           "--num_tokens", "16", "--model_dim", "16", "--hidden_size", "32", "--num_local_experts", "-2",
           "--parallel_type", "adaptive:2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size = 2" in done.stdout and "STEP-1: loss" in done.stdout


def test_bench_layer_balanced_routing_gives_every_expert_the_same_tokens():
    import torch

    from adaptmoe.examples import bench_layer
    cfg = dict(T=48, D=16, H=8, E=8, K=3, dtype="fp32")
    layer = bench_layer.build_layer(cfg, "cpu")
    x = torch.randn(cfg["T"], cfg["D"])
    bench_layer.balance_routing(layer, x, cfg["K"])
    for cf in (1.0, 0.0):
        layer(x, capacity_factor=cf)
        routing = layer.last_routing
        assert routing.counts_E.tolist() == [cfg["T"] * cfg["K"] // cfg["E"]] * cfg["E"]
        assert bool((routing.slots_TK >= 0).all()), "cf=1 must drop nothing under balanced routing"
