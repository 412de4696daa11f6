"""Small models and cache factories shared by the tests.

Random weights are drawn with a large standard deviation so that logits are far apart:
greedy ties (which would make "identical tokens" flaky under float rounding) are then
vanishingly unlikely, while the cached path still has to reproduce the uncached one.
"""

from __future__ import annotations

import torch

from kv_cache import DynamicKVCache, EncoderDecoderCache, StaticKVCache, SubStaticCache
from transformer import DecoderOnlyTransformer, EncoderDecoderTransformer, ModelConfig

ATTN = {"mha": 4, "gqa": 2, "mqa": 1}


def scaled_init(model: torch.nn.Module, std: float = 0.25, seed: int = 0) -> torch.nn.Module:
    """Re-draw every weight matrix from N(0, std) (deterministically) and return the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny_config(attn: str = "mha", pos: str = "learned", **kw) -> ModelConfig:
    """A 2-layer, 32-wide config with 4 query heads and ``ATTN[attn]`` key/value heads."""
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=ATTN[attn], max_seq_len=128,
                pos_encoding=pos)
    base.update(kw)
    return ModelConfig(**base)


def tiny_decoder(attn="mha", pos="learned", seed=0, **kw) -> DecoderOnlyTransformer:
    torch.manual_seed(seed)
    return scaled_init(DecoderOnlyTransformer(tiny_config(attn, pos, **kw)), seed=seed)


def tiny_seq2seq(attn="mha", pos="learned", seed=0, **kw) -> EncoderDecoderTransformer:
    torch.manual_seed(seed)
    kw.setdefault("bos_token_id", 1)
    return scaled_init(EncoderDecoderTransformer(tiny_config(attn, pos, **kw)), seed=seed)


CACHE_KINDS = ["dynamic-bhsd", "dynamic-bshd", "static-bhsd", "static-bshd", "substatic-bhsd", "substatic-bshd"]


def make_test_cache(kind: str, config: ModelConfig, batch: int, max_len: int):
    """Build one of ``CACHE_KINDS`` for ``config``.

    ``substatic`` carves the rows out of the middle of a larger static pool whose other rows
    are filled with garbage first, so a write to the wrong rows would show up.
    """
    impl, layout = kind.split("-")
    if impl == "dynamic":
        return DynamicKVCache(layout=layout, initial_capacity=4)
    shape = dict(max_cache_len=max_len, num_layers=config.n_layers, num_heads=config.n_heads,
                 num_kv_heads=config.n_kv_heads, head_dim=config.head_dim, layout=layout)
    if impl == "static":
        return StaticKVCache(max_batch_size=batch, **shape)
    parent = StaticKVCache(max_batch_size=batch + 3, **shape)
    for l in range(config.n_layers):
        junk = torch.randn(batch + 3, config.n_kv_heads, max_len, config.head_dim)
        if layout == "bshd":
            junk = junk.transpose(1, 2).contiguous()
        parent.update(junk, junk, l)
    return SubStaticCache(parent, 2, batch)


def make_seq2seq_cache(kind: str, config: ModelConfig, batch: int, max_len: int, src_len: int):
    """An ``EncoderDecoderCache`` whose two halves are both of ``kind``."""
    return EncoderDecoderCache(make_test_cache(kind, config, batch, max_len),
                               make_test_cache(kind, config, batch, src_len))


def left_pad(prompts, pad_id: int = 0):
    """Left-pad a list of 1-D LongTensors into ``(ids, attention_mask)`` of shape ``(B, max_len)``."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = p
        mask[i, n - len(p):] = 1
    return ids, mask


def write_play_excerpts(path, **chars_per_play) -> "pathlib.Path":
    """Write the first ``n`` characters of each named play of the default corpus (in the order
    given) to ``path``, as one UTF-8 text file: a small, real training corpus for CLI tests.
    Returns ``path``."""
    from transformer.data import load_corpus
    plays = {d.name: d.text for d in load_corpus()}
    path.write_text("".join(plays[name][:n] for name, n in chars_per_play.items()), encoding="utf-8")
    return path
