"""The matrix products of a Llama-3.2-1B decode step, one at a time, against the memory bandwidth.

A batch-1 decode step reads every weight once, so each matrix product can take no less than its
weight's bytes over the GPU's copy bandwidth.  This times each product of one layer (q/k/v, the
output projection, the fused gate/up, down) and the output head, with ``M = 1`` and ``M = 16``
rows, two ways, each replayed in a CUDA graph as in the fast path, cycling through copies of the
weight that together exceed the GPU's L2 cache (a step reads 2.5 GB between two visits of a
weight, so it never finds one there; timed on one copy, a small product's weight would stay in L2
from one replay to the next and time faster than it runs in a step):

* **torch**: ``x @ w`` (cuBLAS), what the compiled model runs;
* **triton**: a hand-written split-K matrix-vector kernel (each program a ``(BK, BN)`` tile of
  the weight, ``SPLIT`` programs along ``K`` adding into one float32 output), the best of a
  small grid of tile sizes for each shape.

It answers one question of issue #17: are faster matrix-vector kernels what stands between the
step and 70% of copy bandwidth?  (No: see ``docs/fast_decoding.md``.)

    python -m benchmarks.gemv_benchmark --out benchmarks/results/llama_gemv_gpu.json   # needs CUDA
"""

from __future__ import annotations

import argparse
from typing import Dict

import torch

from benchmarks.common import format_machine, machine_description, markdown_table, write_results

#: (name, K, N) of the Llama-3.2-1B step's products, weights stored (in, out) as transformer.layers.Linear
SHAPES = [("q/k/v", 2048, 3072), ("output projection", 2048, 2048), ("gate/up", 2048, 16384),
          ("down", 8192, 2048), ("output head", 2048, 128256)]
GRID = [(bn, bk, split) for bn in (64, 128) for bk in (64, 128, 256) for split in (1, 2, 4, 8)]


def _kernel():
    """The Triton split-K kernel (imported here: Triton is only needed with a GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(X, W, Y, M, N, K, stride_xm, stride_wk, stride_ym, SPLIT: tl.constexpr, BM: tl.constexpr,
             BN: tl.constexpr, BK: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        rn, rm = pid_n * BN + tl.arange(0, BN), tl.arange(0, BM)
        k_per = tl.cdiv(K, SPLIT)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, k_per, BK):
            rk = pid_k * k_per + kk + tl.arange(0, BK)
            w = tl.load(W + rk[:, None] * stride_wk + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.)
            if BM == 1:  # one row: a weighted sum down the tile's columns
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
            else:
                acc += tl.dot(x, w)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.atomic_add(Y + rm[:, None] * stride_ym + rn[None, :], acc, mask=mask, sem="relaxed")

    return triton, gemv


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidth", type=float, default=4.17e12, help="copy bandwidth in bytes/s [4.17e12, an H200]")
    p.add_argument("--rotate-bytes", type=int, default=200 << 20,
                   help="cycle through copies of each weight totalling at least this many bytes, so that no "
                        "call finds its weight in L2 (as in a decode step) [200 MiB; 0: one copy, L2-warm]")
    p.add_argument("--out", default=None, help="JSON to write (and a .md beside it)")
    args = p.parse_args(argv)
    if args.rotate_bytes < 0:
        p.error(f"--rotate-bytes must be >= 0, got {args.rotate_bytes}")
    if not torch.cuda.is_available():
        p.error("this benchmark times GPU kernels and needs CUDA; no CUDA device is available")
    triton, gemv = _kernel()
    from triton.testing import do_bench_cudagraph

    rows = []
    for M in (1, 16):
        for name, K, N in SHAPES:
            # copies of the weight, used in turn, so that no replay finds its weight in L2 (an H200 has
            # 50 MB of it: the small products' weights would stay there and time faster than in a step)
            copies = max(1, min(32, -(-args.rotate_bytes // (K * N * 2))))
            ws = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16) / 50 for _ in range(copies)]
            w = ws[0]
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            want = (x @ w).float()
            y = torch.zeros(M, N, device="cuda", dtype=torch.float32)

            def launch(bn, bk, split, w):
                y.zero_()  # split-K adds into a zeroed float32 output: the zeroing is part of its cost
                gemv[(triton.cdiv(N, bn), split)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), split,
                                                  1 if M == 1 else 16, bn, bk, num_warps=4 if bn * bk <= 8192 else 8)

            def run(bn, bk, split):
                for wi in ws:
                    launch(bn, bk, split, wi)

            best = None
            for bn, bk, split in GRID:
                if K // split < bk:
                    continue
                launch(bn, bk, split, w)
                err = (y - want).abs().max().item()
                if err > 0.02 * want.abs().max().item():
                    raise AssertionError(f"triton kernel wrong for {name}, M={M}, tile {(bn, bk, split)}: error {err}")
                us = do_bench_cudagraph(lambda: run(bn, bk, split)) * 1e3 / copies
                best = min(best or (us, (bn, bk, split)), (us, (bn, bk, split)))
            torch_us = do_bench_cudagraph(lambda: [x @ wi for wi in ws]) * 1e3 / copies
            floor = K * N * 2 / args.bandwidth * 1e6
            rows.append(dict(M=M, product=name, K=K, N=N, copies=copies, floor_us=floor, torch_us=torch_us,
                             triton_us=best[0],
                             triton_tile=best[1], torch_of_bw=floor / torch_us, triton_of_bw=floor / best[0]))
            print(f"M={M} {name}: torch {torch_us:.1f} us, triton {best[0]:.1f} us, floor {floor:.1f} us", flush=True)
    machine = machine_description()
    table = markdown_table([[r["M"], r["product"], f"{r['K']} x {r['N']}", f"{r['floor_us']:.1f}",
                             f"{r['torch_us']:.1f} ({r['torch_of_bw']:.0%})", f"{r['triton_us']:.1f} ({r['triton_of_bw']:.0%})",
                             "x".join(map(str, r["triton_tile"]))] for r in rows],
                           ["rows", "product", "K x N", "bytes / bandwidth, us", "torch (cuBLAS), us (of bandwidth)",
                            "triton split-K, us", "tile BN x BK x split"])
    text = (f"## Llama-3.2-1B decode products, one at a time, bf16, in CUDA graphs\n\nMachine: {format_machine(machine)}.  "
            f"Bandwidth {args.bandwidth / 1e12:.2f} TB/s; each time is Triton's `do_bench_cudagraph` over calls that cycle "
            f"through copies of the weight totalling at least {args.rotate_bytes / 2**20:.0f} MiB (none found in L2), "
            f"divided by the copies.\n\n{table}\n")
    print(text)
    if args.out:
        write_results(args.out, dict(rows=rows, args=vars(args)), machine, markdown=text)
    return dict(rows=rows)


if __name__ == "__main__":
    main()
