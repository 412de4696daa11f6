"""The speculative decoding loop: draft, verify in one target pass, roll the caches back.

One *round* (``k`` = draft length)::

    drafts, q  = drafter.propose(tokens, k)               # k cheap guesses (draft model: k passes)
    logits     = target([unseen..., *drafts], cache)      # ONE pass scores all k (+1 bonus)
    n, token   = verify(p(logits), q, drafts)             # accept a prefix, then 1 new token
    tokens    += drafts[:n] + [token]                      # 1 .. k+1 tokens per target pass
    target_cache.rollback(len(tokens) - 1); drafter.rollback(len(tokens) - 1)

Cache invariant.  Between rounds both caches hold keys/values of (a prefix of) the accepted
sequence *except its last token*, which is "pending": the next target pass feeds it together
with the drafts, and its logits are the distribution of the first draft.  The target's first
round therefore doubles as the prefill (it feeds the whole prompt), so the number of target
passes equals the number of rounds.  After verification the target cache holds the pending
token and all ``k`` drafts; rolling back to ``len(tokens) - 1`` keeps exactly the accepted ones.
The draft cache lags by one token after a fully accepted round (it never fed its last draft);
the drafter feeds whatever it missed at the start of the next round.

Plain cached decoding needs one target pass per token; a round needs one target pass per
``1 + accepted`` tokens.  With acceptance rate ``alpha`` (per draft, independent) the expected
tokens per target pass are ``(1 - alpha^(k+1)) / (1 - alpha)`` (Leviathan et al. 2023).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Union

import torch

from transformer.generation import _UNSET, EXACT_CACHES, check_token_ids
from .drafters import Drafter, ModelDrafter, Proposal
from .rule import SamplingSettings, probs_from_logits, verify_greedy, verify_sampled


@dataclass
class SpecDecodingStats:
    """Counters of one speculative generation (``to_dict()`` for JSON).

    ``target_forward_passes`` counts every target call; the first one also prefills the prompt,
    so it equals the number of rounds.  ``accepted_per_round[i]`` of ``proposed_per_round[i]``
    drafts were kept in round ``i`` (each round also emits one target token, except when an
    end-of-sequence token cut the round short).
    """

    drafter: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    target_forward_passes: int = 0
    draft_forward_passes: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    wall_time_s: float = 0.0
    proposed_per_round: List[int] = field(default_factory=list)
    accepted_per_round: List[int] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.accepted_per_round)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed drafts (NaN if nothing was proposed)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else float("nan")

    @property
    def tokens_per_target_pass(self) -> float:
        """New tokens per target forward pass (plain decoding: 1.0)."""
        return self.generated_tokens / self.target_forward_passes if self.target_forward_passes else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_time_s if self.wall_time_s > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(rounds=self.rounds, acceptance_rate=self.acceptance_rate,
                 tokens_per_target_pass=self.tokens_per_target_pass, tokens_per_s=self.tokens_per_s)
        return d


def format_stats(stats: SpecDecodingStats) -> str:
    """One line for a CLI's stderr, e.g. ``[speculative: 64 tokens in 0.21 s = 305 tokens/s; ...]``."""
    rate = "n/a" if stats.proposed_tokens == 0 else f"{100 * stats.acceptance_rate:.0f}%"
    return (f"[speculative ({stats.drafter}): {stats.generated_tokens} tokens in {stats.wall_time_s:.2f} s = "
            f"{stats.tokens_per_s:.1f} tokens/s; {stats.target_forward_passes} target passes "
            f"({stats.tokens_per_target_pass:.2f} tokens/pass), {stats.draft_forward_passes} draft passes; "
            f"accepted {stats.accepted_tokens}/{stats.proposed_tokens} drafts ({rate})]")


@dataclass
class RoundResult:
    """What one round did: the drafts, how many were accepted, and the tokens it emitted."""

    proposed: List[int]
    accepted: int
    emitted: List[int]
    bonus: bool  # True if every draft was accepted and the last token came from the bonus position


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an int >= 1, got {v!r}")


class SpeculativeDecoder:
    """One speculative generation, driven round by round (:meth:`step`) or to the end (:meth:`run`).

    Args:
        target: the model whose distribution the output follows (``DecoderOnlyTransformer``).
        drafter: a :class:`~spec_decoding.drafters.Drafter`, or a draft model (wrapped in
            :class:`~spec_decoding.drafters.ModelDrafter`).
        input_ids: ``(1, P)`` prompt.  Batch size 1 only: rows would accept different numbers
            of tokens per round, and this loop keeps one length per cache.
        max_new_tokens: tokens to generate (fewer if ``eos_token_id`` appears).
        num_draft_tokens: drafts per round ``k`` (the start value when ``adaptive``).
        temperature, top_k, top_p: sampling settings applied to target *and* drafter; the
            output is distributed exactly as ``target.generate`` with the same settings.
            ``temperature=0`` (default) is greedy: the output equals the target's greedy output.
        do_sample: ``False`` forces greedy; ``None``/``True`` sample when ``temperature > 0``
            (the convention of :func:`transformer.generate`).  Greedy by default, unlike
            ``EnhancedTransformer.generate``: the speculative guide's default (see the table in
            :mod:`transformer.sampling`; one :class:`~transformer.sampling.SamplingSettings` checks
            all of these values, ``self.settings``).
        eos_token_id: stop after this token (default: ``target.config.eos_token_id``; ``None``
            never stops early).
        generator / seed: random source (give at most one); ``None`` uses torch's global RNG.
        cache_implementation: ``"dynamic"`` or ``"static"`` (preallocated for ``P + max_new_tokens``),
            used for both models.
        adaptive: grow ``k`` by one after a fully accepted round, shrink it by one after a
            rejection, within ``[1, max_draft_tokens]`` (default ``2 * num_draft_tokens``).
        streamer: called with each new token as a ``(1,)`` LongTensor, as in ``generate``.

    Attributes ``tokens`` (``(1, P + n)``), ``target_cache``, ``drafter``, ``stats``, ``k``.
    """

    def __init__(self, target, drafter: Union[Drafter, torch.nn.Module], input_ids: torch.Tensor,
                 max_new_tokens: int, *, num_draft_tokens: int = 4, temperature: float = 0.0,
                 do_sample: Optional[bool] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id=_UNSET, generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 cache_implementation: str = "dynamic", adaptive: bool = False,
                 max_draft_tokens: Optional[int] = None,
                 streamer: Optional[Callable[[torch.Tensor], None]] = None):
        if isinstance(drafter, torch.nn.Module):
            drafter = ModelDrafter(drafter)
        if not isinstance(drafter, Drafter):
            raise TypeError(f"draft must be a draft model or a Drafter (ModelDrafter, PromptLookupDrafter), "
                            f"got {type(drafter).__name__}")
        cfg = target.config
        if drafter.vocab_size is not None and drafter.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"draft vocab_size={drafter.vocab_size} does not match target vocab_size={cfg.vocab_size}: "
                f"the acceptance test compares both models' probabilities token by token, so they must "
                f"share one vocabulary (tokenizer)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (1, prompt_len) LongTensor, got {got}")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids has batch size {input_ids.shape[0]}, but speculative decoding here supports batch "
                f"size 1 only (rows would accept different numbers of drafts per round); loop over the rows")
        P = input_ids.shape[1]
        if P == 0:
            raise ValueError("input_ids must hold at least one token (got prompt length 0)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_token_ids("input_ids", input_ids, cfg.vocab_size)  # not torch's IndexError from the embedding
        if cfg.pos_encoding == "learned" and P + max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds the target's "
                             f"max_seq_len={cfg.max_seq_len} (its learned position table)")
        _positive_int("num_draft_tokens", num_draft_tokens)
        if max_draft_tokens is None:
            max_draft_tokens = 2 * num_draft_tokens
        _positive_int("max_draft_tokens", max_draft_tokens)
        if max_draft_tokens < num_draft_tokens:
            raise ValueError(f"max_draft_tokens={max_draft_tokens} must be >= num_draft_tokens={num_draft_tokens}")
        # the caches are rolled back every round: only the exact ones (of transformer.generate's kinds) can be
        if cache_implementation not in EXACT_CACHES:
            raise ValueError(f"cache_implementation={cache_implementation!r}; expected one of {EXACT_CACHES} "
                             f"(speculative decoding rolls its caches back)")
        self.settings = SamplingSettings(temperature, top_k, top_p, do_sample=do_sample, seed=seed,
                                         generator=generator,  # validated; seed and generator not both
                                         eos_token_id=cfg.eos_token_id if eos_token_id is _UNSET else eos_token_id)
        generator = self.settings.make_generator(input_ids.device)

        self.target, self.drafter, self.generator, self.streamer = target, drafter, generator, streamer
        self.max_new_tokens, self.adaptive, self.max_draft_tokens = max_new_tokens, adaptive, max_draft_tokens
        self.eos_token_id = self.settings.eos_token_id
        self.k = num_draft_tokens
        self.tokens = input_ids
        self.prompt_len = P
        self.finished = max_new_tokens == 0
        max_len = P + max_new_tokens
        self.target_cache = target.new_cache(cache_implementation, 1, max_len)
        drafter.reset(input_ids, max_len, cache_implementation)
        self.stats = SpecDecodingStats(drafter=drafter.name, prompt_tokens=P)

    @property
    def generated(self) -> int:
        return self.tokens.shape[1] - self.prompt_len

    @torch.no_grad()
    def step(self) -> RoundResult:
        """Run one round (draft, verify, roll back); returns what it did.  Call until ``finished``."""
        if self.finished:
            raise RuntimeError("this generation is finished; start a new SpeculativeDecoder")
        start = time.perf_counter()
        remaining = self.max_new_tokens - self.generated
        # At most remaining - 1 drafts: the round always adds one target token on top.
        proposal: Proposal = self.drafter.propose(self.tokens, min(self.k, remaining - 1), self.settings,
                                                  self.generator)
        drafts = proposal.tokens.to(self.tokens.device)
        m = drafts.shape[0]
        self.stats.draft_forward_passes = self.drafter.forward_passes

        # One target pass over everything it has not seen (the pending token; the whole prompt
        # in round 1) plus the m drafts; keep the logits of the last m + 1 positions.
        unseen = self.tokens[:, self.target_cache.get_seq_length():]
        logits = self.target(torch.cat([unseen, drafts[None]], dim=1), cache=self.target_cache,
                             num_logits_to_keep=m + 1)[0]  # (m + 1, V)
        self.stats.target_forward_passes += 1
        if self.settings.greedy:
            n, token = verify_greedy(logits, drafts)
        else:
            n, token = verify_sampled(probs_from_logits(logits, self.settings), proposal.probs, drafts, self.generator)

        emitted = drafts[:n].tolist() + [token]
        eos = self.eos_token_id
        eos_ids = () if eos is None else eos if isinstance(eos, tuple) else (eos,)  # one id or several
        stops = [i for i, t in enumerate(emitted) if t in eos_ids]
        if stops:
            emitted = emitted[:stops[0] + 1]
            self.finished = True
        new = torch.tensor([emitted], dtype=torch.long, device=self.tokens.device)
        self.tokens = torch.cat([self.tokens, new], dim=1)
        # Roll back: keep keys/values of the accepted sequence minus its (pending) last token.
        keep = self.tokens.shape[1] - 1
        self.target_cache.rollback(keep)
        self.drafter.rollback(keep)

        self.stats.proposed_tokens += m
        self.stats.accepted_tokens += n
        self.stats.proposed_per_round.append(m)
        self.stats.accepted_per_round.append(n)
        self.stats.generated_tokens = self.generated
        if self.generated >= self.max_new_tokens:
            self.finished = True
        if self.adaptive and m:
            self.k = min(self.k + 1, self.max_draft_tokens) if n == m else max(self.k - 1, 1)
        if self.streamer is not None:
            for t in new[0]:
                self.streamer(t.view(1))
        self.stats.wall_time_s += time.perf_counter() - start
        return RoundResult(proposed=drafts.tolist(), accepted=n, emitted=emitted, bonus=n == m)

    def run(self) -> torch.Tensor:
        """Rounds until ``max_new_tokens`` or end of sequence; returns ``tokens`` ``(1, P + n)``."""
        models = [self.target] + ([self.drafter.model] if isinstance(self.drafter, ModelDrafter) else [])
        training = [m for m in models if m.training]  # dropout off while decoding, restored after
        for m in training:
            m.eval()
        try:
            while not self.finished:
                self.step()  # each step adds its own time to stats.wall_time_s
        finally:
            for m in training:
                m.train()
        return self.tokens


def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
    """Generate with speculative decoding; returns ``(tokens (1, P + n) LongTensor, SpecDecodingStats)``.

    ``draft`` is a draft model (same vocabulary as ``target``) or a drafter such as
    ``PromptLookupDrafter()``.  Keyword arguments are those of :class:`SpeculativeDecoder`:
    ``num_draft_tokens=4, temperature=0.0, do_sample=None, top_k=None, top_p=None,
    eos_token_id=<target's>, generator=None, seed=None, cache_implementation="dynamic",
    adaptive=False, max_draft_tokens=None, streamer=None``.

    At temperature 0 the tokens equal ``target.generate(input_ids, max_new_tokens)`` exactly;
    when sampling they follow the same distribution as ``target.generate(..., do_sample=True)``
    with the same temperature / top-k / top-p.  Cost: one target pass per round (1 to ``k + 1``
    tokens) plus the drafter's work (``k`` draft-model passes per round; none for prompt lookup).

    Example::

        tokens, stats = speculative_generate(big, small, prompt, 64, num_draft_tokens=4)
        print(format_stats(stats))
    """
    decoder = SpeculativeDecoder(target, draft, input_ids, max_new_tokens, **kwargs)
    return decoder.run(), decoder.stats
