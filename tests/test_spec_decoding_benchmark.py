"""Smoke test of ``benchmarks/spec_decoding_benchmark.py --random --quick``: it runs, writes its
JSON and tables, and its rows have the promised shape.  No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.spec_decoding_benchmark import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("spec") / "spec.json"
    try:
        result = main(["--random", "--quick", "--threads", "1", "--out", str(out), "--no-progress",
                       "--plot", str(out.with_suffix(".png"))])
    finally:
        torch.set_num_threads(before)
    return result, out


def test_rows_cover_every_setting(quick_run):
    result, _ = quick_run
    rows = result["draft_model"]
    assert {(r["temperature"], r["num_draft_tokens"], r["adaptive"]) for r in rows} == {
        (0.0, 2, False), (0.0, 4, True), (0.8, 2, False), (0.8, 4, True)}
    assert [r["temperature"] for r in result["prompt_lookup"]] == [0.0, 0.8]
    for r in rows + result["prompt_lookup"]:
        assert r["new_tokens"] == 16
        for key in ("tokens_per_target_pass", "spec_ms_per_token", "baseline_ms_per_token", "speedup"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert 1 <= r["target_passes"] <= 16
        if r["temperature"] == 0:
            assert r["same_tokens_as_target"] is True  # greedy speculative output == target's
        else:
            assert r["same_tokens_as_target"] is None
    assert all(r["draft_passes"] > 0 for r in rows)
    assert all(r["draft_passes"] == 0 for r in result["prompt_lookup"])


def test_writes_json_and_markdown(quick_run):
    _, out = quick_run
    payload = json.loads(out.read_text())
    assert payload["results"]["config"]["new_tokens"] == 16
    assert "spec_decoding_benchmark" in payload["command"]
    assert out.with_suffix(".png").stat().st_size > 0
    md = out.with_suffix(".md").read_text()
    assert "| drafter" in md and "speedup" in md and "Prompt lookup" in md


def test_needs_models():
    with pytest.raises(SystemExit, match="--target"):
        main(["--quick"])


def test_runs_on_saved_checkpoints(tmp_path):
    """The checkpoint path: ``save_model`` a target (with a byte tokenizer) and a draft, then benchmark them."""
    from spec_decoding import make_demo_pair
    from transformer.checkpoint import save_model
    from transformer.tokenizer import ByteTokenizer

    target, draft = make_demo_pair(vocab_size=ByteTokenizer.vocab_size, d_model=32, n_layers=2, max_seq_len=256)
    tok_file = ByteTokenizer().save(tmp_path / "tok")
    save_model(tmp_path / "target", target, extra_files={"tokenizer.json": tok_file})
    save_model(tmp_path / "draft", draft)
    before = torch.get_num_threads()
    try:
        for extra in (["--draft", str(tmp_path / "draft"), "--draft-mode", "fast", "--prompt", "ab", "--prompt", "xyz"],
                      ["--draft-layers", "1", "--reference"]):
            result = main(["--target", str(tmp_path / "target"), *extra, "--quick", "--threads", "1", "--no-progress",
                           "--temperatures", "0", "--out", str(tmp_path / "r.json")])
            assert all(r["same_tokens_as_target"] for r in result["draft_model"] + result["prompt_lookup"])
            assert result["lookup_prompt_tokens"] > max(result["prompt_tokens"])
        assert [r["mode"] for r in result["reference"]] == [
            "plain cached decoding, float32 (eager)", "plain cached decoding, bfloat16 (eager)",
            "plain decoding, float32, FastDecoder (compiled)"]
        assert all(r["ms_per_token"] > 0 for r in result["reference"])
    finally:
        torch.set_num_threads(before)


def test_bfloat16_target_also_times_a_float32_baseline(tmp_path):
    """With ``--dtype bfloat16`` each row also has the speedup over plain float32 decoding,
    timed in the same round-robin (the honest baseline on a CPU, where float32 is faster)."""
    before = torch.get_num_threads()
    out = tmp_path / "bf16.json"
    try:
        result = main(["--random", "--quick", "--dtype", "bfloat16", "--threads", "1", "--no-adaptive",
                       "--out", str(out), "--no-progress"])
    finally:
        torch.set_num_threads(before)
    for r in result["draft_model"] + result["prompt_lookup"]:
        assert r["baseline_float32_ms_per_token"] > 0 and r["speedup_vs_float32"] > 0
        assert r["speedup_vs_float32"] == pytest.approx(r["baseline_float32_ms_per_token"] / r["spec_ms_per_token"])
    assert "speedup vs float32" in out.with_suffix(".md").read_text()
    plain = main(["--random", "--quick", "--threads", "1", "--no-adaptive", "--no-prompt-lookup",
                  "--out", str(tmp_path / "f32.json"), "--no-progress"])
    assert plain["draft_model"][0]["speedup_vs_float32"] is None   # a float32 target: one baseline
