"""Sampling: what each filter keeps, in which order they compose, and that draws follow the
processed distribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer.sampling import (process_logits, process_logits_rows, sample_next_token, top_k_filter, top_p_filter,
                                  validate_sampling_args)

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, k=st.integers(1, 45))
def test_top_k_keeps_exactly_k_largest(row, k):
    logits = torch.tensor([row])
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out[0])
    assert int(kept.sum()) == min(k, len(row))
    # every kept logit is >= every removed one, and kept values are unchanged
    if kept.any() and (~kept).any():
        assert logits[0][kept].min() >= logits[0][~kept].max()
    assert torch.equal(out[0][kept], logits[0][kept])


def test_top_k_with_ties_keeps_exactly_k():
    out = top_k_filter(torch.zeros(1, 10), 3)
    assert int(torch.isfinite(out).sum()) == 3


@settings(max_examples=200, deadline=None)
@given(row=logit_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_smallest_set_reaching_p(row, p):
    logits = torch.tensor([row], dtype=torch.float64)
    out = top_p_filter(logits, p)
    kept = torch.isfinite(out[0])
    probs = torch.softmax(logits[0], -1)
    kept_mass = float(probs[kept].sum())
    assert kept.any()
    assert kept_mass >= p - 1e-9 or bool(kept.all())
    # minimal: dropping the least likely kept token falls below p
    if int(kept.sum()) > 1:
        assert kept_mass - float(probs[kept].min()) < p + 1e-9
    # it is a top set: nothing removed is more likely than something kept
    if (~kept).any():
        assert probs[~kept].max() <= probs[kept].min() + 1e-12


def test_top_p_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_combined_order_is_temperature_then_top_k_then_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    out = process_logits(logits, temperature=2.0, top_k=3, top_p=0.7)
    # temperature 2 -> [2, 1.5, 1, .5, 0]; top-3 -> renormalised over 3; top-p 0.7 of that
    t = logits / 2.0
    p3 = torch.softmax(t[:, :3], -1)[0]
    expect_keep = 1 + int(p3[0] < 0.7) + int(p3[0] + p3[1] < 0.7)
    assert int(torch.isfinite(out).sum()) == expect_keep
    assert torch.allclose(out[0, :expect_keep], t[0, :expect_keep])


def test_temperature_zero_and_do_sample_false_are_greedy():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample_next_token(logits, do_sample=True, temperature=0, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, do_sample=False, temperature=5.0), logits.argmax(-1))


def test_a_filter_no_row_uses_can_be_left_out():
    """``top_k``/``top_p`` of ``None`` (no row filters; the engine then skips the sort) give
    what no-op filters (``k = V``, ``p = 1``) give, bit for bit."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 50, generator=g) * 4
    temperature = torch.tensor([0.3, 1.0, 1.7, 0.9])
    k, p = torch.tensor([50, 3, 50, 7]), torch.tensor([1.0, 1.0, 0.6, 0.8])
    none_k, none_p = torch.full((4,), 50), torch.ones(4)
    full = process_logits_rows(logits, temperature, none_k, none_p)
    assert torch.equal(process_logits_rows(logits, temperature, None, None), full)
    assert torch.isfinite(full).all()
    assert torch.equal(process_logits_rows(logits, temperature, k, None), process_logits_rows(logits, temperature, k,
                                                                                               none_p))
    assert torch.equal(process_logits_rows(logits, temperature, None, p), process_logits_rows(logits, temperature,
                                                                                               none_k, p))


def test_a_temperature_of_none_is_one_in_every_row_bit_for_bit():
    """``temperature=None`` (the engine passes it when every sampled row is at 1) gives what a
    temperature of 1.0 per row gives, bit for bit, with no filter, top-k, top-p and a width."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 300, generator=g) * 3
    ones = torch.ones(5)
    k, p = torch.tensor([300, 4, 20, 300, 9]), torch.tensor([1.0, 0.9, 0.5, 0.7, 1.0])
    for top_k, top_p, width in ((None, None, None), (k, None, None), (None, p, None), (k, p, None), (k, p, 24)):
        got = process_logits_rows(logits, None, top_k, top_p, width)
        assert torch.equal(got, process_logits_rows(logits, ones, top_k, top_p, width)), (top_k, top_p, width)
    assert torch.equal(process_logits_rows(logits, None, None, None), logits)  # the logits as they are


@settings(max_examples=200, deadline=None)
@given(data=st.data(), B=st.integers(1, 6), V=st.integers(2, 40), width=st.integers(1, 40),
       scale=st.sampled_from([0.5, 3.0, 12.0]), seed=st.integers(0, 2 ** 16))
def test_sorting_only_the_top_candidates_filters_as_the_full_sort(data, B, V, width, scale, seed):
    """``process_logits_rows(..., width=w)`` sorts each row's ``w`` best logits only, and must
    keep exactly the tokens (and values) the full sort keeps -- or decline and sort them all:
    random rows, temperatures, top-k (some wider than ``w``: declined) and top-p (a mass that
    ends past the ``w`` candidates: declined), flat and peaked logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * scale
    temperature = torch.tensor(data.draw(st.lists(st.sampled_from([0.5, 1.0, 1.7]), min_size=B, max_size=B)))
    ks = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([1, 2, 5, 17, V]), min_size=B, max_size=B)))
    ps = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([0.2, 0.7, 0.95, 1.0]), min_size=B, max_size=B)))
    top_k = None if ks is None else torch.tensor([min(k, V) for k in ks])
    top_p = None if ps is None else torch.tensor(ps)
    full = process_logits_rows(logits, temperature, top_k, top_p)
    narrow = process_logits_rows(logits, temperature, top_k, top_p, width=min(width, V))
    assert torch.equal(torch.isfinite(narrow), torch.isfinite(full))
    kept = torch.isfinite(full)
    assert torch.equal(narrow[kept], full[kept])


def test_sorting_the_top_candidates_is_used_when_it_decides(monkeypatch):
    """The narrow path really runs (no full sort) for a peaked row and for top-k rows, and the
    full sort runs when a flat row's top-p mass lies beyond the candidates."""
    import transformer.sampling as sampling
    sorts = []
    real = torch.sort
    monkeypatch.setattr(sampling.torch, "sort", lambda *a, **k: sorts.append(1) or real(*a, **k))
    peaked = torch.tensor([[9.0, 8.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    t = torch.tensor([1.0])
    assert torch.isfinite(process_logits_rows(peaked, t, None, torch.tensor([0.9]), width=3)).sum() == 2
    assert torch.isfinite(process_logits_rows(peaked, t, torch.tensor([3]), None, width=3)).sum() == 3
    assert sorts == []
    flat = torch.zeros(1, 8)
    assert torch.isfinite(process_logits_rows(flat, t, None, torch.tensor([0.9]), width=3)).sum() == 8
    assert sorts == [1]


@pytest.mark.parametrize("settings_", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                       dict(temperature=1.3, top_p=0.8), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_empirical_frequencies_match_processed_distribution(settings_):
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    expected = torch.softmax(process_logits(logits, **settings_), -1)[0]
    n = 40_000
    g = torch.Generator().manual_seed(0)
    draws = sample_next_token(logits.expand(n, -1), do_sample=True, generator=g, **settings_)
    freq = torch.bincount(draws, minlength=logits.shape[-1]).double() / n
    # removed tokens are never drawn
    assert freq[expected == 0].sum() == 0
    # chi-square goodness of fit over the kept tokens (df <= 7): 0.1% critical value < 25
    keep = expected > 0
    e = expected[keep].double() * n
    o = freq[keep] * n
    chi2 = float(((o - e) ** 2 / e).sum())
    assert chi2 < 25, chi2
    assert math.isclose(float(freq.sum()), 1.0, rel_tol=1e-9)


@pytest.mark.parametrize("kwargs, name", [(dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"),
                                          (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
                                          (dict(top_p=1.5), "top_p"), (dict(temperature=float("nan")), "temperature")])
def test_invalid_sampling_values_raise_named_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        validate_sampling_args(**kwargs)


# ------------------------------------------------------------------ one settings object
def test_one_settings_object_resolves_greedy_alike_for_every_path():
    import spec_decoding
    from spec_decoding import rule
    from transformer.sampling import SamplingSettings
    assert spec_decoding.SamplingSettings is SamplingSettings and rule.SamplingSettings is SamplingSettings
    assert SamplingSettings().greedy  # the speculative default: temperature 0
    assert not SamplingSettings(0.7).greedy and SamplingSettings(0.7).do_sample is True  # unset: T > 0 samples
    assert SamplingSettings(1.0, do_sample=False).greedy  # generate()'s default
    assert SamplingSettings(0.0, do_sample=True).greedy  # temperature 0 is greedy whatever do_sample says
    s = SamplingSettings(0.8, top_k=5, top_p=0.9, eos_token_id=torch.tensor(3))
    assert s.eos_token_id == 3 and type(s.eos_token_id) is int
    assert s.generate_kwargs() == dict(do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    g = SamplingSettings(1.0, seed=5).make_generator()
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert SamplingSettings(1.0).make_generator() is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=1.5), r"seed must be None or an int .*got 1.5"),
    (dict(seed=2 ** 64), r"seed must be None or an int .*got 18446744073709551616"),
    (dict(generator=3), r"generator must be None or a torch.Generator, got 3"),
    (dict(eos_token_id=2.0), r"eos_token_id must be None or an int token id or a non-empty list of them .*, got 2.0"),
    (dict(eos_token_id=True), r"eos_token_id must be None or an int token id or a non-empty list of them .*, got True"),
    (dict(seed=1, generator=torch.Generator()), r"either generator or seed"),
])
def test_seed_generator_and_stop_are_checked_by_the_same_validator(kwargs, message):
    from transformer.sampling import SamplingSettings
    with pytest.raises(ValueError, match=message):
        SamplingSettings(1.0, **kwargs)
    with pytest.raises(ValueError, match=message):
        validate_sampling_args(**kwargs)


def test_cache_kinds_are_defined_once():
    from transformer.generation import CACHE_IMPLEMENTATIONS, EXACT_CACHES, LONG_CONTEXT_CACHES
    assert CACHE_IMPLEMENTATIONS == EXACT_CACHES + LONG_CONTEXT_CACHES
    assert set(EXACT_CACHES) == {"dynamic", "static"}  # what speculative decoding and fast=True take


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=12, max_size=12),
                               st.sampled_from([0.05, 0.7, 1.0, 1.6]), st.sampled_from([None, 1, 3, 12]),
                               st.sampled_from([None, 0.3, 0.9, 1.0])), min_size=1, max_size=5))
def test_per_row_settings_in_one_batch_equal_each_row_alone(rows):
    """The engine's batched logits processing gives every row what process_logits gives it alone."""
    logits = torch.tensor([r for r, *_ in rows])
    temperature = torch.tensor([t for _, t, _, _ in rows])
    top_k = torch.tensor([12 if k is None else k for _, _, k, _ in rows])
    top_p = torch.tensor([1.0 if p is None else p for *_, p in rows])
    got = process_logits_rows(logits, temperature, top_k, top_p)
    for b, (_, t, k, p) in enumerate(rows):
        want = process_logits(logits[b:b + 1], t, k, p)[0]
        kept = torch.isfinite(want)
        # the same tokens survive (a tie at the top-k boundary, also one made by the temperature
        # rounding two logits to one value, may keep a different one of the equal logits)
        if len(set(process_logits(logits[b:b + 1], t)[0].tolist())) == logits.shape[1]:
            assert torch.equal(torch.isfinite(got[b]), kept), (b, t, k, p)
            torch.testing.assert_close(got[b][kept], want[kept])


@pytest.mark.parametrize("settings_", [dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                       dict(temperature=1.3, top_p=0.8), dict(temperature=0.8, top_k=5, top_p=0.9)])
def test_engine_sampler_draws_from_the_processed_distribution(settings_):
    """The exponential race (argmax p / E, E ~ Exp(1)) of the engine's sampler is a draw from p."""
    from transformer.engine.request import Request, SamplingParams
    from transformer.engine.sampler import sample_step

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    expected = torch.softmax(process_logits(logits, **settings_), -1)[0]
    n = 20_000  # requests with seeds 0 .. n-1, 500 to a step, each drawing its first token
    reqs = [Request(str(i), [0], SamplingParams(seed=i, **settings_), seed=i) for i in range(n)]
    draws = torch.cat([sample_step(logits.expand(500, -1), reqs[s:s + 500]) for s in range(0, n, 500)])
    freq = torch.bincount(draws, minlength=logits.shape[-1]).double() / n
    assert freq[expected == 0].sum() == 0
    keep = expected > 0
    e, o = expected[keep].double() * n, freq[keep] * n
    assert float(((o - e) ** 2 / e).sum()) < 25
