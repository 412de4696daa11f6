"""Speculative decoding end to end: greedy output equals the target's, caches stay exact after
every round, statistics add up, adaptive drafting stays in bounds, bad arguments are refused.

Models are tiny (``helpers.tiny_decoder``, weights with std 0.25 so greedy ties are vanishingly
unlikely).  Drafts that get *some* tokens right come from a copy of the target with noise added
to its weights; a smaller unrelated model is a draft that is nearly always wrong; the target
itself is a draft that is always right (exercising the bonus token and the draft catch-up).
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import tiny_decoder
from spec_decoding import (ModelDrafter, PromptLookupDrafter, SpecDecodingPair, SpecDecodingStats,
                           SpeculativeDecoder, find_ngram_continuation, format_stats, speculative_generate)

V = 61



def noisy_copy(model, std=0.01, seed=5):
    """The model with N(0, std) added to every weight: a draft that agrees often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return draft


@pytest.fixture(scope="module")
def target():
    return tiny_decoder(seed=0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"noisy": noisy_copy(target), "small": tiny_decoder("mqa", seed=1, d_model=16, n_layers=1),
            "same": target}


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, L), generator=g) for L in (1, 5, 12)][:n]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("draft_kind", ["noisy", "small", "same"])
def test_greedy_equals_target_greedy(target, drafts, cache, adaptive, draft_kind):
    draft = drafts[draft_kind]
    for i, ids in enumerate(prompts()):
        n_new = (1, 17, 40)[i]
        ref = target.generate(ids, n_new, cache_implementation=cache)
        for k in range(1, 7):
            out, stats = speculative_generate(target, draft, ids, n_new, num_draft_tokens=k,
                                              cache_implementation=cache, adaptive=adaptive)
            assert torch.equal(out, ref), (draft_kind, k, ids.shape)
            assert stats.generated_tokens == n_new
            assert stats.target_forward_passes == stats.rounds <= n_new
            if draft_kind == "same" and not adaptive:  # every draft right: k + 1 tokens per pass
                assert stats.accepted_tokens == stats.proposed_tokens
                assert stats.rounds == -(-n_new // (k + 1))


@pytest.mark.parametrize("pos,attn", [("rope", "gqa"), ("learned", "mqa")])
def test_greedy_other_architectures(pos, attn):
    target = tiny_decoder(attn, pos, seed=3)
    draft = noisy_copy(target, 0.01)
    ids = prompts(seed=1)[2]
    ref = target.generate(ids, 30)
    for cache in ("dynamic", "static"):
        for k in (1, 3, 5):
            out, stats = speculative_generate(target, draft, ids, 30, num_draft_tokens=k, cache_implementation=cache)
            assert torch.equal(out, ref)
            assert 0 < stats.accepted_tokens < stats.proposed_tokens


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_prompt_lookup_equals_target_greedy(target, cache, adaptive):
    g = torch.Generator().manual_seed(2)
    base = torch.randint(0, V, (6,), generator=g)
    cases = [base.repeat(3)[None], torch.randint(0, V, (1, 9), generator=g), torch.tensor([[7]])]
    total_accepted = 0
    for ids in cases:
        ref = target.generate(ids, 40, cache_implementation=cache)
        for k in (1, 3, 6):
            for ngram in (1, 3):
                out, stats = speculative_generate(target, PromptLookupDrafter(max_ngram=ngram), ids, 40,
                                                  num_draft_tokens=k, cache_implementation=cache, adaptive=adaptive)
                assert torch.equal(out, ref)
                assert stats.draft_forward_passes == 0
                total_accepted += stats.accepted_tokens
    assert total_accepted > 0  # random greedy models fall into loops that lookup predicts


def _assert_cache_matches(model, cache, tokens, length):
    """``cache`` holds exactly what a plain forward over ``tokens[:, :length]`` would store."""
    assert cache.get_seq_length() == length
    fresh = model.new_cache("dynamic")
    model(tokens[:, :length], cache=fresh)
    for layer in range(model.config.n_layers):
        (k, v), (k_ref, v_ref) = cache.get(layer), fresh.get(layer)
        assert torch.allclose(k, k_ref, atol=1e-5, rtol=1e-5)
        assert torch.allclose(v, v_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("draft_kind", ["noisy", "same"])
def test_caches_after_every_round_equal_a_fresh_prefill(target, drafts, cache, temperature, draft_kind):
    draft = drafts[draft_kind]
    ids = prompts()[1]
    dec = SpeculativeDecoder(target, draft, ids, 40, num_draft_tokens=3, temperature=temperature, seed=0,
                             cache_implementation=cache, adaptive=True)
    saw_lag = saw_reject = False
    expected = 0
    with torch.no_grad():
        while not dec.finished:
            r = dec.step()
            L = dec.tokens.shape[1]
            _assert_cache_matches(target, dec.target_cache, dec.tokens, L - 1)
            d_len = dec.drafter.cache.get_seq_length()
            # the draft never fed its last draft: one token behind after a fully accepted round
            # (a round without drafts leaves the draft cache as it was)
            if r.proposed:
                expected = L - 2 if r.bonus else L - 1
            assert d_len == expected, (r, d_len, L)
            _assert_cache_matches(draft, dec.drafter.cache, dec.tokens, d_len)
            saw_lag |= d_len == L - 2
            saw_reject |= r.accepted < len(r.proposed)
    assert saw_lag
    assert saw_reject or draft_kind == "same"


def test_stats_add_up(target, drafts):
    ids = prompts()[1]
    out, stats = speculative_generate(target, drafts["noisy"], ids, 40, num_draft_tokens=4, temperature=0.8, seed=1)
    assert isinstance(stats, SpecDecodingStats)
    assert stats.generated_tokens == out.shape[1] - ids.shape[1] == 40
    assert stats.proposed_tokens == sum(stats.proposed_per_round)
    assert stats.accepted_tokens == sum(stats.accepted_per_round)
    assert stats.generated_tokens == stats.accepted_tokens + stats.rounds  # each round adds one target token
    assert stats.draft_forward_passes == stats.proposed_tokens
    assert stats.tokens_per_target_pass == pytest.approx(40 / stats.target_forward_passes)
    assert 0 < stats.acceptance_rate < 1 and stats.wall_time_s > 0 and stats.tokens_per_s > 0
    assert all(0 <= a <= p <= 4 for a, p in zip(stats.accepted_per_round, stats.proposed_per_round))
    d = stats.to_dict()
    assert d["rounds"] == stats.rounds and d["acceptance_rate"] == stats.acceptance_rate
    line = format_stats(stats)
    assert "40 tokens" in line and "target passes" in line and "accepted" in line


def test_sampling_is_reproducible_and_seed_dependent(target, drafts):
    ids = prompts()[1]
    runs = [speculative_generate(target, drafts["noisy"], ids, 30, temperature=1.0, top_k=20, top_p=0.9, seed=s)[0]
            for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(speculative_generate(target, drafts["noisy"], ids, 30, temperature=1.0, top_k=20,
                                            top_p=0.9, generator=g)[0], runs[0])
    # do_sample=False forces greedy whatever the temperature (the convention of generate)
    assert torch.equal(speculative_generate(target, drafts["noisy"], ids, 30, temperature=1.0, do_sample=False)[0],
                       target.generate(ids, 30))


def test_adaptive_draft_length_grows_and_shrinks_within_bounds(target, drafts):
    ids = prompts()[1]
    _, good = speculative_generate(target, drafts["same"], ids, 60, num_draft_tokens=2, adaptive=True,
                                   max_draft_tokens=5)
    assert good.proposed_per_round[:4] == [2, 3, 4, 5] and max(good.proposed_per_round) == 5
    _, bad = speculative_generate(target, drafts["small"], ids, 60, num_draft_tokens=4, adaptive=True)
    # (a last round may propose 0: the round's own target token fills the budget)
    assert bad.proposed_per_round[0] == 4 and min(p for p in bad.proposed_per_round if p) == 1
    assert max(bad.proposed_per_round) <= 8  # default bound 2 * num_draft_tokens
    _, fixed = speculative_generate(target, drafts["small"], ids, 60, num_draft_tokens=4)
    done = 0  # without adaptive: k drafts per round, fewer only where the token budget ends
    for proposed, accepted in zip(fixed.proposed_per_round, fixed.accepted_per_round):
        assert proposed == min(4, 60 - done - 1)
        done += accepted + 1


def test_eos_stops_like_generate(target, drafts):
    ids = prompts()[2]
    free = target.generate(ids, 40, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 6])
    ref = target.generate(ids, 40, eos_token_id=eos)
    assert ref.shape[1] < free.shape[1]
    for draft in (drafts["noisy"], drafts["same"], PromptLookupDrafter()):
        out, stats = speculative_generate(target, draft, ids, 40, eos_token_id=eos, num_draft_tokens=4)
        assert torch.equal(out, ref)
        assert stats.generated_tokens == ref.shape[1] - ids.shape[1]


def test_streamer_sees_every_token_in_order(target, drafts):
    ids = prompts()[1]
    seen = []
    out, _ = speculative_generate(target, drafts["noisy"], ids, 25, streamer=lambda t: seen.append(int(t)))
    assert seen == out[0, ids.shape[1]:].tolist()


def test_edge_lengths(target, drafts):
    ids = prompts()[0]  # a single-token prompt
    out, stats = speculative_generate(target, drafts["noisy"], ids, 0)
    assert torch.equal(out, ids) and stats.target_forward_passes == 0
    out, stats = speculative_generate(target, drafts["noisy"], ids, 1, num_draft_tokens=4)
    assert torch.equal(out, target.generate(ids, 1)) and stats.proposed_tokens == 0  # no room for drafts
    full = target.config.max_seq_len - 5
    long_ids = torch.randint(0, V, (1, 5))
    out, _ = speculative_generate(target, drafts["noisy"], long_ids, full, num_draft_tokens=6,
                                  cache_implementation="static")
    assert torch.equal(out, target.generate(long_ids, full))


def test_models_restored_to_training_mode(target, drafts):
    draft = noisy_copy(target)
    target_mode = target.training
    draft.train()
    speculative_generate(target, draft, prompts()[1], 5)
    assert draft.training and target.training == target_mode


def test_find_ngram_continuation():
    t = torch.tensor
    assert find_ngram_continuation(t([5, 7, 9, 2, 5, 7]), 3, max_ngram=2).tolist() == [9, 2, 5]
    # the copy runs into the present: the text repeats with the match's period
    assert find_ngram_continuation(t([5, 7, 9, 2, 5, 7]), 7, max_ngram=2).tolist() == [9, 2, 5, 7, 9, 2, 5]
    assert find_ngram_continuation(t([4, 4, 4]), 5).tolist() == [4, 4, 4, 4, 4]
    # the most recent earlier match wins
    assert find_ngram_continuation(t([1, 2, 1, 3, 1]), 3, max_ngram=1).tolist() == [3, 1, 3]
    # longer n-grams first: [2 1] matched at 0 (followed by 3), although [1] alone last matched at 4
    assert find_ngram_continuation(t([2, 1, 3, 0, 1, 4, 2, 1]), 1, max_ngram=2).tolist() == [3]
    assert find_ngram_continuation(t([1, 2, 3]), 4).tolist() == []
    assert find_ngram_continuation(t([3]), 2).tolist() == []
    assert find_ngram_continuation(t([1, 2, 9, 2]), 2, max_ngram=2, min_ngram=2).tolist() == []


def test_spec_decoding_pair(target, drafts):
    draft = drafts["noisy"]
    pair = SpecDecodingPair(draft, target, num_draft_tokens=3)
    empty = pair.get_comprehensive_stats()
    assert empty["target_model_cache"]["seq_length"] == 0
    ids = prompts()[1]
    out = pair.generate(ids, 30)
    assert torch.equal(out, target.generate(ids, 30))
    assert torch.equal(pair(ids, 30), out)
    s = pair.get_comprehensive_stats()
    assert set(s) == {"draft_model_cache", "target_model_cache", "speculation"}
    L = out.shape[1]
    assert s["target_model_cache"]["seq_length"] == L - 1
    assert s["draft_model_cache"]["seq_length"] in (L - 1, L - 2)
    for key in ("draft_model_cache", "target_model_cache"):
        assert s[key]["memory_bytes"] > 0 and s[key]["cache_type"] == "DynamicKVCache"
    assert s["target_model_cache"]["forward_passes"] == pair.last_stats.target_forward_passes
    assert s["draft_model_cache"]["forward_passes"] == pair.last_stats.draft_forward_passes
    assert s["speculation"]["accepted_tokens"] == pair.last_stats.accepted_tokens

    static = pair.generate(ids, 30, cache_implementation="static", adaptive=True)
    assert torch.equal(static, out)
    st = pair.get_comprehensive_stats()["target_model_cache"]
    assert st["cache_type"] == "StaticKVCache" and st["max_cache_len"] == ids.shape[1] + 30

    # one round, phase by phase (the guide's method names)
    sampled = SpecDecodingPair(target, target, num_draft_tokens=4, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    d_tok, d_probs = sampled.generate_draft_sequence(ids, generator=g)
    assert d_tok.shape == (1, 4) and d_probs.shape == (1, 4, V)
    t_probs = sampled.verify_draft_with_target(ids, d_tok)
    assert t_probs.shape == (1, 5, V) and torch.allclose(t_probs.sum(-1), torch.ones(1, 5))
    n, token = sampled.process_acceptance_and_resampling(d_probs, t_probs, d_tok, g)
    assert n == 4 and 0 <= token < V  # draft == target: p == q, everything accepted


def test_errors(target, drafts):
    ids = prompts()[1]
    draft = drafts["noisy"]
    with pytest.raises(ValueError, match="batch size 2"):
        speculative_generate(target, draft, ids.repeat(2, 1), 5)
    other = tiny_decoder(seed=1, vocab_size=50)
    with pytest.raises(ValueError, match=r"draft vocab_size=50.*target vocab_size=61"):
        speculative_generate(target, other, ids, 5)
    with pytest.raises(ValueError, match=r"draft vocab_size=50.*target vocab_size=61"):
        SpecDecodingPair(other, target)
    for k in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match=f"num_draft_tokens must be an int >= 1, got {k!r}"):
            speculative_generate(target, draft, ids, 5, num_draft_tokens=k)
    with pytest.raises(ValueError, match="max_draft_tokens=2 must be >= num_draft_tokens=4"):
        speculative_generate(target, draft, ids, 5, num_draft_tokens=4, max_draft_tokens=2)
    for kw, word in ((dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
                     (dict(temperature=1.0, top_k=0), "top_k"), (dict(temperature=1.0, top_p=0.0), "top_p"),
                     (dict(temperature=1.0, top_p=1.5), "top_p")):
        with pytest.raises(ValueError, match=word):
            speculative_generate(target, draft, ids, 5, **kw)
    with pytest.raises(ValueError, match="cache_implementation='paged'"):
        speculative_generate(target, draft, ids, 5, cache_implementation="paged")
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        speculative_generate(target, draft, ids, -1)
    with pytest.raises(ValueError, match="either generator or seed"):
        speculative_generate(target, draft, ids, 5, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="input_ids must be a"):
        speculative_generate(target, draft, ids[0], 5)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        speculative_generate(target, draft, ids, 128)
    short = tiny_decoder(seed=2, max_seq_len=16)
    with pytest.raises(ValueError, match="draft model's max_seq_len=16"):
        speculative_generate(target, short, ids, 20)
    with pytest.raises(TypeError, match="draft must be"):
        speculative_generate(target, "not a model", ids, 5)
    for kw, msg in ((dict(max_ngram=0), "max_ngram must be an int >= 1, got 0"),
                    (dict(max_ngram=2, min_ngram=3), "min_ngram=3 must be <= max_ngram=2")):
        with pytest.raises(ValueError, match=msg):
            PromptLookupDrafter(**kw)
    dec = SpeculativeDecoder(target, draft, ids, 0)
    with pytest.raises(RuntimeError, match="finished"):
        dec.step()


def test_model_drafter_is_a_drafter(drafts):
    from spec_decoding import Drafter
    assert isinstance(ModelDrafter(drafts["small"]), Drafter)
    assert isinstance(PromptLookupDrafter(), Drafter)


def test_greedy_pair_phases_use_point_masses(target, drafts):
    pair = SpecDecodingPair(drafts["noisy"], target, num_draft_tokens=3)  # temperature 0
    ids = prompts()[1]
    d_tok, d_probs = pair.generate_draft_sequence(ids)
    assert torch.equal(d_probs.argmax(-1), d_tok) and torch.equal(d_probs.sum(-1), torch.ones(1, 3))
    t_probs = pair.verify_draft_with_target(ids, d_tok)
    n, token = pair.process_acceptance_and_resampling(d_probs, t_probs, d_tok)
    ref = target.generate(ids, n + 1)[0, ids.shape[1]:].tolist()
    assert d_tok[0, :n].tolist() + [token] == ref
