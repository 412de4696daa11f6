"""Smoke test of ``benchmarks/long_context_benchmark.py --quick``: every part runs and writes the
promised tables, JSON and plot.  No timing is asserted (CI machines are noisy)."""

from __future__ import annotations

import json
import math

from benchmarks.long_context_benchmark import ATTENTION_KINDS, config_from_args, main, parse_args


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_writes_every_table_and_the_plot(tmp_path):
    out = tmp_path / "long_context.json"
    res = main(["--quick", "--out", str(out)])
    cfg = res["config"]
    rows = res["attention"]
    assert {(r["cache"], r["tokens"]) for r in rows} == {(k, L) for k in ATTENTION_KINDS for L in cfg["lengths"]}
    assert all(_positive(r["ms_per_step"]) and _positive(r["memory_mb"]) for r in rows)
    for kind in ("sliding_window", "sinks", "linear"):  # bounded: the same memory at every length
        assert len({r["memory_mb"] for r in rows if r["cache"] == kind}) == 1
    full = [r["memory_mb"] for r in rows if r["cache"] == "full"]
    assert full == sorted(full) and full[-1] > full[0]

    ppl = res["perplexity"]
    assert [r["multiple"] for r in ppl["rows"]] == [1] + cfg["multiples"]
    first = ppl["rows"][0]
    assert math.isclose(first["sinks"], first["sliding_window"], rel_tol=1e-4)  # nothing evicted within C
    assert all(_positive(r["sinks"]) and _positive(r["sliding_window"]) for r in ppl["rows"])
    assert set(ppl["curves"]) == {"sinks", "sliding_window", "dense", "windows"}
    assert all(_positive(r["windows"]) for r in ppl["rows"])

    q = res["quantized"]
    assert [r["cache"] for r in q["rows"]][0] == "dynamic (float32)" and len(q["rows"]) == 5
    assert q["rows"][0]["max_abs_logit_error"] < 1e-3  # the full-precision cache is the reference
    assert all(r["bytes_per_token"] < q["rows"][0]["bytes_per_token"] for r in q["rows"][1:])
    assert all(_positive(r["tokens_per_s"]) for r in q["speed"])

    saved = json.loads(out.read_text())
    assert saved["results"]["attention"] == rows and "machine" in saved
    md = out.with_suffix(".md").read_text()
    for title in ("One attention layer decoding", "Perplexity past the training context", "Quantized cache"):
        assert title in md
    assert out.with_suffix(".png").stat().st_size > 1000


def test_arguments_map_to_the_config():
    cfg = config_from_args(parse_args(["--lengths", "64", "128", "--window", "32", "--heads", "4", "--checkpoint",
                                       "out", "--multiples", "2", "8", "--threads", "1"]))
    assert (cfg.lengths, cfg.window, cfg.heads, cfg.checkpoint, cfg.multiples, cfg.threads) == \
        ([64, 128], 32, 4, "out", [2, 8], 1)
    assert config_from_args(parse_args(["--quick"])).heads == 2
