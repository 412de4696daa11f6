"""Every Python example of reference documents 001, 002 and 003 runs here as written, and is right.

Each test copies one example of a document in ``../shared/seeds/`` (marked ``# --- document``
... ``# --- end``).  Only import lines are adapted to this project's module names: ``lucid`` ->
``torch``, ``lucid.nn`` -> ``kv_cache``, ``from kv_cache import OptimizedTransformer`` and
``transformer_with_kv_cache`` -> ``transformer``, ``kv_cache_demo`` ->
``benchmarks.kv_cache_demo``, ``flash_dmattn`` -> ``kv_cache``.  Names an example uses but
does not define (``k_tensor``, ``src``, ``training_data``, ``optimizer``...) are defined by the
test just above the copied code, under a comment.  Where an example names
``torch.device('cuda')`` it runs as written on a machine with CUDA, on the CPU otherwise (a
one-line comment marks the substitution).

After each example the test checks that the result is *right*, not merely that nothing raised:
tensor values and shapes, the most recent tokens kept by ``crop``, sampled tokens reproduced
by hand from the uncached model's logits (same seed, same draws: proves the cache and the
temperature / top-k / top-p processing), attention equal to a brute-force top-k computation.

Examples that cannot run exactly as written, and what is done instead:

* 001 "Beam search": ``lucid.Tensor(data, dtype=lucid.Int32)`` is lucid's spelling of
  ``torch.tensor(data, dtype=torch.int32)``; ``import lucid`` is adapted to a torch namespace
  that spells those two names lucid's way (:data:`LUCID`), and the example text is unchanged.
* 002 "Training and Inference Workflow": ``loss = model(src, tgt); loss.backward()``.  The
  forward pass returns logits ``(B, T, V)`` (documented: "Training is unchanged: ``logits =
  model(src, tgt)``"), so ``backward`` on it raises; one test proves that, the next runs the
  workflow with the loss computed from those logits (one line changed, marked).
* 002 "Integration with Existing Code": ``EnhancedTransformer(src_vocab_size,
  tgt_vocab_size, ...)`` -- the ``...`` is the document's placeholder for the other arguments
  (a literal ``Ellipsis`` is refused with an error naming ``d_model``, tested); the "Before"
  lines name the reader's own pre-cache ``Transformer`` class, which this project does not
  have -- the "Backward Compatibility" claims they stand for (same forward, same weights) are
  tested against the project's plain ``EncoderDecoderTransformer`` instead.
* 002 "Greedy Sampling" passes ``temperature=1.0``, which *samples* here (``temperature=0``
  is greedy, as documented in :mod:`transformer.enhanced`); the test checks it samples the
  model's unmodified distribution.

The bash block of document 003 ("Testing and Validation") names files of flash-dmattn and is
not Python.

Document 004 ("Advanced KV Cache Integration Guide") is long: it defines whole classes (an
attention module, a model, a speculative-decoding pair, a monitor).  Its examples and their
tests live in ``tests/reference_snippets_004.py`` (read its docstring for what each proves) and
are collected here, at the end of this file, so that this one file runs every example of the
four documents.
"""

from __future__ import annotations

import logging as _logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: ``import lucid`` of document 001: torch, with lucid's names for a tensor built from data
#: (``lucid.Tensor(data, dtype=...)`` = ``torch.tensor``) and for int32 (``lucid.Int32``).
LUCID = SimpleNamespace(randn=torch.randn, Tensor=lambda data, dtype=None: torch.tensor(data, dtype=dtype),
                        Int32=torch.int32)


# ============================================================================ helpers
def _seed(n: int) -> None:
    """The test's seed (module-level, so a test may ``import torch`` as its example does)."""
    torch.manual_seed(n)


def _generator(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


def allowed_probs(logits: torch.Tensor, temperature: float, top_k=None, top_p=None) -> torch.Tensor:
    """The sampling distribution, computed by hand: ``softmax(logits / T)`` restricted to the
    ``top_k`` largest, then to the smallest most likely set reaching mass ``top_p``, renormalised.
    ``logits`` ``(V,)`` -> probabilities ``(V,)``."""
    z = logits.float() / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        keep[z.argsort(descending=True)[top_k:]] = False
    if top_p is not None:
        p = torch.softmax(z.masked_fill(~keep, float("-inf")), -1)
        order = p.argsort(descending=True)
        before = torch.cumsum(p[order], 0) - p[order]  # mass of the more likely tokens
        keep[order[before >= top_p]] = False
    return torch.softmax(z.masked_fill(~keep, float("-inf")), -1)


@torch.no_grad()
def replay(model, src, generated, temperature=1.0, top_k=None, top_p=None):
    """Redraw ``generated`` ``(1, T)`` token by token from the *uncached* model's logits (one
    teacher-forced pass) with the global RNG, exactly as sampling consumes it (one
    ``torch.multinomial`` per step).  Seeded like the generation, it must give the same tokens."""
    model.eval()
    logits = model(src, generated[:, :-1])[0]  # (T-1, V): step i predicts token i+1
    drawn = [int(generated[0, 0])]
    for row in logits:
        drawn.append(int(torch.multinomial(allowed_probs(row, temperature, top_k, top_p)[None], 1)))
    return torch.tensor([drawn], device=generated.device)


def check_generation(model, src, generated, max_length, seed, **sampling):
    """``generated`` starts with BOS, fits ``max_length``, stops only at EOS or the limit, and is
    exactly what seeded sampling from the uncached model draws."""
    cfg = model.config
    assert generated.shape[0] == 1 and 2 <= generated.shape[1] <= max_length
    assert int(generated[0, 0]) == cfg.bos_token_id
    assert generated.shape[1] == max_length or int(generated[0, -1]) == cfg.eos_token_id
    if seed is not None:  # else the caller has put the random stream where the sampling started
        torch.manual_seed(seed)
    assert torch.equal(replay(model, src, generated, **sampling), generated)


# ============================================================================ document 001: lucid.nn.cache
def test_001_quick_start(capsys):
    # --- document 001, "Quick start" (imports adapted: lucid -> torch, lucid.nn -> kv_cache)
    import torch as lucid
    import kv_cache as nn

    cache = nn.DynamicKVCache()

    # key/value shape example: (batch, heads, seq_len, head_dim)
    key = lucid.randn(2, 8, 1, 64)
    value = lucid.randn(2, 8, 1, 64)

    # append into layer 0
    k_all, v_all = cache.update(key, value, layer_idx=0)
    print(k_all.shape, v_all.shape)  # (2, 8, 1, 64), (2, 8, 1, 64)

    # next token append
    key2 = lucid.randn(2, 8, 1, 64)
    value2 = lucid.randn(2, 8, 1, 64)
    k_all, v_all = cache.update(key2, value2, layer_idx=0)
    print(cache.get_seq_length(0))   # 2
    # --- end
    assert capsys.readouterr().out.splitlines() == ["torch.Size([2, 8, 1, 64]) torch.Size([2, 8, 1, 64])", "2"]
    assert torch.equal(k_all, torch.cat([key, key2], 2)) and torch.equal(v_all, torch.cat([value, value2], 2))


def test_001_beam_search_snippet():
    # --- document 001, "Beam search snippets" (imports adapted: lucid.nn -> kv_cache; lucid -> LUCID, torch
    # spelling lucid.Tensor(data, dtype=...) and lucid.Int32 the lucid way)
    import kv_cache as nn
    lucid = LUCID

    cache = nn.DynamicKVCache()
    # ... prefill/update cache first ...
    # (defined elsewhere: the prefill of one prompt of 5 tokens, in 2 layers)
    prompt = [(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)) for _ in range(2)]
    for layer, (k, v) in enumerate(prompt):
        cache.update(k, v, layer_idx=layer)

    num_beams = 4
    cache.batch_repeat_interleave(num_beams)   # B -> B*num_beams

    # after beam pruning
    # (defined elsewhere: one decoding step, each beam appending its own token)
    steps = [(torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4)) for _ in range(2)]
    for layer, (k, v) in enumerate(steps):
        cache.update(k, v, layer_idx=layer)
    beam_idx = lucid.Tensor([3, 1, 0, 2], dtype=lucid.Int32)
    cache.reorder_cache(beam_idx)
    # --- end
    order = [3, 1, 0, 2]
    for layer in range(2):
        keys, values = cache.get(layer)
        want_k = torch.cat([prompt[layer][0].expand(4, -1, -1, -1), steps[layer][0]], 2)[order]
        want_v = torch.cat([prompt[layer][1].expand(4, -1, -1, -1), steps[layer][1]], 2)[order]
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)  # row i is old beam beam_idx[i]
    assert cache.get_seq_length(0) == 6 and cache.batch_size == 4


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_001_memory_control_snippet_keeps_the_most_recent_tokens(kind):
    from kv_cache import DynamicKVCache, StaticKVCache
    # (defined elsewhere: a cache holding 1100 tokens in each of 2 layers)
    cache = DynamicKVCache() if kind == "dynamic" else StaticKVCache(
        max_cache_len=1200, num_layers=2, num_heads=2, head_dim=4)
    history = [(torch.randn(1, 2, 1100, 4), torch.randn(1, 2, 1100, 4)) for _ in range(2)]
    for layer, (k, v) in enumerate(history):
        cache.update(k, v, layer_idx=layer)
    # --- document 001, "Memory control snippet"
    # keep only most recent 1024 tokens
    cache.crop(1024)
    # --- end
    for layer, (k, v) in enumerate(history):
        keys, values = cache.get(layer)
        assert torch.equal(keys, k[:, :, -1024:]) and torch.equal(values, v[:, :, -1024:])
        assert torch.equal(cache.key_positions(layer), torch.arange(76, 1100))  # the positions they hold
        assert cache.get_seq_length(layer) == 1100  # the next token is still position 1100
    k_next = torch.randn(1, 2, 1, 4)
    keys, _ = cache.update(k_next, k_next, layer_idx=0)
    assert keys.shape[2] == 1025 and torch.equal(keys[:, :, -1:], k_next)
    assert cache.key_positions(0).tolist() == list(range(76, 1101))
    # --- document 001, "Memory control snippet" (continued)
    # clear everything between requests
    cache.reset()
    # --- end
    assert cache.get_seq_length(0) == 0 and cache.get(0) is None and cache.is_lossless
    cache.update(k_next, k_next, layer_idx=0)
    assert cache.key_positions(0).tolist() == [0]  # a new request starts at position 0


# ============================================================================ document 002: KV cache for inference
DOC_MODEL = dict(src_vocab_size=1000, tgt_vocab_size=1000, d_model=512, num_heads=8, d_ff=2048, num_layers=6)


@pytest.fixture(scope="module")
def doc_model():
    """The model of 002's "Enhanced Transformer Integration" (cache enabled), for the examples
    that use ``model`` without defining it."""
    from transformer import EnhancedTransformer
    torch.manual_seed(0)
    model = EnhancedTransformer(**DOC_MODEL)
    model.enable_cache(max_seq_len=2048)
    return model


@pytest.fixture(scope="module")
def doc_src():
    """``src`` of 002's "Quick Start": ``torch.randint(1, 1000, (1, 10))``."""
    return torch.randint(1, 1000, (1, 10), generator=torch.Generator().manual_seed(1))


def test_002_quick_start_basic_usage():
    _seed(11)  # (the test's seed: the sampled tokens are then reproducible)
    # --- document 002, "Basic Usage" (import adapted: kv_cache -> transformer)
    from transformer import OptimizedTransformer

    # Create model with KV cache support
    model = OptimizedTransformer(
        src_vocab_size=1000,
        tgt_vocab_size=1000,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_layers=6
    )

    # Generate with KV cache (default behavior)
    src = torch.randint(1, 1000, (1, 10))
    generated = model.generate(src, max_length=50, temperature=0.8)
    # --- end
    assert model.kv_cache.is_initialized and model.kv_cache.get_seq_len() == generated.shape[1] - 1  # cache used
    assert model.kv_cache.get_seq_len(0, "cross") == 10  # the source, projected once
    _seed(11)  # replay: the same construction and source draws, then the sampled tokens by hand
    OptimizedTransformer(**DOC_MODEL)
    assert torch.equal(torch.randint(1, 1000, (1, 10)), src)
    check_generation(model, src, generated, 50, seed=None, temperature=0.8)


def test_002_enhanced_transformer_integration(doc_src):
    src = doc_src  # (defined elsewhere: the source of "Quick Start")
    _seed(12)
    # --- document 002, "Enhanced Transformer Integration" (import adapted: transformer_with_kv_cache -> transformer)
    from transformer import EnhancedTransformer

    # Create enhanced transformer (drop-in replacement)
    model = EnhancedTransformer(
        src_vocab_size=1000,
        tgt_vocab_size=1000,
        d_model=512,
        num_heads=8,
        d_ff=2048,
        num_layers=6
    )

    # Enable cache with custom settings
    model.enable_cache(max_seq_len=2048)

    # Generate with cache
    generated = model.generate(src, max_length=100, use_cache=True)

    # Disable cache for naive generation
    generated_naive = model.generate(src, max_length=100, use_cache=False)
    # --- end
    assert model.kv_cache.max_seq_len == 2048 and model.kv_cache.get_seq_len() == generated.shape[1] - 1
    # Both calls sample (temperature 1.0).  Replay them in order from the same seed: the naive
    # call continued the cached call's random stream.
    _seed(12)
    EnhancedTransformer(**DOC_MODEL)  # the construction's draws
    check_generation(model, src, generated, 100, seed=None)
    check_generation(model, src, generated_naive, 100, seed=None)


def test_002_greedy_sampling(doc_model, doc_src):
    model, src = doc_model, doc_src  # (defined elsewhere: the model and source above)
    _seed(13)
    # --- document 002, "Greedy Sampling" (temperature 1.0 samples the model's own distribution here)
    generated = model.generate(src, max_length=50, temperature=1.0)
    # --- end
    check_generation(model, src, generated, 50, seed=13, temperature=1.0)
    assert model.kv_cache.get_seq_len() == generated.shape[1] - 1  # decoded through the cache


def test_002_temperature_sampling(doc_model, doc_src):
    model, src = doc_model, doc_src  # (defined elsewhere: the model and source above)
    _seed(13)
    # --- document 002, "Temperature Sampling"
    generated = model.generate(src, max_length=50, temperature=0.8)
    # --- end
    check_generation(model, src, generated, 50, seed=13, temperature=0.8)


def test_002_top_k_sampling(doc_model, doc_src):
    model, src = doc_model, doc_src  # (defined elsewhere: the model and source above)
    _seed(13)
    # --- document 002, "Top-k Sampling"
    generated = model.generate(src, max_length=50, temperature=1.0, top_k=50)
    # --- end
    check_generation(model, src, generated, 50, seed=13, temperature=1.0, top_k=50)
    logits = model(src, generated[:, :-1])[0]
    ranks = (logits > logits.gather(-1, generated[0, 1:, None])).sum(-1)  # tokens more likely than the drawn one
    assert int(ranks.max()) < 50  # every token came from its step's top 50


def test_002_top_p_sampling(doc_model, doc_src):
    model, src = doc_model, doc_src  # (defined elsewhere: the model and source above)
    _seed(13)
    # --- document 002, "Top-p (Nucleus) Sampling"
    generated = model.generate(src, max_length=50, temperature=1.0, top_p=0.9)
    # --- end
    check_generation(model, src, generated, 50, seed=13, temperature=1.0, top_p=0.9)


def test_002_combined_strategies(doc_model, doc_src):
    model, src = doc_model, doc_src  # (defined elsewhere: the model and source above)
    _seed(14)
    # --- document 002, "Combined Strategies"
    generated = model.generate(
        src, 
        max_length=50, 
        temperature=0.8, 
        top_k=50, 
        top_p=0.9
    )
    # --- end
    check_generation(model, src, generated, 50, seed=14, temperature=0.8, top_k=50, top_p=0.9)
    _seed(14)  # and the uncached model draws the very same tokens
    assert torch.equal(model.generate(src, max_length=50, temperature=0.8, top_k=50, top_p=0.9, use_cache=False),
                       generated)


def test_002_advanced_usage_manual_cache():
    # (defined elsewhere: the 10 new tokens' keys and values, for a batch of 4)
    device = torch.device("cuda" if CUDA else "cpu")
    k_tensor, v_tensor = torch.randn(4, 8, 10, 64, device=device), torch.randn(4, 8, 10, 64, device=device)
    # --- document 002, "Advanced Usage" (import adapted: kv_cache is this project's kv_cache)
    from kv_cache import KVCache

    # Manual cache management
    cache = KVCache(
        num_layers=6,
        num_heads=8,
        d_k=64,
        max_seq_len=2048,
        dtype=torch.float32,
        device=torch.device('cuda') if CUDA else torch.device('cpu')  # the document's 'cuda'; the CPU without one
    )

    # Initialize for batch
    cache.initialize_cache(batch_size=4)

    # Update cache with new K/V tensors
    cache.update_cache(layer_idx=0, attention_type='self', k=k_tensor, v=v_tensor, seq_len=10)

    # Retrieve cached tensors
    cached_k, cached_v = cache.get_cached_kv(layer_idx=0, attention_type='self', seq_len=10)
    # --- end
    assert torch.equal(cached_k, k_tensor) and torch.equal(cached_v, v_tensor)  # exactly the 10 tokens written
    assert cache.get_seq_len(0) == 10 and cache.get_seq_len(1) == 0 and cache.get_seq_len(0, "cross") == 0
    assert cache.memory_bytes() == 2 * 2 * 6 * 4 * 8 * 2048 * 64 * 4  # self+cross, K+V, layers, fp32
    # --- document 002, "Advanced Usage" (continued)
    # Clear cache when done
    cache.clear_cache()
    # --- end
    assert not cache.is_initialized and cache.memory_bytes() == 0


def test_002_benchmarking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # plot_benchmark_results writes kv_cache_benchmark.png into the working folder
    # --- document 002, "Benchmarking" (import adapted: kv_cache_demo -> benchmarks.kv_cache_demo)
    from benchmarks.kv_cache_demo import benchmark_comparison

    # Run performance comparison
    results = benchmark_comparison(
        seq_lengths=[10, 20, 50, 100],
        batch_size=2,
        num_runs=5
    )

    # Plot results
    from benchmarks.kv_cache_demo import plot_benchmark_results
    plot_benchmark_results(results)
    # --- end
    assert results["seq_lengths"] == [10, 20, 50, 100] and results["settings"]["batch_size"] == 2
    for L in (10, 20, 50, 100):
        row = results["results"][L]
        assert row["new_tokens"] == L - 1
        assert len(row["cached"]["samples_s"]) == len(row["uncached"]["samples_s"]) == 5
        assert row["speedup"] == pytest.approx(row["uncached"]["mean_s"] / row["cached"]["mean_s"])
    # The document's claim: the cache wins, more so for long sequences (measured here: ~6x at 100).
    assert results["results"][100]["speedup"] > 1
    assert (tmp_path / "kv_cache_benchmark.png").read_bytes()[:8] == PNG_MAGIC


def _small_enhanced(seed=0, **kw):
    from transformer import EnhancedTransformer
    torch.manual_seed(seed)
    return EnhancedTransformer(**{**dict(src_vocab_size=1000, tgt_vocab_size=1000, d_model=64, num_heads=4, d_ff=128,
                                         num_layers=2), **kw})


def test_002_integration_with_existing_code():
    # (defined elsewhere: the reader's vocabulary sizes and input)
    src_vocab_size, tgt_vocab_size = 1000, 1000
    input_sequence = torch.randint(1, 1000, (1, 8), generator=_generator(2))
    _seed(3)
    # --- document 002, "Integration with Existing Code", step 1, "After" (import adapted)
    from transformer import EnhancedTransformer
    # --- document 002, step 2, "After": the document's "..." stands for the other constructor arguments
    model = EnhancedTransformer(src_vocab_size, tgt_vocab_size, d_model=64, num_heads=4, d_ff=128, num_layers=2)
    # --- document 002, step 3
    # Enable cache
    model.enable_cache(max_seq_len=2048)

    # Generate with cache
    output = model.generate(input_sequence, max_length=100)
    # --- end
    _seed(3)
    EnhancedTransformer(src_vocab_size, tgt_vocab_size, d_model=64, num_heads=4, d_ff=128, num_layers=2)  # same draws
    check_generation(model, input_sequence, output, 100, seed=None)
    with pytest.raises(ValueError, match=r"d_model must be a positive int, got Ellipsis"):
        EnhancedTransformer(src_vocab_size, tgt_vocab_size, ...)  # the placeholder taken literally
    # "Backward Compatibility": same architecture (the weights load both ways), same forward pass.
    from transformer import EncoderDecoderTransformer
    plain = EncoderDecoderTransformer(model.config)
    plain.load_state_dict(model.state_dict(), strict=True)
    model.eval(), plain.eval()
    tgt = torch.randint(3, 1000, (1, 5))
    assert torch.equal(model(input_sequence, tgt), plain(input_sequence, tgt))


def test_002_best_practices(capsys):
    model = _small_enhanced()  # (defined elsewhere: a model whose cache was used)
    model.enable_cache(max_seq_len=64)
    src = torch.randint(1, 1000, (1, 6))
    model.generate(src, max_length=10)
    expected_max_length = 40  # (defined elsewhere)
    # --- document 002, "Best Practices"
    # Clear cache between different generation runs
    model.clear_cache()

    # Adjust cache size based on expected sequence length
    model.enable_cache(max_seq_len=expected_max_length)

    # Monitor memory usage
    if torch.cuda.is_available():
        memory_used = torch.cuda.memory_allocated() / 1024**2
        print(f"GPU memory: {memory_used:.2f} MB")
    # --- end
    assert model.kv_cache.max_seq_len == 40 and not model.kv_cache.is_initialized
    out = capsys.readouterr().out
    assert (out.startswith("GPU memory: ") and out.endswith(" MB\n")) if CUDA else out == ""
    assert model.generate(src, max_length=40, temperature=0).shape[1] <= 40
    with pytest.raises(ValueError, match=r"max_length=41 .* exceed the cache's max_seq_len=40"):
        model.generate(src, max_length=41)


def test_002_custom_cache_settings_and_layer_specific_caching():
    from kv_cache import KVCache  # (the import of "Advanced Usage")
    # --- document 002, "Custom Cache Settings"
    # Create custom cache with specific parameters
    cache = KVCache(
        num_layers=12,           # Number of transformer layers
        num_heads=16,            # Number of attention heads
        d_k=64,                  # Dimension per head
        max_seq_len=4096,        # Maximum sequence length
        dtype=torch.float16,     # Use half precision for memory efficiency
        device=torch.device('cuda') if CUDA else torch.device('cpu')  # the document's 'cuda'; the CPU without one
    )
    # --- end
    assert (cache.num_layers, cache.num_heads, cache.d_k, cache.max_seq_len, cache.dtype) == (12, 16, 64, 4096,
                                                                                             torch.float16)
    # (defined elsewhere: the cache initialised for one sequence, and one layer's 7 new keys/values)
    cache.initialize_cache(batch_size=1)
    assert cache.memory_bytes() == 2 * 2 * 12 * 1 * 16 * 4096 * 64 * 2  # half precision: 2 bytes per number
    device = cache.device
    k, v = torch.randn(1, 16, 7, 64, dtype=torch.float16, device=device), torch.randn(1, 16, 7, 64,
                                                                                      dtype=torch.float16,
                                                                                      device=device)
    seq_len = 7
    # --- document 002, "Layer-Specific Caching"
    # Cache only specific layers
    for layer_idx in [0, 2, 4]:  # Cache only even layers
        cache.update_cache(layer_idx, 'self', k, v, seq_len)
    # --- end
    for layer_idx in range(12):
        want = 7 if layer_idx in (0, 2, 4) else 0
        assert cache.get_seq_len(layer_idx) == want
        if want:
            ck, cv = cache.get_cached_kv(layer_idx, "self", seq_len)
            assert torch.equal(ck, k) and torch.equal(cv, v)
    cache.clear_cache()


def test_002_debug_mode(capsys):
    model = _small_enhanced()  # (defined elsewhere: a model with its cache enabled and used)
    model.enable_cache(max_seq_len=64)
    src = torch.randint(1, 1000, (1, 6))
    generated = model.generate(src, max_length=12, temperature=0)
    root = _logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        # --- document 002, "Debug Mode"
        # Enable debug output
        import logging
        logging.basicConfig(level=logging.DEBUG)

        # Check cache status
        if model.kv_cache is not None:
            print(f"Cache initialized: {model.kv_cache.is_initialized}")
            print(f"Current seq len: {model.kv_cache.get_seq_len()}")
        # --- end
    finally:  # leave the logging of the test session as it was
        root.setLevel(level)
        root.handlers[:] = handlers
    n = generated.shape[1] - 1  # every decoder token but the last was fed through the cache
    assert capsys.readouterr().out.splitlines() == ["Cache initialized: True", f"Current seq len: {n}"]


def test_002_complete_generation_example(capsys):
    _seed(15)  # (the test's seed)
    # --- document 002, "Complete Generation Example" (import adapted: transformer_with_kv_cache -> transformer)
    import torch
    from transformer import EnhancedTransformer

    # Setup
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model = EnhancedTransformer(
        src_vocab_size=1000,
        tgt_vocab_size=1000,
        d_model=256,
        num_heads=8,
        d_ff=1024,
        num_layers=4
    ).to(device)

    # Enable cache
    model.enable_cache(max_seq_len=1024)

    # Generate text
    src = torch.randint(1, 1000, (1, 10), device=device)
    generated = model.generate(
        src,
        max_length=100,
        temperature=0.8,
        top_k=50,
        top_p=0.9
    )

    print(f"Generated sequence: {generated[0].tolist()}")
    # --- end
    assert capsys.readouterr().out == f"Generated sequence: {generated[0].tolist()}\n"
    assert model.kv_cache.device.type == device.type and model.kv_cache.get_seq_len() == generated.shape[1] - 1
    _seed(15)  # replay: the same construction and source draws, then the sampled tokens by hand
    EnhancedTransformer(src_vocab_size=1000, tgt_vocab_size=1000, d_model=256, num_heads=8, d_ff=1024, num_layers=4)
    assert torch.equal(torch.randint(1, 1000, (1, 10), device=device), src)
    check_generation(model, src, generated, 100, seed=None, temperature=0.8, top_k=50, top_p=0.9)


def _training_setup():
    # (defined elsewhere: the model -- without dropout, so that training draws no random numbers and
    # the sampled outputs can be replayed -- a batch, the optimizer, the data)
    model = _small_enhanced(seed=4, dropout=0.0)
    g = _generator(4)
    src, tgt = torch.randint(3, 1000, (2, 10), generator=g), torch.randint(3, 1000, (2, 12), generator=g)
    training_data = range(8)  # eight steps over the batch (src, tgt)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    test_data = [torch.randint(3, 1000, (1, n), generator=g) for n in (5, 9)]
    return model, src, tgt, training_data, optimizer, test_data


def _next_token_loss(model, src, tgt):
    return F.cross_entropy(model(src, tgt)[:, :-1].flatten(0, 1), tgt[:, 1:].flatten())


def test_002_training_workflow_as_written_raises_because_forward_returns_logits():
    model, src, tgt, training_data, optimizer, test_data = _training_setup()
    with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
        # --- document 002, "Training and Inference Workflow" (training part)
        # Training (no cache needed)
        model.train()
        for batch in training_data:
            loss = model(src, tgt)  # Standard forward pass
            loss.backward()
            optimizer.step()
        # --- end
    assert loss.shape == (2, 12, 1000)  # the forward pass gives logits, not a loss


def test_002_training_and_inference_workflow():
    model, src, tgt, training_data, optimizer, test_data = _training_setup()
    model.eval()
    with torch.no_grad():
        first_loss = _next_token_loss(model, src, tgt).item()
    outputs = []  # (the test's record of the processed outputs)
    _seed(16)  # (the test's seed)
    # --- document 002, "Training and Inference Workflow" (the loss line adapted: forward returns logits)
    # Training (no cache needed)
    model.train()
    for batch in training_data:
        loss = F.cross_entropy(model(src, tgt)[:, :-1].flatten(0, 1), tgt[:, 1:].flatten())  # was: model(src, tgt)
        loss.backward()
        optimizer.step()

    # Inference with cache
    model.eval()
    model.enable_cache(max_seq_len=2048)

    for input_sequence in test_data:
        generated = model.generate(input_sequence, max_length=200)
        # Process generated output
        outputs.append(generated)

    # Clear cache for next batch
    model.clear_cache()
    # --- end
    with torch.no_grad():
        assert _next_token_loss(model, src, tgt).item() < 0.8 * first_loss  # training fits the batch (6.9 -> 4.4)
    assert not model.kv_cache.is_initialized
    _seed(16)  # replay every generation, in order, from the same seed
    for input_sequence, generated in zip(test_data, outputs):
        check_generation(model, input_sequence, generated, 200, seed=None)


# ============================================================================ document 003: linear KV cache
def _top_k_attention(query, keys, values, bias, keep):
    """Brute force: per head, softmax(q . k / sqrt(D) + bias) v over the ``keep`` keys of highest
    bias among all of them.  query ``(1, H, 1, D)``, keys/values ``(1, H, N, D)``, bias ``(1, H, N)``."""
    out = []
    for h in range(query.shape[1]):
        top = bias[0, h].topk(min(keep, bias.shape[-1])).indices
        s = query[0, h, 0] @ keys[0, h, top].T / keys.shape[-1] ** 0.5 + bias[0, h, top]
        out.append(torch.softmax(s, -1) @ values[0, h, top])
    return torch.stack(out)[None, :, None]


def test_003_linear_kv_cache_class():
    device = torch.device("cuda" if CUDA else "cpu")  # (defined elsewhere)
    # --- document 003, "LinearKVCache Class" (import adapted: flash_dmattn -> kv_cache)
    from kv_cache import LinearKVCache

    cache = LinearKVCache(
        keep_window_size=2048,
        num_heads=32, 
        head_dim=128,
        dtype=torch.bfloat16,
        device=device
    )
    # --- end
    assert cache.get_max_cache_shape() == 2048 and cache.memory_bytes() == 0  # nothing allocated yet
    k = torch.randn(1, 32, 3, 128, dtype=torch.bfloat16, device=device)
    keys, values = cache.update(k, -k, 0, importance=torch.randn(1, 32, 3, device=device))
    assert torch.equal(keys, k) and torch.equal(values, -k) and cache.get_cache_info()["cached_tokens"] == 3
    # "Fixed-size Storage": exactly keep_window_size slots, in the given dtype
    assert cache.memory_bytes() == 2 * 32 * 2048 * 128 * 2 + 32 * 2048 * (4 + 8)
    with pytest.raises(ValueError, match=r"dtype=torch.bfloat16"):
        cache.update(k.float(), k.float(), 0, importance=torch.randn(1, 32, 1, device=device))


def test_003_usage_example_equals_brute_force_top_k_attention():
    # (defined elsewhere: sizes, and the model's new keys/values/importance per step; recorded for the check)
    num_heads, head_dim, sequence_length = 2, 8, 2100  # longer than keep_window_size=2048: 52 evictions
    g = _generator(0)
    seen = {"k": [], "v": [], "b": []}

    def get_new_key():
        seen["k"].append(torch.randn(1, num_heads, 1, head_dim, generator=g))
        return seen["k"][-1]

    def get_new_value():
        seen["v"].append(torch.randn(1, num_heads, 1, head_dim, generator=g))
        return seen["v"][-1]

    def get_importance_score():
        seen["b"].append(torch.randn(1, num_heads, 1, 1, generator=g))
        return seen["b"][-1]

    # --- document 003, "Usage Example" (import adapted: flash_dmattn -> kv_cache)
    import torch
    from kv_cache import LinearKVCache, linear_kv_cache_attention

    # Initialize
    cache = None
    query = torch.randn(1, num_heads, 1, head_dim)

    # Inference loop
    for step in range(sequence_length):
        # Get new token
        new_key = get_new_key()  # [1, num_heads, 1, head_dim]
        new_value = get_new_value()  # [1, num_heads, 1, head_dim] 
        new_bias = get_importance_score()  # [1, num_heads, 1, 1]
        
        # Optimized attention
        output, cache = linear_kv_cache_attention(
            query, new_key, new_value, new_bias,
            cache=cache,
            keep_window_size=2048,
            sequence_position=step,
            inference_mode=True
        )
    # --- end
    assert isinstance(cache, LinearKVCache)
    keys, values = torch.cat(seen["k"], 2), torch.cat(seen["v"], 2)
    bias = torch.cat(seen["b"], 2)[..., 0]  # (1, H, N)
    torch.testing.assert_close(output, _top_k_attention(query, keys, values, bias, 2048), atol=1e-5, rtol=1e-5)
    info = cache.get_cache_info()
    assert info["tokens_seen"] == 2100 and info["cached_tokens"] == 2048 and info["evictions"] == 52
    for h in range(num_heads):  # the kept set is exactly the 2048 most important of all 2100
        kept = set(cache.key_positions(0)[0, h].tolist())
        assert kept == set(bias[0, h].topk(2048).indices.tolist())


def test_003_drop_in_replacement():
    # (defined elsewhere: a prompt's queries/keys/values and importance bias, and the standard
    # attention of flash-dmattn, written out here: causal softmax(q . k / sqrt(D) + bias) v)
    g = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    bias = torch.randn(1, 2, 1, 6, generator=g).expand(1, 2, 6, 6)
    cache = None

    def flash_dmattn_func(query, key, value, attn_bias):
        scores = query @ key.transpose(-1, -2) / key.shape[-1] ** 0.5 + attn_bias
        future = torch.ones(6, 6, dtype=torch.bool).triu(1)
        return torch.softmax(scores.masked_fill(future, float("-inf")), -1) @ value

    from kv_cache import linear_kv_cache_attention  # (import adapted: flash_dmattn -> kv_cache)
    # --- document 003, "Drop-in Replacement"
    # Before (standard inference)
    output = flash_dmattn_func(query, key, value, attn_bias=bias)
    # --- end
    before = output
    # --- document 003, "Drop-in Replacement" (continued)
    # After (optimized inference)
    output, cache = linear_kv_cache_attention(
        query, key, value, bias, cache=cache, inference_mode=True
    )
    # --- end
    torch.testing.assert_close(output, before, atol=1e-6, rtol=1e-6)  # a prompt: the standard attention
    assert cache.get_cache_info()["tokens_seen"] == 6 and cache.get_seq_length(0) == 6  # ready to decode


def test_003_memory_management(capsys):
    from kv_cache import LinearKVCache
    cache = LinearKVCache(keep_window_size=4)  # (defined elsewhere: a cache that was used)
    cache.update(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), 0, importance=torch.randn(1, 1, 3))
    # --- document 003, "Memory Management"
    # Clear cache between sequences
    cache.reset()

    # Check cache utilization
    info = cache.get_cache_info()
    print(f"Cache utilization: {info['capacity_utilization']:.1%}")

    # Monitor memory usage
    current_memory = torch.cuda.memory_allocated()
    # --- end
    assert capsys.readouterr().out == "Cache utilization: 0.0%\n"
    assert info["tokens_seen"] == 0 and cache.memory_bytes() == 0 and cache.get(0) is None
    assert isinstance(current_memory, int) and (current_memory >= 0 if CUDA else current_memory == 0)
    cache.update(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 3, 2), 0, importance=torch.randn(1, 1, 3))
    assert cache.get_cache_info()["capacity_utilization"] == 0.75  # 3 of 4 slots after a new sequence


# ============================================================================ document 004
# The examples of document 004 and their tests (see the module docstring): importing them here
# makes pytest collect them as part of this file.
from reference_snippets_004 import *  # noqa: E402,F401,F403
