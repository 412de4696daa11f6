"""The fast decode path (``transformer.fast_decode``) and its cache (``kv_cache.FixedShapeKVCache``).

Most tests run the fixed-shape step *eagerly* (``fast=True``): the same code ``torch.compile``
traces, at no compile cost.  One test compiles (marked below; ~20-40 s on a 2-core CPU).
No test times anything: speed is measured by ``benchmarks/fast_decode_benchmark.py``.
"""

from __future__ import annotations

import copy

import re

import pytest
import torch

from helpers import tiny_decoder
from kv_cache import DynamicKVCache, FixedShapeKVCache, StaticKVCache
from transformer import EncoderDecoderTransformer, FastDecoder, ModelConfig, process_logits
from transformer.fast_decode import get_fast_decoder, sample_on_device, uniform_noise

V = 61  # tiny_config's vocabulary


def prompt(batch=2, length=6, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- same tokens as generate()
@pytest.mark.parametrize("attn", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_greedy_matches_generate_and_uncached(attn, pos):
    model = tiny_decoder(attn, pos)
    ids = prompt()
    ref = model.generate(ids, 20)
    assert torch.equal(model.generate(ids, 20, use_cache=False), ref)
    assert torch.equal(model.generate(ids, 20, fast=True), ref)


@pytest.mark.parametrize("kw", [dict(norm="rmsnorm", bias=False, activation="silu"), dict(sliding_window=4),
                                dict(activation="gelu_tanh", tie_embeddings=False)])
def test_greedy_matches_generate_other_configs(kw):
    model = tiny_decoder("gqa", "rope", **kw)
    ids = prompt(3, 5)
    assert torch.equal(model.generate(ids, 16, fast=True), model.generate(ids, 16))


@pytest.mark.parametrize("attention", ["auto", "sdpa"])
def test_attention_argument_forms_match_generate(attention):
    model = tiny_decoder("gqa", "rope")
    ids = prompt(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    dec = FastDecoder(model, batch_size=2, max_cache_len=40, attention=attention)
    assert torch.equal(dec.generate(ids, 16, attention_mask=mask), model.generate(ids, 16, attention_mask=mask))


def test_left_padding_matches_generate():
    model = tiny_decoder("gqa", "learned")
    ids = prompt(3, 7)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :1] = 0
    assert torch.equal(model.generate(ids, 12, attention_mask=mask, fast=True),
                       model.generate(ids, 12, attention_mask=mask))


def shared_token(free: torch.Tensor, start: int) -> int:
    """A token every row of ``free`` produces after ``start`` (as eos, it stops the whole batch)."""
    common = set.intersection(*(set(r[start:].tolist()) for r in free))
    assert common, "pick another seed: no token is shared by all rows"
    return min(common)


def test_eos_stops_like_generate():
    model = tiny_decoder()
    ids = prompt(2, 5)
    free = model.generate(ids, 24, eos_token_id=None)
    eos = shared_token(free, 5 + 2)  # each row produces it: generation stops once both have
    ref = model.generate(ids, 24, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] < 5 + 24
    dec = FastDecoder(model, batch_size=2, max_cache_len=40, sync_every=5)  # the stop falls inside a burst
    out = dec.generate(ids, 24, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert torch.equal(model.generate(ids, 24, eos_token_id=eos, pad_token_id=0, fast=True), ref)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_short_runs(n):
    model = tiny_decoder()
    ids = prompt(1, 4)
    assert torch.equal(model.generate(ids, n, fast=True), model.generate(ids, n))


def test_decoder_is_reusable_across_prompt_lengths():
    model = tiny_decoder("mha", "rope")
    dec = FastDecoder(model, batch_size=2, max_cache_len=48)
    for length, n in ((9, 20), (3, 5), (9, 20), (1, 30)):
        ids = prompt(2, length, seed=length)
        assert torch.equal(dec.generate(ids, n), model.generate(ids, n))
    assert dec.cache.get_seq_length() == 1 + 30 - 1  # the last token is never fed back


def test_streamer_receives_every_token_in_order():
    model = tiny_decoder()
    ids = prompt(2, 4)
    seen = []
    out = model.generate(ids, 19, fast=True, streamer=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, 1), out[:, 4:])
    assert len(seen) == 19


# --------------------------------------------------------------------------- weights and the registry
def test_generate_keeps_one_decoder_per_shape_and_sees_weight_updates():
    model = tiny_decoder()
    ids = prompt(1, 5)
    model.generate(ids, 10, fast=True)
    first = get_fast_decoder(model, 1, 15, compile=False)
    assert get_fast_decoder(model, 1, 60, compile=False) is first  # same 64-slot bucket
    with torch.no_grad():  # an optimizer-like in-place change of the tied embedding / output head
        model.decoder.tok_emb.weight.mul_(-1.5)
    assert torch.equal(model.generate(ids, 10, fast=True), model.generate(ids, 10))
    for b in range(2, 7):
        get_fast_decoder(model, b, 15, compile=False)
    assert len(model._fast_decoders) == 4  # least recently used dropped
    clone = copy.deepcopy(model)  # the registry is not copied (CUDA graphs cannot be)
    assert len(clone._fast_decoders) == 0
    assert torch.equal(clone.generate(ids, 10, fast=True), model.generate(ids, 10))


def test_frozen_compiled_steps_are_dropped_after_weight_updates():
    """CPU compiles with inductor's ``freezing`` (weights baked into the compiled code): an
    in-place change of any parameter must throw the compiled steps away (checked without
    compiling: the bookkeeping only)."""
    model = tiny_decoder()
    dec = FastDecoder(model, max_cache_len=32, compile=True)
    assert dec.compile_options.get("freezing")
    dec._steps["a setting"], dec._weights_version = object(), dec._version()
    dec._drop_stale_compiled_steps()
    assert "a setting" in dec._steps  # nothing changed
    with torch.no_grad():
        model.decoder.blocks[0].mlp.fc_in.weight.add_(0.01)
    dec._drop_stale_compiled_steps()
    assert dec._steps == {}


def test_replaced_parameters_are_detected():
    model = tiny_decoder()
    ids = prompt(1, 5)
    dec = FastDecoder(model, max_cache_len=32)
    model.double()  # new parameter tensors
    with pytest.raises(RuntimeError, match="replaced"):
        dec.generate(ids, 4)
    assert torch.equal(model.generate(ids, 8, fast=True), model.generate(ids, 8))  # the registry rebuilds


# --------------------------------------------------------------------------- sampling on the device
def test_noise_constants_fit_in_int32():
    """Inductor's Triton kernels index small tensors with int32; a hash constant >= 2^31 then
    failed to compile on an H200 ("Scalar 2654435761 is out of range for type int32") at batch
    16 -- a GPU-only failure, so the invariant that prevents it is pinned here."""
    import inspect
    from transformer import fast_decode
    assert fast_decode._ROW_STRIDE % 2 == 1 and fast_decode._ROW_STRIDE < 2 ** 31
    source = inspect.getsource(fast_decode._mix32) + inspect.getsource(fast_decode.uniform_noise)
    constants = [int(c, 16) for c in re.findall(r"0x[0-9A-Fa-f]+", source)]
    assert constants and all(c < 2 ** 31 for c in constants), constants


def test_uniform_noise_is_a_pure_function_in_the_open_unit_interval():
    seed, c = torch.tensor([12345]), torch.tensor([7])
    u = uniform_noise(seed, c, 64, 1000)
    assert u.shape == (64, 1000) and u.dtype == torch.float32
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u, uniform_noise(seed, c, 64, 1000))
    assert not torch.equal(u, uniform_noise(seed, c + 1, 64, 1000))
    assert not torch.equal(u, uniform_noise(seed + 1, c, 64, 1000))
    assert not torch.equal(u[0], u[1])  # rows draw independently


def test_top_k_draw_scores_only_the_candidates_and_draws_what_the_full_pass_draws():
    """``top_k`` alone: ``sample_on_device`` scores the ``k`` candidates (their noise from
    ``noise_at``), and picks the token the pass over the whole vocabulary picks (float32 logits:
    no tie at the k-th place)."""
    from transformer.fast_decode import noise_at
    g = torch.Generator().manual_seed(5)
    seed, c = torch.tensor([41]), torch.tensor([9])
    cols = torch.randint(0, 500, (6, 7), generator=g)
    assert torch.equal(noise_at(seed, c, cols), uniform_noise(seed, c, 6, 500).gather(1, cols))
    differs = 0
    for t in range(50):
        logits = torch.randn(6, 500, generator=g) * 3
        seed, c = torch.tensor([t]), torch.tensor([3 * t])
        for temperature, k in ((0.8, 200), (1.0, 5), (1.7, 40), (1e-3, 3)):
            full = (process_logits(logits, temperature, k) - torch.log(-torch.log(uniform_noise(seed, c, 6, 500))))
            got = sample_on_device(logits, seed, c, temperature, k)
            assert torch.equal(got, full.argmax(-1)), (t, temperature, k)
            differs += int((got != logits.argmax(-1)).sum())
    assert differs > 100  # really sampled, not the argmax


def test_top_k_draw_on_bfloat16_logits_is_the_float32_draw():
    """The candidates are chosen on the logits in the model's dtype (a cheaper radix select) and
    scored in float32: bfloat16 logits draw exactly what the same logits in float32 draw (all
    distinct, so no tie at the k-th place), at temperatures above and below 1."""
    g = torch.Generator().manual_seed(11)
    for t in range(30):
        logits = torch.stack([torch.randperm(256, generator=g) for _ in range(5)]).sub(128).div(16).bfloat16()
        seed, c = torch.tensor([t]), torch.tensor([7 * t])
        for temperature, k in ((0.8, 200), (1.3, 17), (0.05, 4)):
            got = sample_on_device(logits, seed, c, temperature, k)
            assert torch.equal(got, sample_on_device(logits.float(), seed, c, temperature, k)), (t, temperature, k)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, None, None), (1.3, 4, None),
                                                     (1.0, None, 0.8), (0.9, 5, 0.7)])
def test_sampler_follows_process_logits(temperature, top_k, top_p):
    """Many rows of the same logits, one draw each: frequencies match softmax(process_logits)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 8, generator=g) * 1.5
    rows = 40_000
    draws = sample_on_device(logits.expand(rows, 8), torch.tensor([99]), torch.tensor([5]), temperature, top_k, top_p)
    freq = torch.bincount(draws, minlength=8).double() / rows
    p = torch.softmax(process_logits(logits, temperature, top_k, top_p), -1)[0].double()
    assert bool((freq[p == 0] == 0).all())  # filtered tokens never drawn
    tol = 4 * torch.sqrt(p * (1 - p) / rows) + 1e-9  # four standard errors
    assert bool(((freq - p).abs() <= tol).all()), (freq, p)


def test_sampling_is_reproducible_and_seeded():
    model = tiny_decoder("gqa", "rope")
    ids = prompt(2, 5)
    kw = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.95, fast=True)
    a = model.generate(ids, 30, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(ids, 30, generator=torch.Generator().manual_seed(1), **kw)
    c = model.generate(ids, 30, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(model.generate(ids, 8, do_sample=True, temperature=0, fast=True), model.generate(ids, 8))


def test_sampled_tokens_have_the_model_distribution():
    """Next-token frequencies over 2,000 rows decoded at once match the model's distribution."""
    model = tiny_decoder()
    rows = 2000
    ids = prompt(1, 4).expand(rows, 4).contiguous()
    out = model.generate(ids, 1, do_sample=True, temperature=1.3, top_k=6, fast=True,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = torch.softmax(process_logits(model(ids[:1])[:, -1], 1.3, 6), -1)[0].double()
    freq = torch.bincount(out[:, 4], minlength=V).double() / rows
    assert bool((freq[p == 0] == 0).all())
    assert bool(((freq - p).abs() <= 4 * torch.sqrt(p * (1 - p) / rows) + 1e-9).all())


# --------------------------------------------------------------------------- no host sync in the step
@pytest.mark.parametrize("sampling", [(False, 1.0, None, None, None, 0), (True, 0.8, 5, 0.9, 3, 0)])
def test_decode_step_never_reads_the_device(sampling):
    """On the meta device every tensor has a shape but no data, so any host read (``.item()``,
    ``int()``, ``bool()``) raises: the step running at all proves it never syncs."""
    model = tiny_decoder("gqa", "rope").to("meta")
    dec = FastDecoder(model, batch_size=3, max_cache_len=32)
    dec._step(sampling)  # the whole cache (CUDA graph shapes)
    dec._step(sampling, 7)  # the first 7 slots (CPU)
    with pytest.raises(RuntimeError):
        bool(dec.finished.all())  # a host read does fail here


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_eager_decode_step_has_no_host_read_for_learned_positions(kind):
    """The ordinary cached step (no position_ids, no cache_position) knows its largest position
    on the host: it must not read ``position_ids.max()`` back from the device."""
    model = tiny_decoder().to("meta")
    cache = DynamicKVCache() if kind == "dynamic" else model.new_cache("static", 1, 32)
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    model(ids, cache=cache, num_logits_to_keep=1)
    model(ids[:, :1], cache=cache, num_logits_to_keep=1)


# --------------------------------------------------------------------------- errors
def test_errors_name_the_parameter():
    model = tiny_decoder()
    ids = prompt(2, 5)
    with pytest.raises(ValueError, match="batch_size"):
        FastDecoder(model, batch_size=1, max_cache_len=32).generate(ids, 4)
    with pytest.raises(ValueError, match="max_cache_len"):
        FastDecoder(model, batch_size=2, max_cache_len=8).generate(ids, 4)
    with pytest.raises(ValueError, match="max_cache_len"):
        FastDecoder(model, max_cache_len=1)
    with pytest.raises(ValueError, match="sync_every"):
        FastDecoder(model, sync_every=0)
    with pytest.raises(ValueError, match="cuda_graph"):
        FastDecoder(model, cuda_graph=True)
    with pytest.raises(ValueError, match="attention"):
        FastDecoder(model, attention="flash")
    with pytest.raises(ValueError, match="'matmul'"):  # the removed hand-written kernel: refused, not ignored
        FastDecoder(model, attention="matmul")
    with pytest.raises(ValueError, match="use_cache"):
        model.generate(ids, 4, fast=True, use_cache=False)
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, 4, fast=True, cache_implementation=DynamicKVCache())
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, 4, compile=True, cache_implementation="sliding_window")
    with pytest.raises(ValueError, match="output_logits"):
        model.generate(ids, 4, fast=True, output_logits=True)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 4, fast=True, do_sample=True, temperature=-1.0)
    s2s = EncoderDecoderTransformer(ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=2, bos_token_id=1))
    with pytest.raises(ValueError, match="decoder-only"):
        s2s.generate(ids, 4, fast=True)
    with pytest.raises(ValueError, match="decoder-only"):
        FastDecoder(s2s)


def test_generate_called_directly_checks_its_inputs_as_generate_does():
    """``FastDecoder.generate`` is public: called directly (not through ``model.generate``) it
    used to embed out-of-vocabulary ids into torch's ``IndexError``, decode a right-padded mask
    (reading the first token off a pad) and generate a token for ``max_new_tokens=-1``.  It now
    runs ``generate()``'s checks, which name the argument."""
    model = tiny_decoder()
    fast = FastDecoder(model, batch_size=2, max_cache_len=32)
    ids = prompt(2, 5)
    with pytest.raises(ValueError, match=r"input_ids holds token id %d \(row 0, position 2\)" % V):
        fast.generate(ids.index_fill(1, torch.tensor([2]), V), 3)
    with pytest.raises(ValueError, match="input_ids holds token id -1"):
        fast.generate(ids.index_fill(1, torch.tensor([1]), -1), 3)
    with pytest.raises(ValueError, match="attention_mask row 0 is .*a 0 after a 1"):
        fast.generate(ids, 3, attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1] * 5]))
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        fast.generate(ids, -1)
    with pytest.raises(ValueError, match="LongTensor"):
        fast.generate(ids.int(), 3)


# --------------------------------------------------------------------------- the cache
def test_fixed_shape_cache_write_and_bookkeeping():
    cache = FixedShapeKVCache(max_cache_len=10, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=3,
                              max_batch_size=2)
    assert isinstance(cache, StaticKVCache)
    k, v = torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 3)
    keys, values = cache.write(1, k, v, torch.arange(4))
    assert keys.shape == values.shape == (2, 2, 10, 3)  # always the whole buffer
    assert torch.equal(keys[:, :, :4], k) and bool((keys[:, :, 4:] == 0).all())
    k1 = torch.randn(2, 2, 1, 3)
    keys, _ = cache.write(1, k1, k1, torch.tensor([4]))
    assert torch.equal(keys[:, :, 4:5], k1)
    assert cache.get_seq_length(1) == 0  # write() keeps no host state ...
    cache.set_seq_length(5)  # ... until told
    assert cache.get_seq_length(1) == 5 and cache.get(1)[0].shape == (2, 2, 5, 3)
    with pytest.raises(ValueError, match="length"):
        cache.set_seq_length(11)
    cache.reset()
    ku, _ = cache.update(k, v, 0)  # still an ordinary StaticKVCache
    assert ku.shape == (2, 2, 4, 3)


def test_slot_view_writes_at_tensor_slots_and_reports_slot_positions():
    cache = FixedShapeKVCache(max_cache_len=10, num_layers=2, num_heads=2, head_dim=3, max_batch_size=2)
    view = cache.slots_view(kv_len=6)
    k = torch.randn(2, 2, 2, 3)
    keys, values = view.update(k, -k, 1, torch.tensor([3, 4]))
    assert keys.shape == values.shape == (2, 2, 6, 3)  # the first kv_len slots
    assert torch.equal(keys[:, :, 3:5], k) and torch.equal(values[:, :, 3:5], -k)
    assert torch.equal(cache.keys[1][:, :, 3:5], k)  # written into the cache itself
    assert view.key_positions(0).tolist() == view.key_positions(1).tolist() == list(range(6))
    assert view.retention_mask(torch.arange(2), torch.arange(6)) is None and view.rotary_offsets(0) is None
    assert view.get_max_cache_shape() == 6 and cache.slots_view().get_max_cache_shape() == 10
    with pytest.raises(ValueError, match="cache_position"):
        view.update(k, k, 0)  # slots are data, never a host-side length
    with pytest.raises(ValueError, match="cache_position"):
        view.get_seq_length(0)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_model_forward_over_a_slot_view_matches_a_dynamic_cache(pos):
    """The model's one forward pass over a ``SlotView`` (tensor slots; stale data in the slots
    after the new tokens) gives the logits of an ordinary cached forward: the mask the model
    builds from the view's key positions hides every slot past each query."""
    model = tiny_decoder("gqa", pos).eval()
    cfg = model.config
    ids = prompt(2, 7)
    cache = FixedShapeKVCache(max_cache_len=16, num_layers=cfg.n_layers, num_heads=cfg.n_heads,
                              num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, max_batch_size=2)
    for t in cache.keys + cache.values:
        t.normal_()  # garbage from "an earlier sequence": must be masked out
    dyn = DynamicKVCache()
    with torch.no_grad():
        ref = model(ids, cache=dyn)
        got = model(ids[:, :5], cache=cache.slots_view(12), cache_position=torch.arange(5))
        got2 = model(ids[:, 5:], cache=cache.slots_view(), cache_position=torch.arange(5, 7))
    torch.testing.assert_close(torch.cat([got, got2], 1), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- torch.compile (slow: one compile)
def test_compiled_step_matches_eager_greedy():
    """SLOW (one torch.compile with the inductor C++ backend, weights frozen and its C++ matrix
    kernel autotuned against MKL: ~25-30 s on the 2-core CI CPU).  The compiled step gives the
    eager path's tokens at temperature 0, across an EOS burst, for two prompt lengths (the
    attention length is a symbolic size: no recompilation)."""
    pytest.importorskip("torch._inductor")
    model = tiny_decoder("gqa", "rope")
    ids = prompt(2, 5)
    free = model.generate(ids, 24, eos_token_id=None)
    eos = shared_token(free, 5 + 6)
    ref = model.generate(ids, 24, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] < 5 + 24
    dec = FastDecoder(model, batch_size=2, max_cache_len=32, compile=True, sync_every=4)
    assert torch.equal(dec.generate(ids, 24, eos_token_id=eos, pad_token_id=0), ref)
    # the same compiled step again, with another prompt and length (no recompilation: one graph)
    ids2 = prompt(2, 3, seed=7)
    assert torch.equal(dec.generate(ids2, 28, eos_token_id=eos, pad_token_id=0),
                       model.generate(ids2, 28, eos_token_id=eos, pad_token_id=0))


# --------------------------------------------------------------------------- the benchmark script
def test_benchmark_quick_smoke(tmp_path):
    """``benchmarks/fast_decode_benchmark.py --quick`` runs end to end (no compile, no transformers:
    seconds) and writes its json and md; it prints tables, it asserts nothing about speed."""
    import json

    from benchmarks.fast_decode_benchmark import main

    out = tmp_path / "fd.json"
    main(["--part", "cpu", "--quick", "--no-compile", "--no-hf", "--variants", "step", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["mode"] for r in rows][:3] == ["dynamic", "static", "fast"]
    assert all(r.get("same_tokens", True) for r in rows)
    assert out.with_suffix(".md").exists() and not out.with_suffix(".partial.json").exists()
