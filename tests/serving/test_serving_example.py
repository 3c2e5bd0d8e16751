"""The serving example runs a short mixed stream on CPU and reports what it promises."""
from __future__ import annotations

import json

from adaptmoe.examples import serve


def test_serve_example_small_stream(tmp_path, capsys):
    out_json = tmp_path / "serve.json"
    results = serve.main(["--device", "cpu", "--requests", "10", "--iters", "2", "--model-dim", "16",
                          "--hidden", "32", "--max-prefill", "96", "--floor-tokens", "1,4",
                          "--prefill-floor-tokens", "96", "--split-k", "2", "--json", str(out_json)])
    text = capsys.readouterr().out
    for expected in ("[adaptive]", "[fixed grouped]", "[fixed bmm cf=1]", "[fixed decode]", "p50 ms", "p99 ms",
                     "tok/s", "decode: latency vs weight-read floor", "copy bandwidth", "prefill: latency"):
        assert expected in text
    assert [row["T"] for row in results["decode"]] == [1, 4]
    assert results["decode"][0]["distinct"] == 2 and results["decode"][0]["floor_ms"] > 0
    # warm-up planned every bucket up to the largest request; the stream itself planned nothing
    assert results["plans_computed"]["adaptive"] >= len(results["streams"]["adaptive"])
    assert results["plans_during_stream"]["adaptive"] == 0
    assert results["decode"][0]["split2"] > 0
    assert json.loads(out_json.read_text())["device"] == "cpu"


def test_serve_example_ffn_floors_only(capsys):
    results = serve.main(["--device", "cpu", "--skip-stream", "--iters", "1", "--model-dim", "16", "--hidden", "16",
                          "--expert-kind", "ffn", "--floor-tokens", "1", "--prefill-floor-tokens", "32",
                          "--strategies", "adaptive,fixed grouped"])
    assert results["streams"] == {} and results["decode"][0]["adaptive"] > 0
    assert "[adaptive]" not in capsys.readouterr().out
