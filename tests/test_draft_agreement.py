"""``benchmarks/draft_agreement.py``: teacher-forced agreement predicts greedy speculative decoding.

The claim the script rests on: at temperature 0, the number of target passes of
``speculative_generate`` follows from one teacher-forced pass of the draft over the target's
own greedy text.  Checked here against real speculative runs for several draft lengths.
"""

import copy

import pytest
import torch

from benchmarks.draft_agreement import greedy_agreement, heldout_prompts, measure, tokens_per_pass
from helpers import tiny_decoder
from spec_decoding import speculative_generate
from transformer.tokenizer import ByteTokenizer


def test_tokens_per_pass_by_hand():
    assert tokens_per_pass([True] * 10, 4) == 5.0              # rounds of 4 guesses + 1 bonus token
    assert tokens_per_pass([False] * 6, 3) == 1.0              # every guess rejected: one token per pass
    # k=2: round 1 accepts 1 (agree, miss) -> 2 tokens; round 2 accepts 2 -> 3 tokens; round 3: the
    # last token, no room for guesses -> 1 token.  6 tokens in 3 passes.
    assert tokens_per_pass([True, False, True, True, True, True], 2) == 2.0


@pytest.fixture(scope="module")
def pair():
    target = tiny_decoder("gqa", "rope", seed=0)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)   # a near copy: agrees often, not always
    return target, draft


@pytest.mark.parametrize("k", [1, 3, 5])
def test_replay_equals_real_speculative_runs(pair, k):
    target, draft = pair
    prompts = torch.randint(0, 61, (4, 7), generator=torch.Generator().manual_seed(1))
    n = 30
    seqs = target.generate(prompts, n, eos_token_id=None)
    agree = greedy_agreement(draft, seqs, 7)
    assert agree.shape == (4, n) and 0.2 < agree.float().mean() < 1.0  # some rejections to replay
    for row, a in zip(prompts, agree):
        _, stats = speculative_generate(target, draft, row[None], n, num_draft_tokens=k, eos_token_id=None)
        assert stats.target_forward_passes == round(n / tokens_per_pass(a.tolist(), k))


def test_measure_rows_and_heldout_prompts(pair, tmp_path):
    target, draft = pair
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(300)))
    tok = ByteTokenizer()
    prompts = heldout_prompts(tok, 5, 12, data=str(text))
    assert prompts.shape == (5, 12)
    prompts = prompts % 61                                          # the tiny models' vocabulary
    rows = measure(target, {"near copy": draft, "itself": target}, prompts, 10, (1, 4), batch_size=2)
    assert [r["draft"] for r in rows] == ["near copy", "itself"]
    assert rows[1]["agreement"] == 1.0 and rows[1]["tokens_per_pass_k4"] == 10 / 2   # 5 + 5
    assert rows[0]["agreement"] < 1.0 and 1.0 <= rows[0]["tokens_per_pass_k1"] <= 2.0
