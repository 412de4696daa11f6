"""Sampled speculative decoding follows the target's distribution, end to end.

An 8-token vocabulary keeps the joint distribution of a 3-token continuation small (512
outcomes), so it can be computed *exactly* from the target alone (one batched forward pass per
position, with ``transformer.sampling.process_logits``: no speculative code involved).  Then,
with fixed seeds:

* thousands of speculative continuations (draft model; prompt lookup) pass a chi-square
  goodness-of-fit test against the exact distribution, and a two-sample chi-square test
  against as many continuations sampled from the target alone by ``target.generate``;
* the same test flags the draft model's own samples, and speculative samples made with a
  broken residual (``p`` instead of ``normalize(max(0, p - q))``): it has the power to see a
  wrong rule.

The critical values are fixed (Wilson-Hilferty approximation of the chi-square quantile at
``p ~ 5e-4``), so scipy is not needed.  Runs in about 10 s on one busy core.
"""

from __future__ import annotations

import math

import pytest
import torch

import spec_decoding.rule
from helpers import tiny_decoder
from spec_decoding import PromptLookupDrafter, speculative_generate
from transformer.sampling import process_logits

V, NEW, N = 8, 3, 3000



@pytest.fixture(scope="module")
def models():
    small = dict(vocab_size=V, d_model=16, n_layers=1, n_heads=2)
    return tiny_decoder("mqa", seed=11, **small), tiny_decoder("mqa", seed=12, **small)


def exact_joint(model, prompt, n, **sampling):
    """``(V**n,)`` probabilities of every ``n``-token continuation (index = base-V number)."""
    seqs, logp = prompt, torch.zeros(1, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            probs = torch.softmax(process_logits(model(seqs)[:, -1], **sampling), -1).double()
            B = seqs.shape[0]
            seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(B)[:, None]], 1)
            logp = (logp[:, None] + probs.log()).reshape(-1)
    return logp.exp()


def outcome_index(continuations):
    """``(N, n)`` token rows -> ``(N,)`` base-V indices matching :func:`exact_joint`."""
    n = continuations.shape[1]
    return (continuations * V ** torch.arange(n - 1, -1, -1)).sum(1)


def chi2_critical(df, z=3.29):
    """Upper chi-square(df) quantile at about 1 - 5e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def goodness_of_fit(counts, probs):
    """Chi-square statistic and critical value of ``counts`` against ``probs``.

    Cells expecting fewer than 5 draws are pooled into one.  A draw in a cell of probability 0
    fails outright (returns ``inf``).
    """
    if counts[probs == 0].sum() > 0:
        return math.inf, 0.0
    expected = counts.sum() * probs
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return stat, chi2_critical(int(keep.sum()) - 1)


def two_sample(a, b):
    """Chi-square statistic for equal-size samples ``a``, ``b`` (counts per cell); small cells pooled."""
    big = (a + b) >= 10
    a2 = torch.cat([a[big], a[~big].sum().view(1)])
    b2 = torch.cat([b[big], b[~big].sum().view(1)])
    keep = (a2 + b2) > 0
    stat = float(((a2[keep] - b2[keep]) ** 2 / (a2[keep] + b2[keep])).sum())
    return stat, chi2_critical(int(keep.sum()) - 1)


def speculative_counts(target, draft, prompt, seed, n=N, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V ** NEW, dtype=torch.float64)
    accepted = proposed = 0
    for _ in range(n):
        out, stats = speculative_generate(target, draft, prompt, NEW, generator=g, **kw)
        counts[outcome_index(out[:, prompt.shape[1]:])] += 1
        accepted += stats.accepted_tokens
        proposed += stats.proposed_tokens
    return counts, accepted / proposed


def generate_counts(model, prompt, seed, **sampling):
    g = torch.Generator().manual_seed(seed)
    out = model.generate(prompt.repeat(N, 1), NEW, do_sample=True, generator=g, eos_token_id=None, **sampling)
    return torch.bincount(outcome_index(out[:, prompt.shape[1]:]), minlength=V ** NEW).double()


CASES = {
    # a draft model; top-k / top-p give p and q different supports
    "draft-model": dict(prompt=[[1, 5, 2]], sampling=dict(temperature=1.0, top_k=6, top_p=0.95), k=2),
    # prompt lookup: point-mass drafts, sometimes outside the target's top-k (always rejected)
    "prompt-lookup": dict(prompt=[[1, 3, 6, 7, 7, 7, 7, 7, 7, 3, 6, 7]], sampling=dict(temperature=1.0, top_k=4), k=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_speculative_sampling_matches_target_distribution(models, case):
    target, draft_model = models
    spec = CASES[case]
    prompt = torch.tensor(spec["prompt"])
    draft = draft_model
    if case == "prompt-lookup":
        # a target that often continues the repeated pattern, so lookup drafts are accepted often
        # (seed chosen for that: acceptance ~0.4; the seed-11 target rarely copies, ~0.05)
        target = tiny_decoder("mqa", seed=16, vocab_size=V, d_model=16, n_layers=1, n_heads=2)
        draft = PromptLookupDrafter(max_ngram=2)
    exact = exact_joint(target, prompt, NEW, **spec["sampling"])

    counts, rate = speculative_counts(target, draft, prompt, seed=0, num_draft_tokens=spec["k"], **spec["sampling"])
    assert 0.1 < rate < 0.95  # both branches of the rule (accept / reject) are exercised often
    stat, crit = goodness_of_fit(counts, exact)
    assert stat < crit, f"speculative samples do not follow the target: chi2={stat:.1f} > {crit:.1f}"

    plain = generate_counts(target, prompt, seed=1, **spec["sampling"])
    stat, crit = goodness_of_fit(plain, exact)
    assert stat < crit, f"target.generate vs its exact distribution: chi2={stat:.1f} > {crit:.1f}"  # the oracle
    stat, crit = two_sample(counts, plain)
    assert stat < crit, f"speculative vs target-only samples differ: chi2={stat:.1f} > {crit:.1f}"

    if case == "draft-model":  # power: the draft's own samples are told apart
        stat, crit = goodness_of_fit(generate_counts(draft_model, prompt, seed=2, **spec["sampling"]), exact)
        assert stat > 3 * crit


def test_the_test_detects_a_broken_residual(models, monkeypatch):
    """Resampling from p after a rejection (instead of the residual) biases the output; caught."""
    target, draft_model = models
    spec = CASES["draft-model"]
    prompt = torch.tensor(spec["prompt"])
    exact = exact_joint(target, prompt, NEW, **spec["sampling"])
    monkeypatch.setattr(spec_decoding.rule, "residual_distribution", lambda p, q: p)
    counts, _ = speculative_counts(target, draft_model, prompt, seed=0, n=N // 3, num_draft_tokens=spec["k"],
                                   **spec["sampling"])
    stat, crit = goodness_of_fit(counts, exact)
    assert stat > crit
