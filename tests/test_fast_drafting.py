"""The draft model on the fast path: ``FastDecoder.logits_at`` / ``greedy_draft`` and
``ModelDrafter(fast=True | compile=True)``.

What must hold: the fast step gives the logits of the model's ordinary forward; rolling back is
just writing at an earlier slot; ``greedy_draft``'s ``k`` tokens are those of ``k`` single
steps; compiling a new draft length in the middle of a sequence leaves the cache as it was;
and speculative decoding with the fast drafter gives the target's greedy output, keeps the draft
cache exact after every round, and samples the very tokens the ordinary drafter samples.
"""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_decoder
from spec_decoding import ModelDrafter, SpeculativeDecoder, speculative_generate
from transformer.fast_decode import FastDecoder, get_fast_decoder

V = 61


@pytest.fixture(scope="module")
def target():
    return tiny_decoder("gqa", "rope", seed=0)


@pytest.fixture(scope="module")
def draft(target):
    """A noisy copy of the target: agrees often, not always."""
    import copy

    d = copy.deepcopy(target)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.03)
    return d


def _last_logits(model, ids):
    with torch.no_grad():
        return model(ids)[:, -1].float()


@pytest.mark.parametrize("pos,attn", [("rope", "gqa"), ("learned", "mha")])
def test_logits_at_matches_the_ordinary_forward_and_rolls_back(pos, attn):
    model = tiny_decoder(attn, pos, seed=2)
    dec = FastDecoder(model, max_cache_len=40)
    dec.prepare()
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (1, 20), generator=g)
    # a prompt (one eager pass), then 3 tokens (single steps), then 1
    for start, end in ((0, 9), (9, 12), (12, 13)):
        got = dec.logits_at(seq[:, start:end], start)
        assert torch.allclose(got, _last_logits(model, seq[:, :end]), atol=1e-5), (start, end)
    # roll back to 7 tokens and continue with different ones: the old slots 7.. are invisible
    other = torch.cat([seq[:, :7], torch.randint(0, V, (1, 4), generator=g)], dim=1)
    got = dec.logits_at(other[:, 7:], 7)
    assert torch.allclose(got, _last_logits(model, other), atol=1e-5)


def test_greedy_draft_equals_single_steps_and_generate(target):
    dec = FastDecoder(target, max_cache_len=64)
    dec.prepare()
    ids = torch.randint(0, V, (1, 11), generator=torch.Generator().manual_seed(1))
    ref = target.generate(ids, 6)[0, 11:]
    for S in (1, 2, 3):  # S - 1 tokens the cache missed, then the last one
        dec.logits_at(ids[:, :11 - S], 0)
        got = dec.greedy_draft(ids[:, 11 - S:], 11 - S, 6)
        assert torch.equal(got[0], ref), S
    # the same k tokens from k single steps
    dec.logits_at(ids[:, :10], 0)
    x, steps = ids[:, 10:], []
    for i in range(6):
        x = dec.logits_at(x, 10 + i).argmax(-1, keepdim=True)
        steps.append(int(x))
    assert steps == ref.tolist()


def test_compiling_a_new_draft_length_mid_sequence_keeps_the_cache(target):
    """Compile warm-ups write cache slots 0..k-1; they must be restored (a new draft length can
    first appear in the middle of a generation, e.g. with adaptive drafting)."""
    eager = FastDecoder(target, max_cache_len=64)
    comp = FastDecoder(target, max_cache_len=64, compile=True, compile_options={})
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(3))
    for dec in (eager, comp):
        dec.prepare()
        dec.logits_at(ids[:, :11], 0)  # the prompt fills slots 0..10 (eager pass)
    for k in (3, 2):
        got, want = comp.greedy_draft(ids[:, 11:], 11, k), eager.greedy_draft(ids[:, 11:], 11, k)
        assert torch.equal(got, want), k
    assert torch.allclose(comp.logits_at(ids[:, 11:], 11), eager.logits_at(ids[:, 11:], 11), atol=1e-5)
    for layer in range(target.config.n_layers):
        assert torch.allclose(comp.cache.keys[layer][:, :, :12], eager.cache.keys[layer][:, :, :12], atol=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_fast_drafter_greedy_equals_target_greedy(target, draft, adaptive, cache):
    drafter = ModelDrafter(draft, fast=True)
    g = torch.Generator().manual_seed(7)
    for L, n_new in ((1, 9), (6, 30), (13, 41)):
        ids = torch.randint(0, V, (1, L), generator=g)
        ref = target.generate(ids, n_new)
        for k in (1, 3, 5):
            out, stats = speculative_generate(target, drafter, ids, n_new, num_draft_tokens=k, adaptive=adaptive,
                                              cache_implementation=cache)
            assert torch.equal(out, ref), (L, k)
            assert stats.draft_forward_passes >= stats.proposed_tokens



class _CompiledPolicyOnEagerSteps(ModelDrafter):
    """A compiled drafter's choice of draft lengths, run on eager FastDecoder steps (the same
    functions, uncompiled), so the test costs no compile time."""

    def reset(self, *args, **kwargs):
        self.compile = False
        super().reset(*args, **kwargs)
        self.compile = True


def test_compiled_drafter_builds_one_draft_length_per_request(target, draft):
    """Compiled, each draft length is a graph that takes up to a minute to build: the last
    rounds (fewer tokens left) and adaptive lengths must reuse the first round's function
    (truncated) or take single steps, never build new ones -- and keep the target's greedy output."""
    import copy

    g = torch.Generator().manual_seed(4)

    def run(drafter, k, **kw):
        ids = torch.randint(0, V, (1, 6), generator=g)
        out, stats = speculative_generate(target, drafter, ids, 37, num_draft_tokens=k, **kw)
        assert torch.equal(out, target.generate(ids, 37)), (k, kw)
        assert stats.draft_forward_passes >= stats.proposed_tokens
        return stats.proposed_per_round

    def fresh(model):  # a copy without the decoders other tests built on the module's models
        model = copy.deepcopy(model)
        model.__dict__.pop("_fast_decoders", None)
        return model

    noisy = _CompiledPolicyOnEagerSteps(fresh(draft), fast=True)
    assert run(noisy, 4)[-1] < 4                          # the last round drafts fewer
    assert min(run(noisy, 4, adaptive=True)) < 4          # rejections shrink the draft length
    assert noisy.decoder.greedy_draft_lengths() == [4]
    perfect = _CompiledPolicyOnEagerSteps(fresh(target), fast=True)  # always accepted: grows
    assert max(run(perfect, 2, adaptive=True, max_draft_tokens=5)) == 5
    assert perfect.decoder.greedy_draft_lengths() == [2]

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_drafter_cache_is_exact_after_every_round(target, draft, temperature):
    dec = SpeculativeDecoder(target, ModelDrafter(draft, fast=True), torch.tensor([[3, 1, 4, 1, 5, 9]]), 40,
                             num_draft_tokens=3, temperature=temperature, seed=0, adaptive=True)
    saw_reject = saw_bonus = False
    while not dec.finished:
        r = dec.step()
        n = dec.drafter.cache.get_seq_length()
        L = dec.tokens.shape[1]
        if r.proposed:  # the accepted prefix, minus the never-fed last draft after a full accept
            assert n == (L - 2 if r.bonus else L - 1)
        fresh = draft.new_cache("dynamic")
        with torch.no_grad():
            draft(dec.tokens[:, :n], cache=fresh)
        for layer in range(draft.config.n_layers):
            for a, b in zip(dec.drafter.cache.get(layer), fresh.get(layer)):
                assert torch.allclose(a, b, atol=1e-5)
        saw_reject |= r.accepted < len(r.proposed)
        saw_bonus |= r.bonus
    assert saw_reject and saw_bonus


def test_fast_drafter_samples_what_the_ordinary_drafter_samples(target, draft):
    """Same seed, same q (to float rounding): the same tokens and the same counters."""
    ids = torch.tensor([[2, 7, 1, 8]])
    for k in (2, 4):
        a, sa = speculative_generate(target, ModelDrafter(draft), ids, 40, num_draft_tokens=k, temperature=1.0,
                                     seed=11)
        b, sb = speculative_generate(target, ModelDrafter(draft, fast=True), ids, 40, num_draft_tokens=k,
                                     temperature=1.0, seed=11)
        assert torch.equal(a, b)
        assert (sa.accepted_per_round, sa.proposed_per_round) == (sb.accepted_per_round, sb.proposed_per_round)


def test_fast_drafting_errors_and_roles(target):
    dec = FastDecoder(target, max_cache_len=16)
    dec.prepare()
    with pytest.raises(ValueError, match="must lie in"):
        dec.logits_at(torch.zeros(1, 3, dtype=torch.long), 14)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        dec.greedy_draft(torch.zeros(1, 1, dtype=torch.long), 0, 0)
    with pytest.raises(ValueError, match="must lie in"):  # 1 token at slot 10, then 8 drafts: slots 10..17
        dec.greedy_draft(torch.zeros(1, 1, dtype=torch.long), 10, 8)
    with pytest.raises(ValueError, match="batch"):
        dec.logits_at(torch.zeros(2, 1, dtype=torch.long), 0)
    with pytest.raises(TypeError, match="compile must be a bool"):
        ModelDrafter(target, compile="yes")
    # a drafter and generate() on the same model keep separate decoders (separate caches)
    assert get_fast_decoder(target, 1, 30, False, role="draft") is not get_fast_decoder(target, 1, 30, False)
    assert get_fast_decoder(target, 1, 30, False, role="draft") is get_fast_decoder(target, 1, 20, False, role="draft")
