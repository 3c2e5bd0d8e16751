"""The end-to-end example: a few steps on CPU, the loss falls, the progress lines are printed."""
import re

from adaptmoe.examples.train_lm import generate_corpus, main


def test_corpus_is_deterministic_text():
    assert generate_corpus(50, seed=1) == generate_corpus(50, seed=1)
    assert generate_corpus(50, seed=1) != generate_corpus(50, seed=2)


def test_example_trains_and_loss_falls(capsys, tmp_path):
    result = main(["--steps", "30", "--batch-size", "8", "--seq-len", "32", "--log-interval", "10",
                   "--out", str(tmp_path)])
    losses = result["losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 4      # steps 1, 10, 20, 30
    assert re.match(r"step +30 \| loss [\d.]+ \| +\d+ tok/s \| expert load max/mean [\d.]+", lines[-1])
