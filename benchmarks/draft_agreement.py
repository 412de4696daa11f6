"""How often does a draft model guess what the target will say?  (No timing: counts only.)

Run from the repository root::

    python -m benchmarks.draft_agreement --target out --draft out-draft --draft out-draft-corpus

For greedy speculative decoding the draft's value is one number per position: does its greedy
guess equal the target's next token, given the (target-written) text so far?  This script
measures it *teacher-forced*, in one pass per model:

1. ``--prompts`` windows of ``--prompt-len`` tokens from the held-out documents (the split
   ``train.py`` makes with the same ``--val-fraction`` and ``--seed``; the default corpus is
   Shakespeare's plays), continued greedily by the target for ``--new-tokens`` tokens
   (``(N, P + n)``, batched, with the KV cache);
2. each draft reads those sequences once; ``agree[i, t]`` says whether its argmax after
   position ``P + t - 1`` equals the target's token ``P + t``;
3. **agreement** is the mean of ``agree``; **tokens per target pass** for draft length ``k``
   replays speculative decoding's rounds over each row (:func:`tokens_per_pass`).

Why teacher forcing gives the exact answer: at temperature 0 a round's ``j``-th guess is
conditioned on the earlier guesses of that round, which, as long as they are accepted, *are*
the target's tokens, and the first rejected guess ends the round.  So the number of target
passes that ``speculative_generate(target, draft, prompt, n, num_draft_tokens=k)`` needs is
exactly what the replay counts (checked in ``tests/test_draft_agreement.py``), and the
expected speedup follows without timing anything.

Writes JSON (``--out``, default ``benchmarks/results/draft_agreement.json``) and the table next
to it (``.md``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Sequence

import torch

from .common import format_machine, int_list, machine_description, markdown_table, set_threads, write_results

DEFAULT_OUT = "benchmarks/results/draft_agreement.json"


def tokens_per_pass(agree: Sequence[bool], k: int) -> float:
    """New tokens per target pass of greedy speculative decoding with ``k`` drafts per round.

    ``agree[t]`` is whether the draft's guess for new token ``t`` (given the true prefix) is the
    target's token.  A round starting at ``t`` proposes ``m = min(k, n - t - 1)`` guesses (the
    round always adds one target token, as :class:`spec_decoding.SpeculativeDecoder` does),
    accepts the leading run of agreements ``j <= m`` and emits ``j + 1`` tokens.
    Returns ``n / rounds``.  Cost: ``O(n)``.
    """
    n, t, rounds = len(agree), 0, 0
    while t < n:
        m = min(k, n - t - 1)
        j = 0
        while j < m and agree[t + j]:
            j += 1
        t += j + 1
        rounds += 1
    return n / rounds if rounds else float("nan")


@torch.no_grad()
def greedy_agreement(draft, sequences: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """``(N, n)`` bool: the draft's argmax after each position equals the next token of ``sequences``.

    ``sequences`` ``(N, prompt_len + n)``; position ``prompt_len + t`` is new token ``t``.
    Cost: one forward pass of ``draft`` over the sequences (no cache needed).
    """
    guesses = draft(sequences).argmax(-1)  # (N, L): guess for position i + 1
    return guesses[:, prompt_len - 1:-1] == sequences[:, prompt_len:]


def heldout_prompts(tokenizer, num: int, prompt_len: int, data=None, val_fraction: float = 0.1,
                    seed: int = 1337, pick_seed: int = 0) -> torch.Tensor:
    """``(num, prompt_len)`` windows of the validation documents, at seeded random offsets."""
    from transformer.data import load_corpus, random_windows, split_documents, tokenize_documents

    _, val_docs = split_documents(load_corpus(data), val_fraction, seed=seed)
    stream = tokenize_documents(val_docs, tokenizer)
    if len(stream) <= prompt_len:
        raise SystemExit(f"the validation split has {len(stream)} tokens; --prompt-len {prompt_len} needs more")
    return random_windows(stream, num, prompt_len, torch.Generator().manual_seed(pick_seed))


def measure(target, drafts: Dict[str, Any], prompts: torch.Tensor, new_tokens: int,
            draft_lengths: Sequence[int], batch_size: int = 64) -> List[Dict[str, Any]]:
    """One row per draft: agreement and tokens per target pass for each ``k`` (see the module doc)."""
    P = prompts.shape[1]
    seqs = torch.cat([target.generate(prompts[i:i + batch_size], new_tokens, eos_token_id=None)
                      for i in range(0, len(prompts), batch_size)])
    rows = []
    for label, draft in drafts.items():
        agree = torch.cat([greedy_agreement(draft, seqs[i:i + batch_size], P)
                           for i in range(0, len(seqs), batch_size)])
        row = {"draft": label, "params": sum(p.numel() for p in draft.parameters()),
               "agreement": agree.float().mean().item(), "positions": agree.numel()}
        for k in draft_lengths:
            row[f"tokens_per_pass_k{k}"] = sum(tokens_per_pass(a.tolist(), k) for a in agree) / len(agree)
        rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.draft_agreement",
                                description="Greedy agreement of draft models with a target on target-written "
                                            "continuations of held-out text, and the tokens per target pass that "
                                            "greedy speculative decoding gets from it (exact, no timing).")
    p.add_argument("--target", required=True, help="target checkpoint (run directory or checkpoint directory)")
    p.add_argument("--draft", action="append", required=True, metavar="[LABEL=]DIR",
                   help="draft checkpoint, optionally labelled for the table (repeat to compare several)")
    p.add_argument("--data", default=None, help="corpus the target was trained on [default: Shakespeare]")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction, as train.py [0.1]")
    p.add_argument("--split-seed", type=int, default=1337, help="train.py's --seed, which makes the split [1337]")
    p.add_argument("--prompts", type=int, default=64, help="prompts (held-out windows) [64]")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt [32]")
    p.add_argument("--new-tokens", type=int, default=128, help="target-greedy tokens after each prompt [128]")
    p.add_argument("--draft-lengths", type=int_list, default=(2, 4, 8, 12), metavar="K[,K...]",
                   help="draft lengths k for tokens per target pass [2,4,8,12]")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt offsets [0]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON file to write [{DEFAULT_OUT}]")
    args = p.parse_args(argv)
    for name in ("prompts", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    from transformer.checkpoint import load_model

    target, tokenizer, _ = load_model(args.target)  # a run directory means its best/
    if tokenizer is None:
        raise SystemExit(f"{args.target} holds no tokenizer; cannot encode the held-out text")
    drafts = {}
    for spec in args.draft:
        label, _, path = spec.rpartition("=")
        path, label = path, label or path
        draft = load_model(path)[0].eval()
        if draft.config.vocab_size != target.config.vocab_size:
            raise SystemExit(f"--draft {path}: vocab_size {draft.config.vocab_size} differs from the target's "
                             f"{target.config.vocab_size}; a draft must share the target's tokenizer")
        drafts[label] = draft
    target.eval()
    prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_len, args.data, args.val_fraction,
                              args.split_seed, args.seed)
    rows = measure(target, drafts, prompts, args.new_tokens, args.draft_lengths)
    result = {"target": args.target, "target_params": sum(p.numel() for p in target.parameters()),
              "prompts": args.prompts, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "draft_lengths": list(args.draft_lengths), "rows": rows}
    machine = machine_description()
    headers = ["draft", "parameters", "greedy agreement"] + [f"tokens / target pass, k={k}"
                                                             for k in args.draft_lengths]
    cells = [[r["draft"], f"{r['params'] / 1e6:.2f}M", r["agreement"]]
             + [r[f"tokens_per_pass_k{k}"] for k in args.draft_lengths] for r in rows]
    text = (f"Machine: {format_machine(machine)}\n\nTarget {args.target} "
            f"({result['target_params'] / 1e6:.2f}M parameters); {args.prompts} held-out prompts of "
            f"{args.prompt_len} tokens, each continued greedily by the target for {args.new_tokens} tokens; "
            f"teacher-forced greedy agreement of each draft, and the tokens per target pass greedy speculative "
            f"decoding gets from it.\n\n" + markdown_table(cells, headers, floatfmt=".3g"))
    print(text + "\n", flush=True)
    command = "python -m benchmarks.draft_agreement " + " ".join(sys.argv[1:] if argv is None else argv)
    path = write_results(args.out, result, machine=machine, command=command, markdown=text)
    print(f"wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
