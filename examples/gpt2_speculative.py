"""Speculative decoding with two GPT-2 family models loaded from Hugging Face folders.

A small *draft* GPT-2 proposes ``k`` tokens; the larger *target* GPT-2 checks them all in one
forward pass and keeps the longest prefix it agrees with, plus one token of its own.  At
temperature 0 the output is exactly the target's greedy output (this script checks that); when
sampling it follows the target's distribution.  Both models must share one vocabulary, as the
GPT-2 family does (distilgpt2, gpt2, gpt2-medium, gpt2-large, gpt2-xl: 50257 tokens).

Examples::

    # two folders saved by save_pretrained / downloaded from the hub beforehand (runs offline)
    python examples/gpt2_speculative.py --target ckpts/gpt2-medium --draft ckpts/distilgpt2 \\
        --prompt "The quick brown fox" --max-new-tokens 64 --num-draft-tokens 4

    # no checkpoints at hand: build two random GPT-2-shaped models with `transformers`
    python examples/gpt2_speculative.py --demo

Weights are read by :mod:`transformer.gpt2` (safetensors or ``torch.load(weights_only=True)``;
no ``transformers`` needed).  ``--prompt`` needs the optional ``tokenizers`` package and a
``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``) in the target folder; otherwise pass
token ids with ``--prompt-ids "464 2068 7586"``.

The ``--demo`` models are random, so their text is meaningless.  Its draft is an "early exit"
copy of the target (the target's embeddings, first block and final norm) and the target's five
deeper blocks are scaled down (their output projections times 0.1), a stand-in for a
well-matched pair: they agree on roughly half of the drafts (unrelated random models would agree
on almost none).  With real checkpoints the acceptance rate is the number worth looking at.
Wall-clock speed-ups need a target much more expensive per pass than its draft (e.g. gpt2-large
drafted by distilgpt2, on a GPU); with toy models per-pass overhead dominates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from spec_decoding import format_stats, speculative_generate  # noqa: E402
from transformer.gpt2 import GPT2FormatError, load_gpt2, parse_prompt_ids  # noqa: E402


def make_demo_checkpoints(root: Path, seed: int = 0) -> tuple:
    """Save a random 6-layer GPT-2 (target) and its 1-layer early-exit copy (draft) under ``root``.

    The target's blocks 2-6 have their output projections scaled by 0.1, so the first block
    (which the draft shares) decides most of its predictions.

    Needs ``transformers`` (only to write the folders the way the Hugging Face libraries do).
    Returns ``(target_dir, draft_dir)``.
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        sys.exit("--demo needs the `transformers` package to write GPT-2 folders (pip install transformers); "
                 "or pass --target DIR --draft DIR")
    shape = dict(vocab_size=512, n_positions=256, n_embd=128, n_head=4, initializer_range=0.2,
                 bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    target = GPT2LMHeadModel(GPT2Config(n_layer=6, **shape))
    with torch.no_grad():
        for block in target.transformer.h[1:]:
            block.attn.c_proj.weight.mul_(0.1)
            block.mlp.c_proj.weight.mul_(0.1)
    draft = GPT2LMHeadModel(GPT2Config(n_layer=1, **shape))
    wanted = draft.state_dict().keys()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in wanted})
    target.save_pretrained(root / "target")
    draft.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, help="folder of the large GPT-2 (config.json + model.safetensors)")
    p.add_argument("--draft", type=Path, help="folder of the small GPT-2 sharing the target's vocabulary")
    p.add_argument("--demo", action="store_true", help="create two random GPT-2-shaped folders in a temporary "
                   "directory (needs `transformers`) and use them")
    p.add_argument("--prompt", help="prompt text (needs a tokenizer in the target folder)")
    p.add_argument("--prompt-ids", help='prompt as space-separated token ids, e.g. "464 2068 7586"')
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="drafts per round k (default 4)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype of both models (default float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    args = p.parse_args(argv)
    if not args.demo and (args.target is None or args.draft is None):
        p.error("give --target DIR and --draft DIR, or --demo")
    if args.prompt is not None and args.prompt_ids is not None:
        p.error("give --prompt or --prompt-ids, not both")
    return args


def prompt_ids(args, tokenizer, model) -> torch.Tensor:
    """The ``(1, P)`` prompt from ``--prompt`` / ``--prompt-ids`` (or a default)."""
    if args.prompt_ids is not None:
        try:
            ids = parse_prompt_ids(args.prompt_ids, model.config.vocab_size)
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif args.prompt is not None:
        if tokenizer is None:
            sys.exit("--prompt needs a tokenizer (the `tokenizers` package and tokenizer.json or vocab.json + "
                     "merges.txt in the target folder); pass token ids with --prompt-ids instead")
        ids = tokenizer.encode(args.prompt)
    elif tokenizer is not None:
        ids = tokenizer.encode("The meaning of life is")
    elif model.config.bos_token_id is not None:
        ids = [model.config.bos_token_id]
    else:
        ids = list(range(1, 9))
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if not ids or bad:
        sys.exit(f"prompt ids {ids}: expected at least one id, all in [0, vocab_size={model.config.vocab_size})")
    return torch.tensor([ids], dtype=torch.long, device=args.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            args.target, args.draft = make_demo_checkpoints(Path(tmp), args.seed)
            torch.set_num_threads(1)  # toy models: extra threads only add overhead (and hurt on a busy CPU)
        try:
            target, tokenizer = load_gpt2(args.target, args.device, args.dtype)
            draft, _ = load_gpt2(args.draft, args.device, args.dtype)
        except (FileNotFoundError, GPT2FormatError) as e:
            sys.exit(f"error: {e}")
    for name, m in (("target", target), ("draft", draft)):
        c = m.config
        print(f"{name}: {m.num_parameters() / 1e6:.2f}M params, {c.n_layers} layers, d_model={c.d_model}, "
              f"{c.n_heads} heads, vocab {c.vocab_size}, context {c.max_seq_len}", file=sys.stderr)
    ids = prompt_ids(args, tokenizer, target)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    tokens, stats = speculative_generate(target, draft, ids, args.max_new_tokens,
                                         num_draft_tokens=args.num_draft_tokens, seed=args.seed, **sampling)
    new = tokens[0, ids.shape[1]:].tolist()
    print("prompt ids:", ids[0].tolist())
    print("new ids:   ", new)
    if tokenizer is not None:
        all_ids = tokens[0].tolist()
        if max(all_ids) < tokenizer.vocab_size:
            print("text:", repr(tokenizer.decode(all_ids)))
        else:  # a model vocabulary padded beyond the tokenizer's (or a mismatched tokenizer)
            print(f"text: (not decoded: ids up to {max(all_ids)} but the tokenizer has {tokenizer.vocab_size})")
    print(format_stats(stats))
    print("stats:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.to_dict().items()
                     if not k.endswith("_per_round")})

    # The target alone, for comparison: the same tokens at temperature 0, one pass per token.
    start = time.perf_counter()
    plain = target.generate(ids, len(new), eos_token_id=target.config.eos_token_id,
                            do_sample=args.temperature > 0, **sampling)
    elapsed = time.perf_counter() - start
    print(f"[target alone: {len(new)} tokens in {elapsed:.2f} s = {len(new) / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{len(new)} target passes]")
    if args.temperature == 0:
        same = torch.equal(plain, tokens)
        print("speculative output identical to target.generate (greedy):", same)
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
