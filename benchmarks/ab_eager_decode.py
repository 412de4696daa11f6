"""``generate()`` speed of this tree against an earlier commit, side by side in one run.

A refactor of the forward pass must not slow decoding, and on a shared machine two numbers taken
minutes apart differ by more than the change being judged.  So this script unpacks the earlier
commit (``git archive REV``) into a temporary folder and times both trees in *alternating* fresh
processes (base, new, new, base, base, new, ...), each process running every case; it reports the
median and the best tokens/s of each tree and whether both produced the same tokens.

Cases: the decode benchmark's 6-layer, 384-wide model (8,192-token vocabulary, random weights,
float32, 1 thread, 16-token prompt, greedy), with learned positions and a dynamic cache, with RoPE
and a static cache, a left-padded batch of 4, a sliding-window cache and an attention-sink cache;
and the fast path, ``generate(fast=True)`` and ``generate(compile=True)`` (one compile per
process, ~30 s; ``--quick`` leaves the compiled case out).

    python -m benchmarks.ab_eager_decode --base f1cda0d --rounds 3

Cost: about a minute per round on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = [  # name, positions, batch, cache, new tokens
    ("learned B=1 dynamic", "learned", 1, "dynamic", 256),
    ("rope B=1 static", "rope", 1, "static", 256),
    ("rope B=4 left-padded dynamic", "rope", 4, "dynamic", 128),
    ("rope B=1 sliding_window", "rope", 1, "sliding_window", 256),
    ("rope B=1 sinks", "rope", 1, "sinks", 256),
    ("learned B=1 fast=True", "learned", 1, "fast", 256),
    ("learned B=1 compile=True", "learned", 1, "compile", 256),
]

# Runs in a fresh interpreter with one tree first on sys.path; prints one JSON line.
CHILD = r'''
import json, statistics, sys, time
sys.path.insert(0, TREE)
import torch
torch.set_num_threads(1)
from transformer import DecoderOnlyTransformer, ModelConfig
res = {}
for name, pos, B, kind, N in CASES:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, pos_encoding=pos, max_seq_len=16 + N + 3)
    model = DecoderOnlyTransformer(cfg).eval()
    prompt = torch.randint(0, 8192, (B, 16), generator=torch.Generator().manual_seed(0))
    kw = {kind: True} if kind in ("fast", "compile") else dict(cache_implementation=kind)
    kw["eos_token_id"] = None
    if B > 1:
        mask = torch.ones(B, 16, dtype=torch.long)
        for b in range(B):
            mask[b, :3 * b] = 0  # left padding of 0, 3, 6, 9 tokens
        kw["attention_mask"] = mask
    with torch.inference_mode():
        out = model.generate(prompt, N, **kw)  # warm-up
        times = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            model.generate(prompt, N, **kw)
            times.append(time.perf_counter() - t)
    res[name] = dict(median=N * B / statistics.median(times), best=N * B / min(times), tokens=out[:, -8:].tolist())
print(json.dumps(res))
'''


def unpack(rev: str, into: Path) -> Path:
    """Extract commit ``rev`` of this repository into ``into`` (a plain copy of its files)."""
    data = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def time_tree(tree: Path, repeats: int, cases=CASES) -> dict:
    """Every case in a fresh process importing ``tree``'s code; ``{case: {median, best, tokens}}``."""
    code = f"TREE = {str(tree)!r}\nCASES = {cases!r}\nREPEATS = {repeats}\n" + CHILD
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit to compare with (any git revision)")
    p.add_argument("--rounds", type=int, default=3, help="pairs of runs, alternating order [3]")
    p.add_argument("--repeats", type=int, default=5, help="timed generate() calls per case and run [5]")
    p.add_argument("--quick", action="store_true", help="8 new tokens per case: a smoke test (numbers mean nothing)")
    args = p.parse_args(argv)
    cases = [(name, pos, B, kind, 8) for name, pos, B, kind, _ in CASES if kind != "compile"] if args.quick else CASES
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": unpack(args.base, Path(tmp)), "new": ROOT}
        runs = {"base": [], "new": []}
        for r in range(args.rounds):
            for which in (("base", "new") if r % 2 == 0 else ("new", "base")):
                runs[which].append(time_tree(trees[which], args.repeats, cases))
                print(which, {k: round(v["median"], 1) for k, v in runs[which][-1].items()}, flush=True)
    print(f"\ngenerate() tokens/s, {args.base} (base) vs this tree (new), {args.rounds} alternating rounds:\n")
    print("| case | base median | new median | new / base | base best | new best | same tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, *_ in cases:
        med = {w: statistics.median(run[name]["median"] for run in runs[w]) for w in runs}
        best = {w: max(run[name]["best"] for run in runs[w]) for w in runs}
        same = runs["base"][0][name]["tokens"] == runs["new"][0][name]["tokens"]
        print(f"| {name} | {med['base']:.1f} | {med['new']:.1f} | {med['new'] / med['base']:.3f} | "
              f"{best['base']:.1f} | {best['new']:.1f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
