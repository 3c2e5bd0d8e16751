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
