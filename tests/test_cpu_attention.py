"""The CPU paged-attention kernel (``transformer/cpu_attention.py``): exactly the attention of
``scaled_dot_product_attention`` over each query's own keys, read from scattered pool blocks."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer import cpu_attention
from transformer.cpu_attention import paged_attention
from transformer.layers import MaskPlan, PagedMask

from kv_cache.paged.block_manager import BlockManager
from kv_cache.paged.block_pool import BlockPool


def reference(q, k, v, table, bs, qpos, qrows, window):
    """Gather each query's keys from the blocks, then SDPA with the causal (window) mask."""
    B, S, H, D = q.shape
    out = torch.empty_like(q)
    for b in range(B):
        for s in range(S):
            row, p = int(qrows[b, s]), int(qpos[b, s])
            slots = torch.tensor([int(table[row, j // bs]) * bs + j % bs for j in range(p + 1)])
            keep = torch.arange(p + 1) > (p - window if window else -1)
            kk, vv = k[slots][keep].transpose(0, 1)[None], v[slots][keep].transpose(0, 1)[None]  # (1, Hkv, n, D)
            out[b, s] = F.scaled_dot_product_attention(q[b, s][None, :, None], kk, vv, enable_gqa=True)[0, :, 0]
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), S=st.integers(1, 4), groups=st.sampled_from([1, 2, 4]),
       kv_heads=st.integers(1, 3), D=st.sampled_from([8, 32, 64, 40]), bs=st.sampled_from([1, 4, 16]),
       window=st.sampled_from([None, 1, 3, 17]), packed=st.booleans())
def test_kernel_equals_sdpa_over_each_querys_own_keys(seed, rows, S, groups, kv_heads, D, bs, window, packed):
    """Random pools with blocks in random order, histories of random lengths, grouped-query
    heads, head sizes the kernel specialises (32, 64) and others, windows; decode-shaped
    ``(B, S)`` queries or one packed row of several sequences' tokens (``query_rows``)."""
    g = torch.Generator().manual_seed(seed)
    H = kv_heads * groups
    lens = torch.randint(0, 40, (rows,), generator=g) + S  # keys each row holds after the step
    W = int(max(-(-int(n) // bs) for n in lens))
    nblocks = rows * W + 3
    perm = torch.randperm(nblocks, generator=g)
    table = torch.full((rows, W + 1), -1, dtype=torch.int32)  # a spare -1 column: never read
    for r in range(rows):
        nb = -(-int(lens[r]) // bs)
        table[r, :nb] = perm[r * W:r * W + nb].int()
    k = torch.randn(nblocks * bs, kv_heads, D, generator=g)
    v = torch.randn(nblocks * bs, kv_heads, D, generator=g)
    qpos = torch.stack([torch.arange(int(n) - S, int(n)) for n in lens])  # (rows, S): the last S positions
    qrows = torch.arange(rows).view(rows, 1).expand(rows, S)
    if packed:  # one (1, rows * S) row, in a shuffled order: each query finds its row through query_rows
        order = torch.randperm(rows * S, generator=g)
        qpos, qrows = qpos.reshape(1, -1)[:, order], qrows.reshape(1, -1)[:, order]
    q = torch.randn(*qpos.shape, H, D, generator=g)
    got = paged_attention(q, k, v, table, bs, qpos, qrows if packed else None, window)
    torch.testing.assert_close(got, reference(q, k, v, table, bs, qpos, qrows, window), atol=2e-6, rtol=1e-5)


def test_kernel_refuses_what_it_cannot_compute_naming_it():
    q, k = torch.randn(2, 1, 4, 8), torch.randn(16, 2, 8)
    table, pos = torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="float32 CPU tensors, got q torch.float64"):
        paged_attention(q.double(), k, k, table, 16, pos)
    with pytest.raises(ValueError, match="H=4 must be a multiple of the pool's H_kv=3"):
        paged_attention(q, torch.randn(16, 3, 8), torch.randn(16, 3, 8), table, 16, pos)
    with pytest.raises(ValueError, match=r"query_positions and query_rows must be \(B, S\) = \(2, 1\)"):
        paged_attention(q, k, k, table, 16, pos.view(1, 2))
    # keys that are not in the pool are never read: a -1 block, a position past the table, a block past the pool
    for bad_table, bad_pos, where in ((torch.tensor([[0], [-1]]), pos, r"query \(1, 0\) at position 0"),
                                      (table, torch.tensor([[0], [16]]), r"query \(1, 0\) at position 16"),
                                      (torch.tensor([[0], [1]]), pos, r"query \(1, 0\)")):
        with pytest.raises(ValueError, match=where + ".*reads keys outside the pool"):
            paged_attention(q, k, k, bad_table, 16, bad_pos)


def _paged_step(packed):
    pool = BlockPool(num_layers=1, num_kv_heads=2, head_dim=8, block_size=4, max_blocks=8, preallocate=True)
    bm = BlockManager(pool)
    bm.allocate("a", [1, 2, 3, 4, 5])
    bm.blocks_step([("a", 5)])  # takes its blocks: its prompt, computed
    bm.commit("a", 5)
    bm.allocate("b", [6, 7])
    chunks = [("a", 1), ("b", 2)] if packed else [("a", 1), ("b", 1)]
    return bm.blocks_step(chunks, packed=packed)


def test_the_mask_builder_hands_the_kernel_a_per_query_rule_on_a_cpu_and_flex_elsewhere(monkeypatch):
    """One mask builder: a paged step on a CPU in float32 gets a :class:`PagedMask` (the kernel
    reads each query's keys); in float64, or where the kernel cannot be built, the FlexAttention
    block mask as before; a packed step, which only the kernel reads, is refused there, naming why."""
    from torch.nn.attention.flex_attention import BlockMask

    step = _paged_step(packed=False)
    plan = MaskPlan(step.query_positions, None, None, needed=True)
    mask = plan.build(step, 0, torch.float32)
    assert isinstance(mask, PagedMask) and mask.query_rows is None and torch.equal(mask.query_positions, step.query_positions)
    assert isinstance(MaskPlan(step.query_positions, None, None, needed=True).build(step, 0, torch.float64), BlockMask)
    packed = _paged_step(packed=True)
    assert packed.query_rows.tolist() == [[0, 1, 1]] and packed.query_positions.tolist() == [[5, 0, 1]]
    assert isinstance(MaskPlan(packed.query_positions, None, None, needed=True).build(packed, 0, torch.float32), PagedMask)
    monkeypatch.setattr(cpu_attention, "_lib", False)
    monkeypatch.setattr(cpu_attention, "_why", "no C compiler found (simulated)")
    assert isinstance(MaskPlan(step.query_positions, None, None, needed=True).build(step, 0, torch.float32), BlockMask)
    with pytest.raises(ValueError, match=r"needs the CPU paged-attention kernel.*no C compiler found \(simulated\)"):
        MaskPlan(packed.query_positions, None, None, needed=True).build(packed, 0, torch.float32)


def test_the_kernel_is_compiled_once_into_its_cache_and_reloaded(tmp_path, monkeypatch):
    """A fresh process state compiles into ``$TRANSFORMER_KERNEL_CACHE`` (a file named by a hash
    of the source, flags and CPU); the next one loads that file without compiling."""
    monkeypatch.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_attention, "_lib", None)
    assert cpu_attention.available("cpu", torch.float32)
    built = list(tmp_path.glob("paged_attention_*.so"))
    assert len(built) == 1 and not [p for p in tmp_path.iterdir() if p.is_dir()]  # no temporary left behind
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_attention, "_lib", None)
    monkeypatch.setattr(cpu_attention.subprocess, "run", None)  # compiling again would raise
    assert cpu_attention.available("cpu", torch.float32) and built[0].stat().st_mtime_ns == stamp
    assert not cpu_attention.available("cpu", torch.bfloat16)


@pytest.mark.parametrize("cc", ["false", "/nonexistent/cc"])
def test_a_compiler_that_fails_leaves_the_kernel_unavailable_with_its_message(tmp_path, monkeypatch, cc):
    """A compiler that fails, or is not there: the kernel is unavailable (the engine takes
    another path) and a direct call says why."""
    monkeypatch.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", cc)
    monkeypatch.setattr(cpu_attention, "_lib", None)
    assert not cpu_attention.available("cpu", torch.float32)
    assert f"{cc} failed" in cpu_attention.why_not()
    with pytest.raises(RuntimeError, match=f"CPU paged-attention kernel is not available: {cc} failed"):
        paged_attention(torch.randn(1, 1, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8),
                        torch.zeros(1, 1, dtype=torch.int32), 4, torch.zeros(1, 1, dtype=torch.long))


def test_a_compiler_that_refuses_the_tuning_flags_still_builds_the_kernel(tmp_path, monkeypatch):
    """``-march=native`` refused (a compiler that does not know it): the next flag set builds."""
    import shutil
    cc = tmp_path / "picky-cc"
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-march=native*) echo "unknown flag" >&2; exit 1;; esac\n'
                  f'exec {shutil.which("cc") or shutil.which("gcc")} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv("TRANSFORMER_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_attention, "_lib", None)
    assert cpu_attention.available("cpu", torch.float32)
    q, k = torch.randn(1, 1, 2, 8), torch.randn(4, 2, 8)
    got = paged_attention(q, k, k, torch.zeros(1, 1, dtype=torch.int32), 4, torch.tensor([[3]]))
    torch.testing.assert_close(got, reference(q, k, k, torch.zeros(1, 1, dtype=torch.int32), 4, torch.tensor([[3]]),
                                              torch.zeros(1, 1, dtype=torch.long), None))


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TRANSFORMER_KERNEL_CACHE", str(blocker / "cache"))  # cannot be created
    monkeypatch.setattr(cpu_attention, "_lib", None)
    assert cpu_attention.available("cpu", torch.float32)
    assert blocker.read_text() == "not a folder"
