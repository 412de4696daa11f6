"""The KV-cache demo benchmark runs end to end: numbers of the right shape, a PNG, a CLI.

Tiny models and lengths keep this to a second or two; no timing is asserted (CI machines are
shared, and the speedup of a tiny model at tiny lengths is noise).
"""

from __future__ import annotations

import json

import pytest

from benchmarks.kv_cache_demo import benchmark_comparison, build_demo_model, main, plot_benchmark_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = dict(src_vocab_size=40, tgt_vocab_size=40, d_model=32, num_heads=2, d_ff=64, num_layers=1, max_seq_len=16)


@pytest.fixture(scope="module")
def tiny_results():
    model = build_demo_model(seed=0, **TINY)
    return benchmark_comparison(seq_lengths=(3, 6), batch_size=2, num_runs=2, model=model, warmup=0, threads=1,
                                progress=False)


def test_results_have_one_row_per_length_with_both_modes(tiny_results):
    assert tiny_results["seq_lengths"] == [3, 6]
    assert set(tiny_results["results"]) == {3, 6}
    for L, row in tiny_results["results"].items():
        assert row["new_tokens"] == L - 1
        for mode in ("cached", "uncached"):
            stats = row[mode]
            assert len(stats["samples_s"]) == 2
            assert all(t > 0 for t in stats["samples_s"])
            assert stats["mean_s"] > 0 and stats["std_s"] >= 0 and stats["ms_per_token"] > 0
        assert row["speedup"] == pytest.approx(row["uncached"]["mean_s"] / row["cached"]["mean_s"])
    settings = tiny_results["settings"]
    assert settings["batch_size"] == 2 and settings["num_runs"] == 2
    assert settings["model"]["d_model"] == 32 and settings["model"]["parameters"] > 0


def test_results_are_json_serialisable(tiny_results):
    assert json.loads(json.dumps(tiny_results))["results"]["3"]["new_tokens"] == 2


def test_one_run_reports_zero_std():
    model = build_demo_model(**TINY)
    out = benchmark_comparison(seq_lengths=[4], batch_size=1, num_runs=1, model=model, warmup=0, threads=1,
                               progress=False)
    assert out["results"][4]["cached"]["std_s"] == 0.0


def test_plot_writes_a_png(tiny_results, tmp_path):
    path = plot_benchmark_results(tiny_results, tmp_path / "sub" / "demo.png")
    assert path == tmp_path / "sub" / "demo.png"
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_lengths=[1]), "seq_lengths"),
    (dict(seq_lengths=[]), "seq_lengths"),
    (dict(seq_lengths=[40]), "max_seq_len"),
    (dict(seq_lengths=[4], batch_size=0), "batch_size"),
    (dict(seq_lengths=[4], num_runs=0), "num_runs"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        benchmark_comparison(model=build_demo_model(**TINY), threads=1, progress=False, **kwargs)


def test_command_line_writes_png_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "demo.png"
    main(["--seq-lengths", "3", "4", "--batch-size", "1", "--num-runs", "1", "--out", str(out), "--no-progress",
          "--threads", "1"])
    printed = capsys.readouterr().out
    assert "| max_length |" in printed and "speedup" in printed
    assert out.read_bytes()[:8] == PNG_MAGIC
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["results"]["seq_lengths"] == [3, 4]
    assert "machine" in saved and "--seq-lengths 3 4" in saved["command"]
    assert "| max_length |" in out.with_suffix(".md").read_text()
