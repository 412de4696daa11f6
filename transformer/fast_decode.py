"""Fast decoding: a fixed-shape, sync-free one-token step that ``torch.compile`` and CUDA graphs can run.

Why the ordinary loop is slow for small models
==============================================

Decoding one token at batch 1 must read every weight once, so a *large* model is bound by
memory bandwidth.  A *small* one is not: GPT-2 124M in bfloat16 is 250 MB, a tenth of a
millisecond of an H100's bandwidth, yet ``generate`` spends milliseconds per token.  The time
goes to the host: each step runs a few hundred small kernels, each launched from Python
through the dispatcher (5-20 us apiece), plus host reads (``int(tensor)``) that make the CPU
wait for the GPU.  The GPU idles between kernels.  Three changes remove that overhead:

1. **Fixed shapes.**  A :class:`~kv_cache.FixedShapeKVCache` is written with ``index_copy_`` at
   a *tensor* slot, and attention always runs over all ``max_cache_len`` slots with a mask
   hiding the empty ones.  Every step then has identical shapes: compile once, capture once.
2. **No host syncs.**  Positions, the padding mask, the "finished" flags and the output
   sequence live on the device and are updated in place by the step itself.  Sampling draws
   its noise from a counter-based hash of ``(seed, slot, row, token)`` instead of
   ``torch.multinomial`` (see :func:`sample_on_device`), and end-of-sequence is checked on the
   host only every ``sync_every`` steps.
3. **Fewer, cheaper launches.**  With ``compile=True`` the step is traced by ``torch.compile``
   (``fullgraph=True``: a host sync would be an error, not a silent graph break) and its
   element-wise ops fused; on CUDA the whole step is then recorded once as a CUDA graph and
   *replayed* per token: one launch instead of hundreds.  The prefill is recorded too, once
   per prompt length.

Measured (``benchmarks/fast_decode_benchmark.py``, GPT-2-124M shape, bf16, one H100, batch 1,
256 tokens): ~210 tokens/s for the ordinary loop, ~1,560 with the eager step replayed as a
graph, ~2,000 compiled and replayed.  What is left is kernel latency: ~100 small kernels per
step at a few microseconds each, against ~0.1 ms of memory traffic.

On a CPU there is no launch to save: the step is bound by streaming the weights (fp32:
~56 MB per token for the 6-layer benchmark model).  There the step drops the per-step Python
and allocation work of the generic loop, attends over the filled slots only (no graph to keep
fixed: ``kv_len``), and, compiled, runs its matrix-vector products in inductor's pre-packed
C++ kernel (:data:`CPU_COMPILE_OPTIONS`): ~2x the ``transformers`` GPT-2 on the 2-core CI
machine.

**No model maths here.**  A step calls the model's own forward pass (``model(ids, cache=...,
cache_position=slot, position_ids=pos, attention_mask=key_ok)``), the one every other path
uses.  What makes it fixed-shape is the cache it is handed: a
:class:`~kv_cache.basic.compiled_static.SlotView` of the fixed-shape cache, written at tensor
slots, whose key positions (slot = position) let the model's one mask builder hide the empty
slots.  This module owns the state, compilation, capture, sampling and stop checks.

Use it through ``generate(model, ids, n, compile=True)`` (or ``fast=True`` for the same step
without ``torch.compile``), or build a :class:`FastDecoder` yourself to reuse it across calls.
The same step also serves a speculative-decoding *draft* model token by token
(:meth:`FastDecoder.logits_at`, and :meth:`FastDecoder.greedy_draft` for ``k`` greedy guesses in
one compiled call; see ``spec_decoding.ModelDrafter(compile=True)``).
Decoder-only models only.  The tokens are those of ``generate`` with a cache: exactly at
temperature 0 in float32 (tested); sampled tokens follow the same distribution
(:func:`transformer.sampling.process_logits`) from a different random stream.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, List, Optional

import torch

from kv_cache.basic.compiled_static import FixedShapeKVCache
from .sampling import SamplingSettings, eos_hit, process_logits

_M32 = 0xFFFFFFFF
#: Odd constant spreading row indices before hashing (2^32 / golden ratio, negated mod 2^32).  It
#: must fit in an int32: inductor indexes small tensors with int32 in Triton, and a larger
#: constant (0x9E3779B1 was used before) fails to compile there for batches > 1.
_ROW_STRIDE = 0x61C88647


# --------------------------------------------------------------------------- sampling on the device
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of int64 ``x`` in ``[0, 2^32)``.

    The multipliers are below ``2^31`` so every product stays below ``2^63``: no int64
    overflow, so CPU, CUDA and compiled code all give bit-identical results."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, counter: torch.Tensor, batch: int, vocab: int) -> torch.Tensor:
    """Uniform ``(batch, vocab)`` float32 noise in ``(0, 1)`` as a pure function of its inputs.

    ``seed`` and ``counter`` are 1-element int64 tensors (the counter is the cache slot of the
    step, so every step draws fresh noise).  Like Philox, the generator PyTorch itself uses on
    GPUs, it is *counter-based*: no state is carried from one draw to the next, so a step that
    is compiled or replayed as a CUDA graph draws exactly what the eager step would.
    Resolution: 24 bits per draw.  Cost: about ten integer ops per element.
    """
    return noise_at(seed, counter, torch.arange(vocab, device=seed.device).expand(batch, vocab))


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in ``(0, 1)``: the top 24 bits, centred in their interval."""
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def noise_at(seed: torch.Tensor, counter: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """:func:`uniform_noise` at token ids ``cols`` ``(B, n)`` only: ``noise_at(...)[b, j] ==
    uniform_noise(...)[b, cols[b, j]]``, bit for bit (the noise is a hash of row and token)."""
    dev = seed.device
    step = _mix32((seed ^ _mix32(counter & _M32)) & _M32)  # (1,)
    rows = torch.arange(cols.shape[0], device=dev)
    row_key = _mix32((step + rows * _ROW_STRIDE) & _M32)  # (B,)
    bits = _mix32(row_key[:, None] ^ cols)  # (B, n)
    return _unit(bits)


def request_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform ``(S, vocab)`` float32 noise in ``(0, 1)`` whose row ``s`` is a pure function of
    ``(seeds[s], counters[s])`` alone -- not of the row's place in the batch: the serving engine's
    per-request random streams (``seeds``: ``(S,)`` int64 in ``[0, 2^32)``, one per request;
    ``counters``: ``(S,)`` int64, which of its tokens is being drawn).  The same hash as
    :func:`uniform_noise` (row ``s`` is ``uniform_noise(seeds[s], counters[s], 2, vocab)[1]``),
    bit-identical on CPU and CUDA.  Cost: about ten integer ops per element for the whole step
    (a ``torch.Generator`` per request costs one launch per row, and on a CPU its exponentials
    were twice as slow as this).

    The per-row keys are hashed in int64 as everywhere else; the ``S x vocab`` part, which is
    all of the cost, in int32 and in place (:func:`_mix32_int32_`): 32-bit products wrap
    exactly as the int64 ones masked to 32 bits, at half the bytes and without a fresh
    ``S x vocab`` tensor per operation (64 x 50,257 on this 2-core CPU: 10.8 against 48.4 ms,
    ``benchmarks/sampling_benchmark.py``).
    Eager only: an int32 product that wraps is what the hardware does, and what this needs, but
    not a promise a compiler's C++ makes (compiled steps use :func:`uniform_noise`'s int64)."""
    key = _mix32((_mix32((seeds ^ _mix32(counters & _M32)) & _M32) + _ROW_STRIDE) & _M32)  # (S,) in [0, 2^32)
    key = torch.where(key >= 1 << 31, key - (1 << 32), key).to(torch.int32)  # the same 32 bits, signed
    bits = _mix32_int32_(key[:, None] ^ torch.arange(vocab, dtype=torch.int32, device=seeds.device))  # (S, vocab)
    bits >>= 8
    bits &= 0xFFFFFF  # the top 24 bits (an arithmetic shift: the sign's copies masked off)
    return bits.float().add_(0.5).mul_(1.0 / (1 << 24))


def _mix32_int32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` on int32 ``x`` holding 32-bit words, in place: right shifts are arithmetic on
    a signed type, so their sign copies are masked off, and products wrap modulo 2^32."""
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= 0x5BD1E995
    x ^= (x >> 16) & 0xFFFF
    return x


def fold_seed(seed: int) -> int:
    """A Python int seed of any size folded into ``[0, 2^32)`` (the hash's key width): the low
    32 bits xor the next 32, so seeds that differ anywhere in their low 64 bits differ here."""
    return (seed ^ (seed >> 32)) & _M32


def sample_on_device(logits: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, temperature: float = 1.0,
                     top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Draw one token per row of ``(B, V)`` logits without a host sync; returns ``(B,)`` long.

    The Gumbel-max trick: ``argmax(l + g)`` with ``g = -log(-log(u))``, ``u`` uniform, picks
    token ``i`` with probability ``softmax(l)_i`` -- a sample from the distribution with one
    element-wise pass and an ``argmax``, no cumulative sum and no ``torch.multinomial`` (whose
    CUDA kernel cannot be captured in a graph).  ``l`` is
    :func:`~transformer.sampling.process_logits` (temperature, then top-k, then top-p), so the
    distribution is exactly the eager sampler's; removed tokens are ``-inf`` and never win.
    24-bit noise truncates the Gumbel tail: a token whose probability is below ~1e-7 of the
    winner's can never be drawn.  Cost: ``O(V)`` per row, plus top-k / top-p's sort.

    With ``top_k`` alone (gpt-fast's setting) only the ``k`` candidates can win, so only they
    are scored: one ``topk`` of the raw logits (temperature does not change the order), then
    temperature, noise (:func:`noise_at`, the very numbers the full draw would add there) and
    the ``argmax`` over ``k`` entries, ties going to the smallest token id as ``argmax`` over
    the vocabulary does -- the draw of the full pass (up to a tie of the ``k``-th largest
    logit, where either set is a valid top-k), without writing, hashing and reducing ``V``
    numbers per row (measured on an H200, Llama-3.2-1B shape: ~125 of a 1,160 us step).
    That ``topk`` runs on the logits in the model's dtype: converting bfloat16 to float32 is exact
    and keeps the order, so the candidates are the same, and a radix select over 16-bit keys
    makes two passes instead of four (H200, 128,256 logits: 37 against 58 us at batch 1, 51
    against 78 at batch 16).  The ``k`` candidates are then scored in float32.
    """
    V = logits.shape[-1]
    if top_k is not None and top_p is None and temperature != 0 and top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1, sorted=False)  # (B, k): the only possible winners
        z = process_logits(vals, temperature) - torch.log(-torch.log(noise_at(seed, counter, idx)))
        return torch.where(z == z.amax(dim=-1, keepdim=True), idx, V).amin(dim=-1)
    scores = process_logits(logits, temperature, top_k, top_p)
    u = uniform_noise(seed, counter, logits.shape[0], V)
    return (scores - torch.log(-torch.log(u))).argmax(dim=-1)


# --------------------------------------------------------------------------- the decoder
#: ``torch._inductor.config`` used by ``FastDecoder(compile=True)`` on CPU: ``freezing`` treats
#: the weights as constants, so inductor may pre-pack them for its own C++ matrix kernel
#: (``CppMicroGemm``, vectorised for the CPU it runs on); ``max_autotune`` times that kernel
#: against MKL for each shape while compiling and keeps the faster one.  For a one-row
#: matrix-vector product the packed kernel streams the weights about 1.5-2x faster than MKL's
#: ``addmm`` here (the 6-layer benchmark model's step went from ~2.8 to ~1.7 ms).  Costs: a
#: packed copy of the weights (as much memory again) and some seconds of compile time.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def _allow_recompiles(limit: int = 64) -> None:
    """Every compiled step shares one code object (``FastDecoder._step``), and ``torch.compile``
    keeps at most ``recompile_limit`` (8 by default) graphs per code object before silently
    falling back to eager.  Each (decoder, sampling setting) pair needs its own graph, so raise
    the limit (never lower it)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < limit:
        setattr(cfg, name, limit)


class FastDecoder:
    """Greedy or sampled decoding of a decoder-only model with a fixed-shape, sync-free step.

    Args:
        model: a :class:`~transformer.DecoderOnlyTransformer` (eval mode is used; its dtype and
            device are used as they are: cast it first, e.g. ``model.to("cuda", torch.bfloat16)``).
        batch_size: rows decoded together (exactly this many per :meth:`generate` call).
        max_cache_len: cache capacity in tokens (prompt + new tokens must fit).  Attention reads
            all of it every step, so keep it close to what you generate.  Default:
            ``model.config.max_seq_len``.
        compile: ``torch.compile`` the step (``fullgraph=True``).  Compilation takes seconds to
            a minute the first time each sampling setting is used.
        cuda_graph: capture the step as a CUDA graph and replay it (default: on for CUDA).
        attention: kept for compatibility: ``"auto"`` or ``"sdpa"``.  The step runs the model's
            own forward pass, whose attention is ``scaled_dot_product_attention`` on every path.
            (A hand-written CPU ``"matmul"`` kernel was removed: with torch 2.13 it measured no
            faster compiled, 212 vs 210 tokens/s, and slower eager.)
        compile_options: ``torch._inductor.config`` settings in force while the step compiles,
            e.g. ``{"max_autotune": True}`` or ``{"coordinate_descent_tuning": True}``.  Default:
            :data:`CPU_COMPILE_OPTIONS` on CPU (measured ~1.6x faster steps than plain inductor
            on the 6-layer benchmark model), nothing on CUDA; ``{}`` is plain ``torch.compile``.
            On an H200 ``{"combo_kernels": True}`` decodes the Llama-3.2-1B shape ~4% faster
            (``docs/fast_decoding.md``).
        sync_every: steps between host checks of "every row has stopped" (and between calls of
            a ``streamer``, which then receives the tokens of those steps one by one).

    Memory: the cache (``2 * n_layers * batch_size * n_kv_heads * max_cache_len * head_dim``
    elements), a ``(batch_size, max_cache_len)`` sequence buffer and, eager on CPU, the model's
    transposed copy of the output head (``vocab * d_model`` elements, see ``TokenDecoder.head``).  Parameters must keep their storage
    while the decoder lives (in-place changes such as optimizer steps are fine; ``model.to()``
    that moves or casts them is not: build a new decoder).
    """

    def __init__(self, model, *, batch_size: int = 1, max_cache_len: Optional[int] = None,
                 compile: bool = False, cuda_graph: Optional[bool] = None, attention: str = "auto",
                 compile_options: Optional[dict] = None, sync_every: int = 16):
        if hasattr(model, "encode") or not hasattr(model, "decoder"):
            raise ValueError(f"FastDecoder serves decoder-only models; got {type(model).__name__} "
                             f"(use generate() without fast/compile for the encoder-decoder model)")
        dec = model.decoder
        if any(getattr(b, "cross", False) for b in dec.blocks):
            raise ValueError("FastDecoder does not support blocks with cross-attention")
        config = model.config
        for name, value in (("batch_size", batch_size), ("sync_every", sync_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        max_cache_len = config.max_seq_len if max_cache_len is None else max_cache_len
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
            raise ValueError(f"max_cache_len must be an int >= 2, got {max_cache_len!r}")
        weight = dec.lm_head.weight
        device, dtype = weight.device, weight.dtype
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        if attention not in ("auto", "sdpa"):
            raise ValueError(f"attention must be 'auto' or 'sdpa' (the model's scaled_dot_product_attention), "
                             f"got {attention!r}")
        self.attention = "sdpa"
        if compile_options is None:
            compile_options = CPU_COMPILE_OPTIONS if device.type == "cpu" else {}
        self.compile_options = dict(compile_options)
        self._weights_version = None  # parameter versions the frozen compiled steps were built from
        self.model, self.config, self.batch_size, self.max_cache_len = model, config, batch_size, max_cache_len
        self.compile, self.cuda_graph, self.sync_every = compile, cuda_graph, sync_every
        self.device, self.dtype = device, dtype
        self._param_ptrs = self._fingerprint()
        self.cache = FixedShapeKVCache(max_cache_len=max_cache_len, num_layers=config.n_layers,
                                       num_heads=config.n_heads, num_kv_heads=config.n_kv_heads,
                                       head_dim=config.head_dim, max_batch_size=batch_size, dtype=dtype,
                                       device=device)
        # Decode state: every tensor the step reads or writes, updated in place (never rebound,
        # since a captured CUDA graph holds their addresses).
        B, L = batch_size, max_cache_len
        z = functools.partial(torch.zeros, device=device, dtype=torch.long)
        self.token, self.slot, self.pos = z(B, 1), z(1), z(B, 1)  # last token, its cache slot, its position
        self.seq = z(B, L)  # prompt + generated tokens
        self.key_ok = torch.ones(B, L, dtype=torch.bool, device=device)  # False on left padding
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.seed = z(1)
        self.prefill_pos = z(B, L)  # positions of the prompt tokens (the prefill graph reads them)
        self._steps = {}  # sampling settings -> callable running one step
        self._prefills = {}  # (prompt length, sampling settings) -> captured prefill (CUDA), LRU
        self._graph_pool = None

    # ----------------------------------------------------------------------- weights
    def _drop_stale_compiled_steps(self) -> None:
        """``freezing`` bakes the weights into the compiled code (packed for the CPU matrix
        kernels); after any in-place change of a parameter, compile again."""
        if self.compile and self.compile_options.get("freezing") and self._weights_version is not None \
                and self._version() != self._weights_version:
            self._steps.clear()
            self._weights_version = None

    def _fingerprint(self):
        return tuple(p.data_ptr() for p in self.model.parameters())

    # ----------------------------------------------------------------------- the model
    def _forward(self, ids: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                 kv_len: Optional[int] = None) -> torch.Tensor:
        """Logits ``(B, V)`` of the last of ``ids`` ``(B, S)``, written to the cache at ``slots``
        ``(S,)`` with positions ``pos`` ``(B, S)``: the model's own forward pass over a
        :class:`~kv_cache.basic.compiled_static.SlotView` of the cache (its first ``kv_len``
        slots, default all).  The padding mask ``key_ok`` is the forward's ``attention_mask``
        (indexed by slot); every shape is fixed by ``(B, S)`` and ``kv_len``."""
        logits = self.model(ids, cache=self.cache.slots_view(kv_len), cache_position=slots, position_ids=pos,
                            attention_mask=self.key_ok, num_logits_to_keep=1)
        return logits[:, -1]

    def _choose(self, logits: torch.Tensor, sampling) -> torch.Tensor:
        do_sample, temperature, top_k, top_p, _, _ = sampling
        if not do_sample:
            return logits.argmax(dim=-1)
        return sample_on_device(logits, self.seed, self.slot, temperature, top_k, top_p)

    def _record(self, nxt: torch.Tensor, sampling) -> None:
        """Pad rows that already stopped, flag new stops, append ``nxt`` ``(B,)`` at ``slot + 1``."""
        eos, pad = sampling[4], sampling[5]
        if eos is not None:
            nxt = torch.where(self.finished, pad, nxt)
            self.finished.logical_or_(eos_hit(nxt, eos))
        self.slot.add_(1)
        self.pos.add_(1)
        self.seq.index_copy_(1, self.slot, nxt.unsqueeze(1))
        self.token.copy_(nxt.unsqueeze(1))

    def _step(self, sampling, kv_len: Optional[int] = None) -> None:
        """One decode step, entirely on the device: run ``token`` at ``slot``, choose the next.
        Reads and writes only the state tensors (in place); no host read anywhere.

        ``kv_len`` (steps that are not CUDA graphs, e.g. on CPU): attend over the first
        ``kv_len`` cache slots instead of all of them.  The host knows it (``slot + 1``) without
        asking the device, and such a step may change shape: it is compiled once with
        ``kv_len`` as a symbolic size.  Halves the attention's reads on average."""
        logits = self._forward(self.token, self.slot, self.pos, kv_len)
        self._record(self._choose(logits, sampling), sampling)

    def _step_fn(self, sampling) -> Callable[[int], None]:
        """``step(kv_len)`` running one step for these sampling settings (compiled / captured once).
        A CUDA graph replays its fixed shapes and ignores ``kv_len``."""
        fn = self._steps.get(sampling)
        if fn is not None:
            return fn
        fn = functools.partial(self._step, sampling)
        settings = self._compile_settings() if self.compile else contextlib.nullcontext()
        if self.cuda_graph:
            if self.compile:
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            with settings:
                replay = self._capture(fn)
            fn = lambda kv_len: replay()  # noqa: E731
        elif self.compile:
            # dynamic=None: shapes are static, but an int argument that changes between calls
            # (kv_len) becomes a symbolic size after one recompile -- done here, in the warm-up.
            fn = torch.compile(fn, fullgraph=True, dynamic=None)
            with settings:
                self._warm_up(fn, 2)  # compile now: the decode loop runs without guard checks
        self._steps[sampling] = fn
        return fn

    def _compile_settings(self):
        """Before a ``torch.compile``: allow the recompiles, remember the weights the frozen graph
        bakes in, and return the ``torch._inductor.config`` patch to hold while it compiles (the
        warm-up calls, where compilation actually happens)."""
        import torch._inductor.config as inductor_config

        _allow_recompiles()
        self._weights_version = self._version()
        return inductor_config.patch(self.compile_options)

    def _version(self) -> int:
        """Sum of the parameters' version counters: changes with every in-place update."""
        return sum(p._version for p in self.model.parameters())

    def _warm_up(self, fn: Callable, times: int, full: bool = False) -> None:
        """Run ``fn`` ``times`` from slot 0 (compiling it on the first call).  It writes cache
        slots ``0..times-1`` and moves the state; :meth:`generate` rewrites all state before
        each run, and a slot stays masked until it is written again."""
        self.slot.zero_()
        self.pos.zero_()
        with torch.inference_mode():
            for i in range(times):
                # kv_len >= slot + 1, and never 0 or 1 (which torch.compile specializes); full:
                # the whole cache (a CUDA graph's fixed shapes)
                fn(None if full else i + 2)

    def _capture(self, fn: Callable) -> Callable[[], None]:
        """Record ``fn`` as a CUDA graph after warm-up runs on a side stream (which compile,
        pick kernels and allocate), as ``torch.cuda.graphs`` asks.  The graph draws its
        temporaries from one pool shared by all of this decoder's graphs."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(fn, 3, full=True)
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._graph_pool):
            fn(None)  # the mode of the warm-up: a compiled fn must not recompile while capturing
        return graph.replay

    def _prefill_body(self, P: int, sampling) -> None:
        """The prompt ``seq[:, :P]`` through the model in one pass (cache slots ``0..P-1``), then
        the first new token, exactly like a step.  Eager PyTorch: any ``P``."""
        kv_len = None if self.cuda_graph else P  # a graph keeps the step's fixed cache length
        logits = self._forward(self.seq[:, :P], torch.arange(P, device=self.device), self.prefill_pos[:, :P],
                               kv_len)
        self._record(self._choose(logits, sampling), sampling)

    _MAX_PREFILL_GRAPHS = 8

    def _prefill(self, P: int, sampling) -> None:
        """Run the prefill; on CUDA replay a graph captured for this prompt length.

        An eager prefill is a few hundred kernel launches from Python -- several milliseconds,
        a few percent of a 256-token generation once the steps are graphs.  The first call with
        a new ``P`` runs eagerly (for real: it is also the warm-up) and then records a graph
        that later calls with the same ``P`` replay (the ``_MAX_PREFILL_GRAPHS`` most recent
        lengths are kept).  If recording fails, that length stays eager."""
        key = (P, sampling)
        entry = self._prefills.pop(key, None) if self.cuda_graph else None  # a graph, False (failed) or None
        if entry:
            entry.replay()
            self._prefills[key] = entry  # most recently used last
            return
        self._prefill_body(P, sampling)
        if not self.cuda_graph:
            return
        if entry is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            entry = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(entry, pool=self._graph_pool):
                    self._prefill_body(P, sampling)  # recorded, not run: the state stays as the eager run left it
            except RuntimeError:  # keep this length eager rather than fail
                entry = False
        while len(self._prefills) >= self._MAX_PREFILL_GRAPHS:
            self._prefills.pop(next(iter(self._prefills)))
        self._prefills[key] = entry

    def _loop_context(self):
        """The decode loop always runs in inference mode (one grad mode: the compiled step was
        traced in it); compiled steps also skip ``torch.compile``'s guard checks.  Each
        compiled callable holds a single graph for fixed shapes and settings, and parameter
        replacement is caught by :meth:`generate`, so the guards -- some 100 tensor checks,
        measured ~0.2 ms per call on the 2-core CI machine -- could only ever pass."""
        ctx = contextlib.ExitStack()
        ctx.enter_context(torch.inference_mode())
        if self.compile and not self.cuda_graph and hasattr(torch.compiler, "set_stance"):
            ctx.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
        return ctx

    # ----------------------------------------------------------------------- scoring, token by token
    def prepare(self) -> None:
        """Get ready for a run of :meth:`logits_at` calls (a new sequence): check that the
        parameters are the ones this decoder was built on, recompile if the weights changed in
        place, and clear the padding mask.  O(params)."""
        if self._fingerprint() != self._param_ptrs:
            raise RuntimeError("the model's parameters were replaced (model.to(), a new state dict by "
                               "assignment...) since this FastDecoder was built; build a new one")
        with torch.inference_mode():
            self._drop_stale_compiled_steps()
            self.key_ok.fill_(True)

    def _logits_body(self, kv_len: Optional[int]) -> torch.Tensor:
        """``token`` at ``slot`` (position ``pos``) through the model: float32 logits ``(B, V)``."""
        return self._forward(self.token, self.slot, self.pos, kv_len).float()

    def _greedy_draft_body(self, k: int, kv_len: int) -> torch.Tensor:
        """``k`` greedy steps in one traced function, starting with ``token`` at ``slot``: each
        step feeds the previous argmax.  Returns the ``(B, k)`` argmax tokens; the last one is
        not fed (the cache gains ``k`` slots)."""
        out = []
        for i in range(k):
            nxt = self._forward(self.token, self.slot, self.pos, kv_len + i).float().argmax(-1)  # (B,)
            out.append(nxt)
            if i + 1 < k:
                self.token.copy_(nxt.unsqueeze(1))
                self.slot.add_(1)
                self.pos.add_(1)
        return torch.stack(out, dim=1)

    def _place(self, ids: torch.Tensor, start: int) -> None:
        """Set the step state to ``ids`` ``(B, 1)`` at slot and position ``start``."""
        self.token.copy_(ids)
        self.slot.fill_(start)
        self.pos.fill_(start)

    def _compiled(self, key, body: Callable, n_slots: int) -> Callable:
        """``body`` compiled (``compile=True``) or as it is; kept under ``key``.

        Compiling means two warm-up calls (the second makes ``kv_len`` a symbolic size, see
        :meth:`_step`), which write cache slots ``0 .. n_slots - 1``: those slots are saved
        and restored, so a function first needed in the middle of a sequence (a new draft
        length) leaves the cache as it was."""
        fn = self._steps.get(key)
        if fn is not None:
            return fn
        fn = body
        if self.compile:
            settings = self._compile_settings()
            fn = torch.compile(body, fullgraph=True, dynamic=None)
            with torch.inference_mode():
                saved = [t.narrow(self.cache._sd, 0, n_slots).clone() for t in self.cache.keys + self.cache.values]
                with settings:
                    for kv_len in (2, 3):
                        self._place(torch.zeros_like(self.token), 0)
                        fn(kv_len)
                for t, old in zip(self.cache.keys + self.cache.values, saved):
                    t.narrow(self.cache._sd, 0, n_slots).copy_(old)
        self._steps[key] = fn
        return fn

    def _check_span(self, ids: torch.Tensor, start: int, n: int) -> None:
        B, S = ids.shape
        if B != self.batch_size:
            raise ValueError(f"ids has batch {B}, but this FastDecoder was built for batch_size={self.batch_size}")
        if S < 1 or start < 0 or start + n > self.max_cache_len:
            raise ValueError(f"slots {start}..{start + n - 1} (ids of length {S} at start={start}) must lie in "
                             f"[0, max_cache_len={self.max_cache_len})")

    def logits_at(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``ids`` ``(B, S)`` at cache slots (= positions) ``start .. start + S - 1`` and
        return the float32 logits ``(B, V)`` of the last one -- the next-token distribution.

        This is the step a *draft model* needs in speculative decoding: rolling back is free,
        because attention only sees slots ``<=`` the query's own slot, so whatever an earlier
        call left at ``start`` and beyond is hidden and then overwritten.  Call :meth:`prepare`
        once before a new sequence; no padding (every row has the same positions).

        Cost: single tokens go through the one-token step (compiled when ``compile=True``:
        measured 0.12 ms for the 0.9M-parameter draft preset on one CPU core, against 0.33 ms
        eager); a few tokens (``S <= 4``, e.g. catching up after an accepted round) as that many
        steps; a longer ``ids`` (a prompt) in one eager pass over ``S`` tokens.
        """
        B, S = ids.shape
        self._check_span(ids, start, S)
        if S > 4:  # a prompt: one eager pass over the S tokens
            with torch.inference_mode():
                slots = torch.arange(start, start + S, device=self.device)
                return self._forward(ids, slots, slots.expand(B, S), start + S).float()
        fn = self._compiled("logits", self._logits_body, 1)
        with self._loop_context():
            for i in range(S):
                self._place(ids[:, i:i + 1], start + i)
                # kv_len: the filled slots plus one masked spare (never 1, see _warm_up)
                logits = fn(min(start + i + 2, self.max_cache_len))
        return logits

    def greedy_draft(self, ids: torch.Tensor, start: int, k: int) -> torch.Tensor:
        """Feed ``ids`` ``(B, S)`` at slots ``start ..`` and continue greedily: the ``(B, k)``
        argmax tokens, as ``k`` calls of :meth:`logits_at` would give them.

        The ``k`` steps run as *one* function (one compiled graph per ``k`` when
        ``compile=True``): the host launches one call per round of speculative decoding
        instead of ``k``, which matters when a step is as small as a draft model's (measured on
        one CPU core, draft preset: ~0.05 ms per drafted token instead of ~0.15).  ``ids[:, :-1]``
        (tokens the cache missed) go through :meth:`logits_at` first.  The cache gains
        ``S - 1 + k`` slots (the last draft is not fed).  Greedy only: a sampling drafter needs
        each step's distribution on the host, so it uses :meth:`logits_at`.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        B, S = ids.shape
        self._check_span(ids, start, S - 1 + k)
        if S > 1:
            self.logits_at(ids[:, :-1], start)
            start += S - 1
        fn = self._compiled(("greedy_draft", k), functools.partial(self._greedy_draft_body, k), k)
        with self._loop_context():
            self._place(ids[:, -1:], start)
            return fn(start + 2).clone()

    def greedy_draft_lengths(self) -> List[int]:
        """The ``k`` values :meth:`greedy_draft` already has a function for (compiled ones cost
        seconds to a minute each to build, once per decoder)."""
        return sorted(key[1] for key in self._steps if isinstance(key, tuple) and key[0] == "greedy_draft")

    # ----------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, attention_mask: Optional[torch.Tensor] = None,
                 streamer: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Continue ``input_ids`` ``(batch_size, P)`` by up to ``max_new_tokens`` tokens.

        The arguments mean what they mean in :func:`transformer.generation.generate`, and are
        checked as there (ids in the vocabulary, a left-padded 0/1 mask, ``max_new_tokens >= 0``:
        one host sync), also when called directly.  ``generator`` seeds the device noise (one
        32-bit seed drawn per call), so a seeded generator gives reproducible samples.  Returns
        ``(batch_size, P + n)`` long, ``n <= max_new_tokens``; rows stop after ``eos_token_id``
        (later tokens are ``pad_token_id``) and the run ends once all have stopped.

        Cost: one prefill over ``P`` tokens (a replayed graph on CUDA once this ``P`` was seen),
        then ``n - 1`` steps of ``O(max_cache_len)`` attention, with one host sync every ``sync_every`` steps (when ``eos_token_id`` or a
        ``streamer`` needs one) and one at the end.
        """
        from .generation import _check_inputs  # (generation imports this module lazily, never at import time)

        settings = SamplingSettings(temperature, top_k, top_p, do_sample=bool(do_sample), generator=generator,
                                    eos_token_id=eos_token_id)  # the one check of the sampling values
        _check_inputs(self.model.config, input_ids, max_new_tokens, attention_mask)
        B, P = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"input_ids has batch {B}, but this FastDecoder was built for batch_size="
                             f"{self.batch_size}")
        if P + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds max_cache_len="
                             f"{self.max_cache_len}; build the FastDecoder with a larger max_cache_len")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device}, the model on {self.device}")
        if self._fingerprint() != self._param_ptrs:
            raise RuntimeError("the model's parameters were replaced (model.to(), a new state dict by "
                               "assignment...) since this FastDecoder was built; build a new one")
        if max_new_tokens == 0:
            return input_ids
        was_training = self.model.training
        self.model.eval()
        try:
            # All state work in inference mode (the mode the steps were traced and captured in);
            # the result is cloned outside it, so the caller gets an ordinary tensor.
            with torch.inference_mode():
                self._drop_stale_compiled_steps()
                out = self._generate(input_ids, max_new_tokens, settings, pad_token_id, attention_mask, streamer)
        finally:
            self.model.train(was_training)
        return out.clone()

    def _generate(self, input_ids, n, settings: SamplingSettings, pad, attention_mask, streamer):
        B, P = input_ids.shape
        do_sample, eos, generator = not settings.greedy, settings.eos_token_id, settings.generator
        # the step's static arguments: each distinct tuple is its own compiled / captured step
        sampling = (do_sample, float(settings.temperature), settings.top_k, settings.top_p, eos,
                    (pad if pad is not None else 0))
        step = self._step_fn(sampling)  # compiles / captures first: the state is rewritten below
        # ---- state for this run (in place: the captured graph reads these addresses)
        if do_sample:
            if generator is not None:
                seed = torch.randint(0, 1 << 32, (1,), generator=generator, device=generator.device)
            else:
                seed = torch.randint(0, 1 << 32, (1,))
            self.seed.copy_(seed)
        self.key_ok.fill_(True)
        if attention_mask is not None:
            mask = attention_mask.to(self.device).bool()
            self.key_ok[:, :P] = mask
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            pos = torch.arange(P, device=self.device).expand(B, P)
        self.finished.zero_()
        self.seq[:, :P] = input_ids
        self.prefill_pos[:, :P] = pos
        self.slot.fill_(P - 1)
        self.pos.copy_(pos[:, -1:])
        self._prefill(P, sampling)  # fills slots 0..P-1, appends the first new token; slot = P
        # ---- decode: n - 1 steps, each appends one token
        done = 1
        need_sync = eos is not None or streamer is not None
        if streamer is not None:
            streamer(self.seq[:, P].clone())
        while done < n:
            chunk = min(self.sync_every, n - done) if need_sync else n - done
            with self._loop_context():
                for i in range(chunk):
                    step(P + done + i)  # kv_len = slot + 1: the host counts the slots itself
            if streamer is not None:
                for t in self.seq[:, P + done:P + done + chunk].t():
                    streamer(t.clone())
            done += chunk
            if eos is not None and bool(self.finished.all()):
                break
        self.cache.set_seq_length(P + done - 1, B)
        out = self.seq[:, :P + done].clone()
        if eos is not None:  # stop where generate() would: right after the step every row had stopped
            new = out[:, P:]
            stopped = eos_hit(new, eos).long().cumsum(1) > 0  # (B, n): this row has produced eos by then
            all_stopped = stopped.all(0).nonzero()
            if all_stopped.numel():
                out = out[:, :P + int(all_stopped[0]) + 1]
        return out


# --------------------------------------------------------------------------- generate() helper
_REGISTRY_SIZE = 4


class _DecoderRegistry(dict):
    """The decoders ``generate`` keeps on a model.  ``copy.deepcopy`` and pickling see an empty
    one (a CUDA graph can be neither copied nor saved; the copy builds its own)."""

    def __deepcopy__(self, memo):
        return _DecoderRegistry()

    def __reduce__(self):
        return (_DecoderRegistry, ())


def get_fast_decoder(model, batch_size: int, needed_len: int, compile: bool, role: str = "generate") -> FastDecoder:
    """A :class:`FastDecoder` for ``model`` kept between ``generate`` calls (so the compile and the
    CUDA-graph capture are paid once).  Capacity: ``needed_len`` rounded up to a multiple of 64
    (fewer distinct decoders; attention reads at most 63 extra slots).  Up to four decoders are
    kept per model (least recently used dropped); one whose model parameters were replaced
    (``model.to(...)``) is rebuilt.  ``role`` keeps users apart that must not share a cache:
    ``generate`` and a speculative-decoding drafter (``"draft"``) of the same model."""
    registry = model.__dict__.get("_fast_decoders")
    if registry is None:
        registry = model.__dict__["_fast_decoders"] = _DecoderRegistry()
    capacity = 64 * math.ceil(needed_len / 64)
    weight = model.decoder.lm_head.weight
    key = (role, batch_size, capacity, bool(compile), str(weight.device), weight.dtype)
    dec = registry.pop(key, None)
    if dec is not None and dec._fingerprint() != dec._param_ptrs:
        dec = None
    if dec is None:
        dec = FastDecoder(model, batch_size=batch_size, max_cache_len=capacity, compile=compile)
        while len(registry) >= _REGISTRY_SIZE:
            registry.pop(next(iter(registry)))
    registry[key] = dec  # most recently used last
    return dec


def fast_generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, compile: bool, use_cache: bool = True,
                  cache_implementation="dynamic", cache_config=None, output_logits: bool = False, src=None,
                  **kwargs) -> torch.Tensor:
    """``generate(..., fast=True / compile=True)``: refuse the options the fast path does not
    have, then decode with the model's kept :class:`FastDecoder` (see :func:`get_fast_decoder`).
    ``kwargs`` are :meth:`FastDecoder.generate`'s (sampling, eos/pad, generator, mask, streamer)."""
    if hasattr(model, "encode") or src is not None:
        raise ValueError("fast=True / compile=True serve decoder-only models; the encoder-decoder model "
                         "(src=...) decodes with the ordinary loop (fast=False, compile=False)")
    if not use_cache:
        raise ValueError("use_cache=False is the uncached reference; it cannot be combined with fast=True / "
                         "compile=True (which decode with their own fixed-shape static cache)")
    from .generation import EXACT_CACHES
    if not (isinstance(cache_implementation, str) and cache_implementation in EXACT_CACHES) or cache_config:
        raise ValueError(f"fast=True / compile=True decode with their own fixed-shape static cache; "
                         f"cache_implementation must be left at 'dynamic' or 'static' and cache_config unset, "
                         f"got cache_implementation={cache_implementation!r}, cache_config={cache_config!r}")
    if output_logits:
        raise ValueError("output_logits=True is not available with fast=True / compile=True (the step keeps no "
                         "logits); use the ordinary loop to inspect logits")
    B, P = input_ids.shape
    decoder = get_fast_decoder(model, B, P + max_new_tokens, compile)
    return decoder.generate(input_ids, max_new_tokens, **kwargs)
