"""No silent wrong answers: inputs the code cannot handle correctly are refused, by name.

What is guaranteed, and how each guarantee is tested:

* ``attention_mask`` is left padding or nothing.  A row must be 0s (padding) then 1s (real
  tokens): right padding, holes (a 0 after a 1) and values other than 0/1 are refused with a
  message that says left padding is expected -- on the eager and the fast path alike -- while a
  left-padded batch still gives every row the tokens of its prompt run alone (greedy, compared
  row by row).  ``src_mask`` (the encoder's, where holes are harmless) must hold 0/1 only.
* Token ids outside ``[0, vocab_size)`` are refused at the entry of ``generate``, of the
  encoder-decoder and tutorial APIs and of speculative decoding, naming the id and the vocab size,
  instead of torch's ``IndexError: index out of range in self`` from deep inside the embedding.
* ``temperature`` must be finite (``inf`` and ``nan`` are refused everywhere); tiny positive
  temperatures (``1e-45``, ``1e-300``) work and sample only the most likely token(s), the limit
  of ``T -> 0``, instead of ending in "probability tensor contains inf/nan".
* An exception raised inside generation (here: by the streamer) leaves a model that was in
  training mode in training mode -- checked for ``generate``, the fast path, the
  encoder-decoder, the tutorial ``EnhancedTransformer`` and speculative decoding.
* generate.py refuses bad flags in one argparse line that names the flag and the value
  (``--top-p 1.5``, ``--temperature inf``, ``--device banana``, ...), explains the
  ``--cache sinks --sink-tokens`` / context constraint with the flags the user gave, tells the
  user when it is reading the prompt from stdin, and without a prompt starts its sample at a
  speaker heading or scene heading picked (by ``--seed``) from the run's held-out text.  These
  cases run ``generate.main(argv)`` in-process on a tiny model trained once for the module.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen_script
from helpers import left_pad, scaled_init, tiny_decoder, tiny_seq2seq, write_play_excerpts
from spec_decoding import PromptLookupDrafter, SpecDecodingPair, speculative_generate
from transformer import EnhancedTransformer
from transformer.data import load_corpus, split_documents
from transformer.sampling import process_logits, sample_next_token, validate_sampling_args

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ attention_mask
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mask, what", [
    ([[1, 1, 1, 1], [1, 1, 0, 0]], "right padding"),
    ([[1, 1, 1, 1], [0, 1, 0, 1]], "a hole"),
    ([[1, 1, 1, 1], [1, 0, 1, 1]], "a hole"),
])
def test_masks_that_are_not_left_padding_are_refused(mask, what, fast):
    model = tiny_decoder()
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"attention_mask row 1 .*left padding"):
        model.generate(ids, 3, attention_mask=torch.tensor(mask), fast=fast)


@pytest.mark.parametrize("mask", [[[1, 2, 1]], [[0.5, 1.0, 1.0]], [[-1, 1, 1]]])
def test_mask_values_other_than_0_and_1_are_refused(mask):
    model = tiny_decoder()
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 .* and 1"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, attention_mask=torch.tensor(mask))


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padding_gives_each_prompt_its_own_tokens(use_cache):
    model = tiny_decoder(pos="rope")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g) for n in (2, 7, 4)]
    ids, mask = left_pad(prompts, pad_id=5)
    for m in (mask, mask.bool(), mask.float()):  # any dtype holding 0/1 is fine
        out = model.generate(ids, 8, attention_mask=m, use_cache=use_cache, eos_token_id=None)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], 8, eos_token_id=None)[0, len(p):]
            assert torch.equal(out[row, ids.shape[1]:], alone), row


def test_src_mask_values_are_checked():
    model = tiny_seq2seq()
    src = torch.randint(3, 61, (1, 5))
    with pytest.raises(ValueError, match=r"src_mask must hold only 0 .* and 1"):
        model.generate(src, 3, src_mask=torch.tensor([[1, 1, 2, 1, 0]]))
    with pytest.raises(ValueError, match=r"src_mask .*at least one real"):
        model.generate(src, 3, src_mask=torch.zeros(1, 5, dtype=torch.long))
    # a hole in the source mask is fine: the encoder sees the whole source at once
    holes = model.generate(src, 3, src_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    assert holes.shape[0] == 1


# ------------------------------------------------------------------ token ids
@pytest.mark.parametrize("bad", [61, 1000, -1])
def test_out_of_range_prompt_ids_are_refused_naming_value_and_vocab(bad):
    model = tiny_decoder()  # vocab_size 61
    ids = torch.tensor([[3, 4, 5], [6, bad, 7]])
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad} \(row 1, position 1\).*vocab_size=61"):
        model.generate(ids, 2)
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad}.*vocab_size=61"):
        model.generate(ids, 2, fast=True)
    with pytest.raises(ValueError, match=rf"input_ids holds token id {bad}.*vocab_size=61"):
        speculative_generate(model, PromptLookupDrafter(), ids[1:], 2)


def test_speculative_pair_phases_refuse_out_of_range_ids():
    pair = SpecDecodingPair(tiny_decoder(seed=1, d_model=16), tiny_decoder())
    with pytest.raises(ValueError, match=r"input_ids holds token id 70 .*vocab_size=61"):
        pair.generate_draft_sequence(torch.tensor([[3, 70]]))
    with pytest.raises(ValueError, match=r"draft_tokens holds token id -2 .*vocab_size=61"):
        pair.verify_draft_with_target(torch.tensor([[3, 4]]), torch.tensor([[5, -2]]))


def test_out_of_range_source_ids_are_refused():
    model = tiny_seq2seq(src_vocab_size=20)
    with pytest.raises(ValueError, match=r"src holds token id 20 .*src_vocab_size=20"):
        model.generate(torch.tensor([[3, 20, 4]]), 3)
    with pytest.raises(ValueError, match=r"input_ids holds token id 99 .*vocab_size=61"):
        model.generate(torch.tensor([[3, 4]]), 3, decoder_input_ids=torch.tensor([[1, 99]]))
    enhanced = EnhancedTransformer(src_vocab_size=20, tgt_vocab_size=30, d_model=32, num_heads=4, d_ff=64,
                                   num_layers=1, max_seq_len=32)
    with pytest.raises(ValueError, match=r"src holds token id -3 .*src_vocab_size=20"):
        enhanced.generate(torch.tensor([[3, -3, 4]]), 5)


def test_bool_max_new_tokens_is_refused():
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_decoder().generate(torch.zeros(1, 3, dtype=torch.long), True)


# ------------------------------------------------------------------ temperature
@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("-inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(top_p=float("nan")), "top_p"), (dict(top_p=True), "top_p"),
    (dict(top_p=float("inf")), "top_p"),
])
def test_non_finite_and_bool_sampling_values_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        validate_sampling_args(**kwargs)
    with pytest.raises(ValueError, match=name):
        tiny_decoder().generate(torch.zeros(1, 3, dtype=torch.long), 2, do_sample=True, **kwargs)


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 1e-30, 1e-6])
def test_tiny_temperatures_sample_the_most_likely_token(temperature):
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 5
    g = torch.Generator().manual_seed(0)
    token = sample_next_token(logits, do_sample=True, temperature=temperature, generator=g)
    assert torch.equal(token, logits.argmax(-1))
    scores = process_logits(logits, temperature)
    assert not scores.isnan().any() and bool((scores.amax(-1) == 0).all())
    # exact ties at the top stay a fair choice between the tied tokens (the limit of T -> 0)
    tie = torch.tensor([[1.0, 3.0, 3.0, -2.0]]).expand(4000, -1)
    draws = sample_next_token(tie, do_sample=True, temperature=temperature, generator=g)
    counts = torch.bincount(draws, minlength=4)
    assert counts[0] == 0 and counts[3] == 0 and 1800 < counts[1] < 2200


def test_tiny_temperature_generates_the_greedy_tokens():
    model = tiny_decoder()
    ids = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(ids, 12, eos_token_id=None)
    for fast in (False, True):
        tiny = model.generate(ids, 12, do_sample=True, temperature=1e-45, eos_token_id=None, fast=fast,
                              generator=torch.Generator().manual_seed(3))
        assert torch.equal(tiny, greedy), fast
    spec, _ = speculative_generate(model, PromptLookupDrafter(), ids[:1], 12, temperature=1e-45, eos_token_id=None,
                                   seed=3)
    assert torch.equal(spec, greedy[:1])


# ------------------------------------------------------------------ train/eval mode
class Boom(RuntimeError):
    pass


def _boom(token):
    raise Boom("streamer failed")


def _enhanced():
    torch.manual_seed(0)
    return scaled_init(EnhancedTransformer(src_vocab_size=20, tgt_vocab_size=30, d_model=32, num_heads=4, d_ff=64,
                                           num_layers=1, max_seq_len=32))


def _entry_point(name):
    """``(call, models)``: a generation call whose streamer raises, and the models it runs."""
    prompt = torch.ones(1, 3, dtype=torch.long)
    if name in ("speculative", "pair"):
        target, draft = tiny_decoder(), tiny_decoder(seed=1, d_model=16)
        if name == "speculative":
            return lambda: speculative_generate(target, draft, prompt, 6, streamer=_boom), [target, draft]
        return lambda: SpecDecodingPair(draft, target).generate(prompt, 6, streamer=_boom), [target, draft]
    if name in ("seq2seq", "enhanced"):
        model = tiny_seq2seq() if name == "seq2seq" else _enhanced()
        return lambda: model.generate(torch.full((1, 4), 5), 6, streamer=_boom), [model]
    model = tiny_decoder()
    options = {"generate": {}, "no-cache": {"use_cache": False}, "fast": {"fast": True}}[name]
    return lambda: model.generate(prompt, 4, streamer=_boom, **options), [model]


ENTRY_POINTS = ["generate", "no-cache", "fast", "seq2seq", "enhanced", "speculative", "pair"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_an_exception_inside_generation_restores_training_mode(entry):
    call, models = _entry_point(entry)
    for m in models:
        m.train()
    with pytest.raises(Boom):
        call()
    assert all(m.training for m in models)
    for m in models:  # and eval mode stays eval mode
        m.eval()
    with pytest.raises(Boom):
        call()
    assert not any(m.training for m in models)


# ------------------------------------------------------------------ generate.py
TINY = ["--preset", "tiny", "--max-steps", "30", "--eval-interval", "30", "--no-progress", "--threads", "1"]
#: what the default prompt may be: a speaker heading ("MACBETH:", "First Witch:") or an act/scene line
HEADING = re.compile(r"^(?:(?:ACT|SCENE) [IVXLC\d]+\b.*|[A-Z][A-Za-z'.-]*(?: [A-Za-z'.-]+){0,3}:)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = write_play_excerpts(root / "text.txt", macbeth=60_000)
    subprocess.run([sys.executable, "train.py", *TINY, "--data", str(data), "--out-dir", str(root / "run")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return root / "run"


class _Stdin(io.StringIO):
    def __init__(self, text="", tty=False):
        super().__init__(text)
        self.tty = tty

    def isatty(self):
        return self.tty


def _run(capsys, monkeypatch, *argv, stdin=None):
    monkeypatch.setattr(sys, "stdin", stdin if stdin is not None else _Stdin(tty=True))
    code = gen_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flag, value, expected", [
    ("--top-p", "1.5", "in (0, 1]"), ("--top-p", "0", "in (0, 1]"), ("--top-p", "nan", "in (0, 1]"),
    ("--temperature", "inf", "finite"), ("--temperature", "nan", "finite"), ("--temperature", "-1", ">= 0"),
    ("--top-k", "-1", ">= 0"), ("--top-k", "2.5", "integer"), ("--max-new-tokens", "-1", ">= 0"),
    ("--num-samples", "0", ">= 1"), ("--num-draft-tokens", "0", ">= 1"), ("--window", "0", ">= 1"),
    ("--sink-tokens", "-1", ">= 0"), ("--kv-residual", "-2", ">= 0"), ("--seed", str(2 ** 64), "below 2**64"),
    ("--seed", "-1", ">= 0"), ("--device", "banana", "not a device"),
])
def test_cli_refuses_bad_flag_values_in_one_argparse_line(capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exc:
        gen_script.main(["--checkpoint", "nowhere", f"{flag}={value}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"generate.py: error: argument {flag}:") and value in last and expected in last, err
    assert "Traceback" not in err


def test_cli_refuses_devices_that_are_not_available(capsys):
    wanted = [d for d, ok in (("cuda", torch.cuda.is_available()), ("cuda:0", torch.cuda.is_available()),
                              ("mps", torch.backends.mps.is_available())) if not ok]
    if torch.cuda.is_available():
        wanted.append(f"cuda:{torch.cuda.device_count()}")
    for device in wanted:
        with pytest.raises(SystemExit) as exc:
            gen_script.main(["--checkpoint", "nowhere", "--device", device])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"argument --device: {device!r}" in err and "not available" in err, err


def test_cli_sink_tokens_that_fill_the_context_name_the_flags(run, capsys, monkeypatch):
    code, _, err = _run(capsys, monkeypatch, "--checkpoint", run, "--prompt", "MACBETH:", "--cache", "sinks",
                        "--sink-tokens", "100")
    assert code == 2
    assert len(err.strip().splitlines()) == 2  # the "[loaded ...]" line, then the one error line
    error = err.strip().splitlines()[-1]  # (the first line names a temporary folder: pytest-36 once made "-36")
    assert "--sink-tokens 100" in error and "--window" in error and "64" in error and "-36" not in error
    # --window given: any number of sink tokens is the user's choice
    code, _, err = _run(capsys, monkeypatch, "--checkpoint", run, "--prompt", "MACBETH:", "--cache", "sinks",
                        "--sink-tokens", "100", "--window", "8", "--max-new-tokens", "3")
    assert code == 0, err


def test_cli_tiny_temperature_prints_the_greedy_text(run, capsys, monkeypatch):
    argv = ["--checkpoint", run, "--prompt", "MACBETH:", "--max-new-tokens", "20", "--seed", "1"]
    code, greedy, _ = _run(capsys, monkeypatch, *argv, "--temperature", "0")
    assert code == 0
    code, tiny, err = _run(capsys, monkeypatch, *argv, "--temperature", "1e-45")
    assert code == 0 and tiny == greedy, err


def test_cli_prompt_ids_out_of_range(run, capsys, monkeypatch):
    code, _, err = _run(capsys, monkeypatch, "--checkpoint", run, "--prompt-ids", "5 512")
    assert code == 2 and "--prompt-ids" in err and "512" in err and "vocab_size=512" in err
    assert "IndexError" not in err


def test_cli_says_when_it_reads_the_prompt_from_stdin(run, capsys, monkeypatch):
    argv = ["--checkpoint", run, "--max-new-tokens", "3", "--temperature", "0"]
    code, out, err = _run(capsys, monkeypatch, *argv, stdin=_Stdin("MACBETH:"))
    assert code == 0 and out.startswith("MACBETH:")
    assert "reading the prompt from stdin" in err and "--prompt" in err
    code, out, err = _run(capsys, monkeypatch, *argv, "--prompt", "-", stdin=_Stdin("LADY MACBETH:", tty=True))
    assert code == 0 and out.startswith("LADY MACBETH:") and "reading the prompt from stdin" in err
    code, out, err = _run(capsys, monkeypatch, *argv, "--prompt", "MACBETH:", stdin=_Stdin("ignored"))
    assert code == 0 and out.startswith("MACBETH:") and "stdin" not in err


def test_default_prompt_starts_at_a_heading_of_the_held_out_text(run, capsys, monkeypatch):
    cfg = json.loads((run / "metrics.json").read_text())["train_config"]
    _, val = split_documents(load_corpus(cfg["data"]), cfg["val_fraction"], seed=cfg["seed"])
    held_out = set(val[0].text.splitlines())
    firsts = {}
    for seed in range(6):
        argv = ["--checkpoint", run, "--max-new-tokens", "8", "--seed", seed]
        code, out, err = _run(capsys, monkeypatch, *argv)
        assert code == 0, err
        first = out.splitlines()[0]
        assert HEADING.match(first) and first in held_out, out
        assert "held-out" in err
        assert _run(capsys, monkeypatch, *argv)[1] == out  # deterministic by seed
        firsts[seed] = first
    assert len(set(firsts.values())) > 1  # the seed picks the heading
    # piped empty stdin: the same default start
    assert _run(capsys, monkeypatch, "--checkpoint", run, "--max-new-tokens", "8", "--seed", 0,
                stdin=_Stdin(""))[1].splitlines()[0] == firsts[0]


def test_default_prompt_without_the_run_record_falls_back_with_a_note(run, tmp_path, capsys, monkeypatch):
    lone = tmp_path / "lone"
    shutil.copytree(run / "best", lone)  # a checkpoint directory with no metrics.json beside it
    code, out, err = _run(capsys, monkeypatch, "--checkpoint", lone, "--max-new-tokens", "5", "--seed", "0")
    assert code == 0 and "end-of-document" in err and "metrics.json" in err
