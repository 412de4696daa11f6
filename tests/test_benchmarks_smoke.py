"""Smoke tests of the benchmark scripts: they run, and their results have the promised shape.

No timing is asserted (CI machines are noisy); only structure and positive numbers.
"""

import json
import math

import pytest
import torch

from benchmarks.common import TimingResult, markdown_table, machine_description, time_fn, write_results
from benchmarks.decode_benchmark import (
    DecodeBenchConfig, config_from_args, parse_args, quick_config, render, run_decode_benchmark, static_cache_class,
    tiny_config,
)


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_result():
    return run_decode_benchmark(tiny_config())


def test_decode_rows_cover_every_mode_and_length(tiny_result):
    cfg = tiny_config()
    modes = ["uncached", "dynamic"] + (["static"] if static_cache_class() is not None else [])
    got = {(r["impl"], r["mode"], r["new_tokens"]) for r in tiny_result["decode"]}
    assert got == {("ours", m, n) for m in modes for n in cfg.new_tokens}
    for r in tiny_result["decode"]:
        assert _positive(r["tokens_per_s"]) and _positive(r["ms_per_token"])
        assert r["runs"] == 1
        assert _positive(r["speedup_vs_uncached"])
        assert r["timing"]["samples_s"] and all(s > 0 for s in r["timing"]["samples_s"])
        if r["mode"] != "uncached":
            assert isinstance(r["same_tokens_as_reference"], bool)


def test_uncached_reference_is_checked(tiny_result):
    checks = tiny_result["checks"]
    assert checks["uncached_uses_no_cache"] is True
    assert checks["uncached_num_logits_to_keep"] == [1]
    prompt = tiny_config().prompt_len
    assert checks["uncached_calls_seq_lens"] == [prompt, prompt + 1, prompt + 2]


def test_append_rows(tiny_result):
    cfg = tiny_config()
    caches = ["dynamic", "naive torch.cat"] + (["static"] if static_cache_class() is not None else [])
    rows = tiny_result["append"]
    assert {(r["cache"], r["length"]) for r in rows} == {(c, L) for c in caches for L in cfg.append_lengths}
    for r in rows:
        for key in ("median_us", "amortised_mean_us", "max_us", "median_ratio_vs_first", "mean_ratio_vs_first"):
            assert _positive(r[key]), (key, r)
        assert r["appends_timed"] == (min(r["length"], cfg.naive_window) if r["cache"] == "naive torch.cat"
                                      else r["length"])
        assert r["max_us"] >= r["median_us"]
    firsts = [r for r in rows if r["length"] == cfg.append_lengths[0]]
    assert all(r["median_ratio_vs_first"] == 1.0 for r in firsts)


def test_result_is_json_and_renders(tiny_result, tmp_path, capsys):
    assert tiny_result["threads"] == 1
    text = render(tiny_result, machine_description())
    assert "Greedy decoding throughput" in text and "One single-token append" in text
    assert "| new tokens |" in capsys.readouterr().out
    path = write_results(tmp_path / "r" / "decode.json", tiny_result, markdown=text)
    data = json.loads(path.read_text())
    assert set(data) == {"machine", "command", "results"}
    assert data["results"]["decode"] and data["machine"]["torch"] == torch.__version__
    assert path.with_suffix(".md").read_text().startswith("## Decode benchmark")


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    run_decode_benchmark(tiny_config(new_tokens=(2,), append_lengths=(64,), modes=("dynamic",)))
    assert torch.get_num_threads() == before


def test_transformers_comparison_rows():
    pytest.importorskip("transformers")
    result = run_decode_benchmark(tiny_config(hf=True, new_tokens=(3,), append_lengths=(64,)))
    hf_rows = [r for r in result["decode"] if r["impl"] == "transformers"]
    assert {r["mode"] for r in hf_rows} == {"dynamic", "static"}
    assert all(_positive(r["tokens_per_s"]) for r in hf_rows)
    pairs = {(p["ours_mode"], p["hf_mode"]) for p in result["ours_vs_hf"]}
    assert ("dynamic", "dynamic") in pairs
    assert all(_positive(p["ours_over_hf"]) for p in result["ours_vs_hf"])


def test_cli_presets():
    cfg = config_from_args(parse_args(["--quick", "--no-hf", "--new-tokens", "5,7", "--threads", "1"]))
    assert cfg.new_tokens == (5, 7) and cfg.hf is False and cfg.threads == 1
    assert cfg.d_model == quick_config().d_model == DecodeBenchConfig().d_model
    with pytest.raises(SystemExit):
        parse_args(["--new-tokens", "0"])


def test_common_helpers():
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, repeats=3)
    assert isinstance(t, TimingResult) and len(t.samples) == 3 and len(calls) == 5
    assert t.min <= t.median and t.to_dict()["median_s"] == t.median
    table = markdown_table([["a", 1.5, None], ["bb", 10.0, 2]], ["name", "x", "y"])
    lines = table.splitlines()
    assert lines[0].startswith("| name") and lines[1].startswith("|---") and len(lines) == 4
    assert "| -" in lines[2] or lines[2].rstrip().endswith("- |")
    with pytest.raises(ValueError):
        markdown_table([[1, 2]], ["only one header"])
    desc = machine_description()
    assert desc["available_cores"] >= 1 and desc["torch_threads"] >= 1


def test_static_rows_are_skipped_with_a_note_when_unavailable(monkeypatch):
    import benchmarks.decode_benchmark as db

    monkeypatch.setattr(db, "static_cache_class", lambda: None)
    result = db.run_decode_benchmark(tiny_config(new_tokens=(2,), append_lengths=(64,)))
    assert "static" not in {r["mode"] for r in result["decode"]}
    assert "static" not in {r["cache"] for r in result["append"]}
    assert len([n for n in result["notes"] if "StaticKVCache" in n]) == 1


def test_ab_eager_decode_compares_two_trees_and_their_tokens(capsys):
    """The before/after benchmark unpacks a commit, times both trees and checks their tokens
    (HEAD against this tree: the generation code is the same, so the tokens must be too)."""
    from benchmarks import ab_eager_decode
    ab_eager_decode.main(["--base", "HEAD", "--rounds", "1", "--repeats", "1", "--quick"])
    table = capsys.readouterr().out.split("| case |", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len([c for c in ab_eager_decode.CASES if c[3] != "compile"])  # --quick: no compile
    assert all(row.rstrip().endswith("| yes |") for row in rows), table


def test_serving_benchmark_quick_compares_three_modes_with_the_same_tokens(tmp_path, capsys):
    from benchmarks import serving_benchmark
    out = tmp_path / "serving.json"
    serving_benchmark.main(["--random", "--quick", "--attention", "auto", "gather", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["mode"].split()[0] for r in rows] == ["continuous", "continuous", "static", "one"]
    for r in rows:
        assert _positive(r["tokens_per_s"]) and _positive(r["ttft_p50_ms"])
        assert r["same_tokens_as_one_at_a_time"] == 1.0  # every request: the tokens of generate() alone
    printed = capsys.readouterr().out
    assert "| continuous (LLMEngine, paged)" in printed and "| continuous (LLMEngine, gather)" in printed  # paged: the CPU default


def test_serving_benchmark_repeat_reports_each_modes_median_run(tmp_path, capsys):
    """``--repeat 3``: every mode runs three times, taking turns; its row is its median run, and
    the table's header gives each mode's range.  ``--temperature`` samples in every mode."""
    from benchmarks import serving_benchmark
    out = tmp_path / "serving.json"
    serving_benchmark.main(["--random", "--quick", "--attention", "rows", "--no-one-at-a-time", "--repeat", "3",
                            "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["mode"].split()[0] for r in rows] == ["continuous", "static"]
    for r in rows:
        runs = r["tokens_per_s_runs"]
        assert len(runs) == 3 and runs == sorted(runs) and r["tokens_per_s"] == runs[1]
    printed = capsys.readouterr().out
    assert printed.count("continuous (LLMEngine, rows): ") == 3 and "Each mode ran 3 times" in printed
    with pytest.raises(SystemExit):
        serving_benchmark.main(["--random", "--quick", "--repeat", "0"])
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
    # --temperature: every mode samples (seeded per request); tokens are not compared across modes
    serving_benchmark.main(["--random", "--quick", "--temperature", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert len(rows) == 3 and all(r["same_tokens_as_one_at_a_time"] is None for r in rows)
    assert "sampled at temperature 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        serving_benchmark.main(["--random", "--quick", "--temperature", "-1"])
    assert "--temperature must be >= 0, got -1.0" in capsys.readouterr().err


def test_sampling_benchmark_quick_times_both_ways_of_each_part(tmp_path, capsys):
    from benchmarks import sampling_benchmark
    out = tmp_path / "sampling.json"
    rows = sampling_benchmark.main(["--quick", "--out", str(out)])["rows"]
    assert [r["part"].split(":")[0] for r in rows] == ["noise, temperature only", "the hash of request_noise"] + \
        ["filters"] * 4
    assert all(_positive(r["before_ms"]) and _positive(r["after_ms"]) for r in rows)
    assert json.loads(out.read_text())["results"]["rows"][0]["after"] == "request_noise"
    assert "| filters: top-p 0.95, flat logits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sampling_benchmark.main(["--rows", "0"])


def test_cpu_attention_benchmark_quick_checks_the_three_ways_agree_and_times_them(tmp_path, capsys):
    from benchmarks import cpu_attention_benchmark
    out = tmp_path / "cpu_attention.json"
    rows = cpu_attention_benchmark.main(["--quick", "--out", str(out)])["rows"]
    assert [r["way"] for r in rows] == ["rows + SDPA", "gather + SDPA", "paged kernel"]
    assert all(_positive(r["ms"]) and _positive(r["gb_s"]) for r in rows) and rows[0]["vs_rows"] == 1.0
    assert json.loads(out.read_text())["results"]["args"]["rows"] == 8
    assert "| paged kernel" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cpu_attention_benchmark.main(["--min-len", "9", "--max-len", "8"])
    assert "--min-len 9 must be <= --max-len 8" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gemv_benchmark_refuses_without_cuda_naming_what_it_needs(capsys):
    from benchmarks import gemv_benchmark
    with pytest.raises(SystemExit):
        gemv_benchmark.main([])
    assert "needs CUDA; no CUDA device is available" in capsys.readouterr().err


def test_serving_benchmark_times_transformers_continuous_batching_on_the_same_weights(tmp_path):
    from benchmarks import serving_benchmark
    out = tmp_path / "serving_hf.json"
    serving_benchmark.main(["--gpt2-shape", "--quick", "--transformers", "--out", str(out)])
    rows = {r["mode"].split()[0]: r for r in json.loads(out.read_text())["results"]["rows"]}
    assert set(rows) == {"continuous", "static", "transformers", "one"}
    # a GPT-2 built and saved by transformers, loaded here: both libraries give generate()'s tokens
    assert all(r["same_tokens_as_one_at_a_time"] == 1.0 for r in rows.values())
    assert _positive(rows["transformers"]["tokens_per_s"])


def test_llama_decode_benchmark_quick_rows_and_bandwidth(tmp_path, capsys):
    """The Llama-shape decode benchmark runs its systems in subprocesses and fills every row."""
    from benchmarks import llama_decode_benchmark as bench
    out = tmp_path / "llama.json"
    result = bench.main(["--quick", "--device", "cpu", "--no-compile", "--batches", "1,2", "--new-tokens", "3",
                         "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert [(r["system"], r["batch"]) for r in result["rows"]] == [("ours", 1), ("ours", 2)]
    assert all(r["tokens_per_s"] > 0 and 0 < r["pct_copy"] for r in result["rows"])
    assert out.is_file() and "| ours" in out.with_suffix(".md").read_text()
    # a system that does not answer in time is a row saying so, not the end of the table
    late = bench.main(["--quick", "--device", "cpu", "--no-compile", "--batches", "1", "--autotune", "--combo",
                       "--timeout", "1", "--out", str(tmp_path / "late.json")])
    assert [(r["system"], r["error"]) for r in late["rows"]] == [
        (system, "no result within --timeout 1 s") for system in ("ours", "ours-autotune", "ours-combo")]
    # the bytes a step reads: Llama-3.2-1B's 1.236B parameters in bf16, plus the cache
    assert abs(bench.step_bytes(bench.LLAMA_1B, 1, 0) / 2 - 1.2359e9) < 1e6
    assert bench.step_bytes(bench.LLAMA_1B, 2, 10) - bench.step_bytes(bench.LLAMA_1B, 1, 10) == 2 * 16 * 512 * 10 * 2
