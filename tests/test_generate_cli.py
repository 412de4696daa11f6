"""generate.py's decoding options: speculative decoding, long-context caches, GPT-2 folders.

A tiny model is trained once (train.py, seconds); generate.py's ``main(argv)`` then runs
in-process so each case costs milliseconds.  Speculative decoding at temperature 0 must print
exactly the text of plain greedy decoding.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen_script
from helpers import write_play_excerpts

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--max-steps", "30", "--eval-interval", "30", "--no-progress", "--threads", "1"]


def _train(out: Path, data: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "train.py", *TINY, "--data", str(data), "--out-dir", str(out), *extra],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_play_excerpts(root / "text.txt", macbeth=60_000)
    target = _train(root / "target", data)
    draft = _train(root / "draft", data, "--tokenizer", str(target), "--d-model", "16", "--seed", "3")
    other = _train(root / "other", data, "--vocab-size", "400")
    return target, draft, other


def _run(capsys, *argv):
    code = gen_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


GREEDY = ["--temperature", "0", "--max-new-tokens", "40", "--prompt", "MACBETH:"]


@pytest.mark.parametrize("drafter", ["model", "lookup"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_speculative_greedy_prints_the_plain_greedy_text(runs, capsys, drafter, cache):
    target, draft, _ = runs
    code, plain, _ = _run(capsys, "--checkpoint", target, "--cache", cache, *GREEDY)
    assert code == 0
    how = ["--draft-checkpoint", draft] if drafter == "model" else ["--prompt-lookup"]
    code, spec, err = _run(capsys, "--checkpoint", target, "--cache", cache, "--speculative", *how, *GREEDY)
    assert code == 0
    assert spec == plain
    assert "target passes" in err and "accepted" in err


def test_compare_prints_the_wall_clock_speedup_over_plain_decoding(runs, capsys):
    """``--compare``: plain cached decoding of the same prompt is timed too, and the line says
    how many times faster the speculative sample was and (greedy) that the tokens are the same."""
    target, draft, _ = runs
    code, _, err = _run(capsys, "--checkpoint", target, "--speculative", "--draft-checkpoint", draft, "--compare",
                        "--num-draft-tokens", "3", *GREEDY)
    assert code == 0
    line = next(x for x in err.splitlines() if x.startswith("[plain cached decoding of the same prompt"))
    assert re.search(r"speculative decoding: \d+\.\d\dx faster; same tokens: yes\]$", line), line
    code, _, err = _run(capsys, "--checkpoint", target, "--speculative", "--prompt-lookup", "--compare",
                        "--max-new-tokens", "10", "--prompt", "MACBETH:", "--seed", "1")
    assert code == 0 and "x faster]" in err                      # sampling: no token comparison


def test_speculative_sampling_is_reproducible_with_a_seed(runs, capsys):
    target, draft, _ = runs
    argv = ["--checkpoint", target, "--speculative", "--draft-checkpoint", draft, "--seed", "7", "--adaptive-draft",
            "--max-new-tokens", "30", "--prompt", "MACBETH:"]
    assert _run(capsys, *argv)[1] == _run(capsys, *argv)[1]


@pytest.mark.parametrize("argv, message", [
    (["--draft-checkpoint", "x"], "need --speculative"),
    (["--compare"], "need --speculative"),
    (["--speculative"], "exactly one drafter"),
    (["--speculative", "--prompt-lookup", "--no-use-cache"], "no-use-cache"),
    (["--speculative", "--prompt-lookup", "--cache", "sinks"], "rollback"),
])
def test_speculative_flag_errors(runs, capsys, argv, message):
    code, _, err = _run(capsys, "--checkpoint", runs[0], *argv)
    assert code == 1 and message in err


def test_draft_with_another_vocabulary_is_refused(runs, capsys):
    target, _, other = runs
    code, _, err = _run(capsys, "--checkpoint", target, "--speculative", "--draft-checkpoint", other)
    assert code == 1 and "vocab_size" in err


@pytest.mark.parametrize("argv, in_err", [
    (["--cache", "sliding_window", "--window", "16"], "sliding_window KV cache"),
    (["--cache", "sinks", "--sink-tokens", "2", "--window", "14"], "sinks KV cache"),
    (["--cache", "quantized", "--kv-bits", "4"], "quantized KV cache"),
])
def test_long_context_caches_generate_past_the_context(runs, capsys, argv, in_err):
    # the tiny preset's context is 64 tokens: generate 150 with a bounded cache
    code, out, err = _run(capsys, "--checkpoint", runs[0], "--max-new-tokens", "150", "--seed", "1",
                          "--prompt", "MACBETH:", *argv)
    assert code == 0, err
    assert in_err in err and "cache memory" in err and "150 tokens" in err


def test_gpt2_folder_with_prompt_ids(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                  initializer_range=0.3)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    code, out, err = _run(capsys, "--gpt2", tmp_path, "--prompt-ids", "5 6 7", "--temperature", "0",
                          "--max-new-tokens", "10")
    assert code == 0, err
    ids = [int(t) for t in out.split()[:10]]
    from transformer import DecoderOnlyTransformer
    model = DecoderOnlyTransformer.from_pretrained_gpt2(tmp_path)
    ref = model.generate(torch.tensor([[5, 6, 7]]), 10, eos_token_id=None)[0, 3:].tolist()
    assert ids == ref


def test_fast_path_prints_the_plain_greedy_text(runs, capsys):
    target = runs[0]
    code, plain, _ = _run(capsys, "--checkpoint", target, *GREEDY)
    code, fast, err = _run(capsys, "--checkpoint", target, "--fast", *GREEDY)
    assert code == 0 and fast == plain and "fast path" in err
    code, _, err = _run(capsys, "--checkpoint", target, "--fast", "--speculative", "--prompt-lookup")
    assert code == 1 and "--compile/--fast" in err and "no draft model" in err
    # with a draft model, --fast puts the draft's steps on the fast path: still the plain greedy text
    code, spec, err = _run(capsys, "--checkpoint", target, "--fast", "--speculative", "--draft-checkpoint", runs[1],
                           *GREEDY)
    assert code == 0 and spec == plain and "speculative (draft model" in err and "fast)" in err
