"""Unit tests for DynamicKVCache and the shared BufferedCache machinery: growth, memory, errors."""

import ast
import pathlib
import sys

import pytest
import torch

import kv_cache
from kv_cache import DynamicKVCache


def kv(b=1, h=2, s=1, d=4, dtype=torch.float32):
    return torch.randn(b, h, s, d).to(dtype), torch.randn(b, h, s, d).to(dtype)


def test_appending_4096_tokens_reallocates_only_logarithmically_often():
    cache = DynamicKVCache(initial_capacity=1)
    ks, vs, reallocations, ptr = [], [], 0, None
    for _ in range(4096):
        k, v = kv(h=1, d=2)
        ks.append(k), vs.append(v)
        out_k, _ = cache.update(k, v, 0)
        if cache.keys[0].data_ptr() != ptr:  # a new buffer: the old contents were copied once
            reallocations, ptr = reallocations + 1, cache.keys[0].data_ptr()
        assert out_k.data_ptr() == ptr  # the returned history is a view, not a fresh concatenation
    assert reallocations <= 13  # capacities 1, 2, 4, ..., 4096
    assert cache.keys[0].shape[2] == 4096 and cache.get_seq_length(0) == 4096
    k_all, v_all = cache.get(0)
    assert torch.equal(k_all, torch.cat(ks, dim=2)) and torch.equal(v_all, torch.cat(vs, dim=2))


def test_growth_factor_and_initial_capacity_set_the_capacity_sequence():
    cache = DynamicKVCache(initial_capacity=4, growth_factor=1.5)
    caps = []
    for _ in range(20):
        cache.update(*kv(), 0)
        caps.append(cache.keys[0].shape[2])
    assert sorted(set(caps)) == [4, 6, 9, 14, 21]
    cache.update(*kv(s=30), 1)  # a long prompt gets exactly what it needs (at least initial_capacity)
    assert cache.keys[1].shape[2] == 30


def test_memory_bytes_counts_allocated_capacity():
    cache = DynamicKVCache(initial_capacity=64)
    assert cache.memory_bytes() == 0
    cache.update(*kv(b=2, s=5), 0)  # keys fp32 + values fp32: 64 slots each
    cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 8).half(), 1)  # different value dim / dtype
    per_slot = 2 * 2 * 4 * 4
    assert cache.memory_bytes() == 64 * (2 * per_slot) + 64 * (per_slot + 2 * 2 * 8 * 2)
    cache.reset()
    assert cache.memory_bytes() == 0 and cache.get(0) is None and cache.get_seq_length(3) == 0


def test_rollback_keeps_capacity_and_next_append_overwrites():
    cache = DynamicKVCache()
    k, v = kv(s=6)
    cache.update(k, v, 0)
    cache.rollback(-2)
    assert cache.get_seq_length(0) == 4 and torch.equal(cache.get(0)[0], k[:, :, :4])
    cache.rollback(10)  # longer than stored: no-op
    assert cache.get_seq_length(0) == 4
    k2, v2 = kv()
    out, _ = cache.update(k2, v2, 0)
    assert torch.equal(out, torch.cat([k[:, :, :4], k2], dim=2))
    with pytest.raises(TypeError, match=r"rollback\(max_length\) takes an int, got float"):
        cache.rollback(1.5)
    with pytest.raises(TypeError, match=r"crop\(max_length\) takes an int, got float"):
        cache.crop(1.5)
    with pytest.raises(ValueError, match=r"max_length must be >= 0, got -1; to drop tokens from the end use rollback"):
        cache.crop(-1)


def test_batch_ops_on_a_layer_left_empty_by_rollback_after_a_batch_change():
    # Regression: layer 1 keeps a 1-row buffer after rollback(0) while layer 0 restarts with 2 rows.
    cache = DynamicKVCache()
    cache.update(*kv(b=1), 0)
    cache.update(*kv(b=1), 1)
    cache.rollback(0)
    k, v = kv(b=2)
    cache.update(k, v, 0)
    cache.reorder_cache([1, 0])
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.get(0)[0], k.flip(0).repeat_interleave(2, dim=0)) and cache.get(1) is None
    assert cache.update(*kv(b=4), 1)[0].shape == (4, 2, 1, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_capacity=0), r"initial_capacity must be a positive int, got 0"),
    (dict(growth_factor=1.0), r"growth_factor must be > 1, got 1.0"),
    (dict(layout="sbhd"), r"layout='sbhd' is not supported"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicKVCache(**kwargs)


def test_update_errors_name_tensor_layer_and_expectation():
    cache = DynamicKVCache()
    cache.update(*kv(b=2), 0)
    with pytest.raises(ValueError, match=r"batch size 3, but the cache holds 2 rows"):
        cache.update(*kv(b=3), 1)
    with pytest.raises(ValueError, match=r"key for layer 0 has 3 heads of dim 4, expected 2 heads of dim 4"):
        cache.update(*kv(b=2, h=3), 0)
    with pytest.raises(ValueError, match=r"layer 0 have dtypes torch.float16/torch.float16, but the layer stores torch.float32/torch.float32"):
        cache.update(*kv(b=2, dtype=torch.float16), 0)
    with pytest.raises(ValueError, match=r"key for layer 0 must be 4-D .* got shape \(2, 4\)"):
        cache.update(torch.zeros(2, 4), torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match=r"key and value for layer 0 must agree on their first three dims"):
        cache.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 2, 4), 0)
    with pytest.raises(TypeError, match=r"value for layer 0 must be a torch.Tensor, got list"):
        cache.update(torch.zeros(2, 2, 1, 4), [], 0)
    with pytest.raises(ValueError, match=r"layer_idx must be a non-negative int, got -1"):
        cache.update(*kv(b=2), -1)
    assert cache.get_seq_length(0) == 1


@pytest.mark.parametrize("pos, seq, exc, match", [
    (torch.tensor(1), 2, ValueError, r"a 0-D cache_position writes one token, but 2 new tokens were given"),
    (torch.tensor([0, 1, 2]), 2, ValueError, r"1-D cache_position must have 2 entries"),
    (torch.tensor([[0, 1]]), 2, ValueError, r"2-D cache_position must have shape \(batch, seq\)=\(2, 2\), got \(1, 2\)"),
    (torch.tensor([-1, 0]), 2, ValueError, r"cache_position must be >= 0, got minimum -1"),
    (torch.tensor([0.0, 1.0]), 2, TypeError, r"cache_position must be an integer tensor, got dtype torch.float32"),
    (torch.zeros(1, 1, 2, dtype=torch.long), 2, ValueError, r"cache_position must be 0-D, 1-D or 2-D, got 3-D"),
    ("0", 2, TypeError, r"cache_position must be None, an int or a tensor, got str"),
])
def test_cache_position_errors(pos, seq, exc, match):
    with pytest.raises(exc, match=match):
        DynamicKVCache().update(*kv(b=2, s=seq), 0, cache_position=pos)


def test_batch_op_errors():
    cache = DynamicKVCache()
    cache.update(*kv(b=2), 0)
    with pytest.raises(IndexError, match=r"indices must be in \[0, 2\) for a cache of batch size 2, got \[0, 2\]"):
        cache.batch_select_indices([0, 2])
    with pytest.raises(ValueError, match=r"indices must be 1-D, got shape \(1, 2\)"):
        cache.batch_select_indices([[0, 1]])
    with pytest.raises(ValueError, match=r"repeats must be a positive int, got 0"):
        cache.batch_repeat_interleave(0)


def test_package_exports_and_imports_nothing_but_torch_and_stdlib():
    assert set(kv_cache.__all__) >= {"Cache", "DynamicKVCache", "StaticKVCache", "SubStaticCache",
                                     "EncoderDecoderCache", "KVCache", "CacheCapacityError"}
    # DESIGN.md: kv_cache depends on torch only.  Triton counts as torch: it is PyTorch's own GPU
    # kernel language (CUDA builds of torch require it; torch.compile writes it), imported optionally
    # by the quantized cache's GPU kernel only.
    allowed = {"torch", "triton"} | set(sys.stdlib_module_names)
    package = pathlib.Path(kv_cache.__file__).parent
    paths = sorted(package.rglob("*.py"))
    assert {p.parent.name for p in paths} >= {"basic", "long_context", "paged", "reference"}  # the subpackages are read
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            elif isinstance(node, ast.ImportFrom):  # relative: must stay inside kv_cache
                assert node.level <= len(path.relative_to(package).parts), f"{path} imports from outside kv_cache"
                continue
            else:
                continue
            assert roots <= allowed, f"{path.relative_to(package)} imports {roots - allowed}"


@pytest.mark.parametrize("pos", [torch.tensor([3, 3]), torch.tensor([[0, 1], [2, 2]])])
def test_duplicate_positions_are_rejected(pos):
    cache = DynamicKVCache()
    k = torch.zeros(2, 1, 2, 4)
    with pytest.raises(ValueError, match="duplicate"):
        cache.update(k, k, 0, cache_position=pos)
