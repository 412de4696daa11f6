"""``QuantizedKVCache``: keys and values stored in 8, 4 or 2 bits; the newest tokens exact.

A float32 cache spends 4 bytes per number (``2 * n_layers * n_kv_heads * head_dim`` numbers per
token).  Keys and values survive coarse rounding well -- attention averages over many of them
-- so storing them in a few bits cuts the memory 4-14x at a small cost in accuracy.  This is
the idea of KIVI (Liu et al. 2024) and of Hugging Face's ``QuantizedCache``.

The scheme: per-group asymmetric min/max quantization along ``head_dim``.  Each token's vector
(per head) is cut into groups of ``group_size`` channels.  For a group with minimum ``m`` and
maximum ``M`` and ``b`` bits::

    scale = (M - m) / (2**b - 1)
    code  = round((x - m) / scale)        # an integer in 0 .. 2**b - 1
    x    ~= m + code * scale              # error at most scale / 2

``m`` and ``scale`` are stored in float16 (rounded down / up, so the group's range stays
covered and the bound holds; keys and values must stay inside float16's range, |x| < 65504).
Codes are packed ``8 // b`` per byte, so 4 bits really take half a byte -- ``memory_bytes()``
counts the packed bytes.  (KIVI quantizes keys per *channel* across tokens, which handles
outlier channels better at 2 bits; per-token groups are simpler and can be appended one token
at a time.)

The residual window.  The ``residual_length`` most recent tokens stay in full precision: the
newest tokens get the sharpest attention, and a token is quantized exactly once, when it
leaves the window (never re-quantized, so errors do not accumulate).

Cost.  :meth:`QuantizedKVCache.store` quantizes the tokens leaving the window (``O(S)``).
Attention then reads the packed blocks in place (:meth:`QuantizedKVCache.attend`, see
``quantized_attention.py``): each block is dequantized into a small scratch buffer as it is
used, with an online softmax across blocks, so no step materialises the dequantized history.
``update`` (the Hugging Face-style API) still returns the whole history dequantized --
``O(n)`` floats written per layer per step -- and is the reference ``attend`` is tested against.
Measured in ``benchmarks/long_context_benchmark.py``.

Bytes per token and layer, keys plus values: ``2 * H_kv * (head_dim * b / 8 + 4 * head_dim /
group_size)``; e.g. head_dim 64, groups of 32: 8 bits 144 B, 4 bits 80 B, 2 bits 48 B, against
512 B in float32 and 256 B in bfloat16.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..basic.base import Cache, as_index, check_append, check_kv_pair
from ..validate import layer_index, non_negative_int, positive_int
from .quantized_attention import quantized_attention

Tensor = torch.Tensor
NBITS = (2, 4, 8)
#: Quantized storage grows in blocks of this many tokens (at most ``BLOCK - 1`` spare slots).
BLOCK = 256


def _check_nbits(nbits) -> int:
    if isinstance(nbits, bool) or nbits not in NBITS:
        raise ValueError(f"nbits must be one of {NBITS} (bits per stored number), got {nbits!r}")
    return nbits


def _pack(codes: Tensor, nbits: int) -> Tensor:
    """Pack ``uint8`` codes ``(..., D)`` ``per = 8 // nbits`` per byte -> ``(..., D / per)``, *planar*:
    the channels are cut into ``per`` contiguous planes of ``D / per`` and byte ``j`` holds channel
    ``j`` of every plane (plane ``i`` in bits ``i * nbits ..``).  Planar rather than neighbouring
    channels in one byte so that unpacking writes each plane as one contiguous run and the codes
    come out in natural channel order (what :mod:`~kv_cache.long_context.quantized_attention` and
    its Triton kernel rely on: whole-row shifts and masks, no permutation)."""
    if nbits == 8:
        return codes
    c = codes.unflatten(-1, (8 // nbits, -1))
    out = c[..., 0, :].clone()
    for i in range(1, 8 // nbits):
        out |= c[..., i, :] << (nbits * i)
    return out


def _unpack(packed: Tensor, nbits: int) -> Tensor:
    """Inverse of :func:`_pack`: ``(..., D * nbits // 8)`` bytes -> ``(..., D)`` codes."""
    if nbits == 8:
        return packed
    mask = 2 ** nbits - 1
    return torch.cat([(packed >> shift) & mask for shift in range(0, 8, nbits)], dim=-1)


def quantize(x: Tensor, nbits: int, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize ``x`` ``(..., D)`` in groups of ``group_size`` along the last dim.

    Returns ``(packed, scale, minimum)``: ``uint8`` ``(..., D * nbits // 8)`` and float16
    ``(..., D // group_size)`` twice.  ``|x - dequantize(...)| <= scale / 2`` elementwise.
    Cost: a few passes over ``x``.
    """
    _check_nbits(nbits)
    D = x.shape[-1]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or D % group_size:
        raise ValueError(f"group_size must be a positive int dividing the last dim {D}, got {group_size!r}")
    if D % (8 // nbits):
        raise ValueError(f"{nbits}-bit packing puts {8 // nbits} numbers in a byte; the last dim {D} is not a multiple")
    levels = 2 ** nbits - 1
    g = x.detach().float().unflatten(-1, (D // group_size, group_size))  # rounding has no gradient
    lo, hi = g.amin(-1), g.amax(-1)
    lo16 = lo.half()
    lo16 = torch.where(lo16.float() > lo, torch.nextafter(lo16, lo16.new_tensor(float("-inf"))), lo16)
    scale = (hi - lo16.float()) / levels
    scale16 = scale.half()
    scale16 = torch.where(scale16.float() < scale, torch.nextafter(scale16, scale16.new_tensor(float("inf"))), scale16)
    step = torch.where(scale16 > 0, scale16.float(), torch.ones_like(scale))
    codes = ((g - lo16.float().unsqueeze(-1)) / step.unsqueeze(-1)).round_().clamp_(0, levels).to(torch.uint8)
    return _pack(codes.flatten(-2), nbits), scale16, lo16


def dequantize(packed: Tensor, scale: Tensor, minimum: Tensor, nbits: int, dtype: torch.dtype = torch.float32,
               out: Optional[Tensor] = None) -> Tensor:
    """Inverse of :func:`quantize` (up to rounding): ``(..., D)`` in ``dtype``.

    ``out`` (float32, shape ``(..., D)``, may be a strided view) receives the result without an
    extra copy.  Cost: one pass to widen the codes, one fused multiply-add.
    """
    groups = scale.shape[-1]
    codes = _unpack(packed, nbits).unflatten(-1, (groups, -1)).float()
    lo, step = minimum.float().unsqueeze(-1), scale.float().unsqueeze(-1)
    if out is not None and out.dtype == torch.float32:
        torch.addcmul(lo, codes, step, out=out.unflatten(-1, (groups, -1)))
        return out
    x = torch.addcmul(lo, codes, step).flatten(-2).to(dtype)
    if out is not None:
        out.copy_(x)
        return out
    return x


class _Quantized:
    """One layer's quantized keys *or* values: packed codes, scales and minima, grown in blocks.

    Growing by a block rather than by doubling keeps the spare room (and so ``memory_bytes``)
    under ``BLOCK`` tokens; the copy it costs every ``BLOCK`` tokens is small next to the
    per-step dequantization of the whole history.
    """

    def __init__(self):
        self.packed = self.scale = self.minimum = None

    def capacity(self) -> int:
        return 0 if self.packed is None else self.packed.shape[2]

    def append(self, n: int, parts: Tuple[Tensor, Tensor, Tensor]) -> None:
        """Write ``parts`` (each ``(B, H, f, *)``) at token slots ``n .. n+f-1``."""
        f = parts[0].shape[2]
        if n + f > self.capacity():
            cap = -(-(n + f) // BLOCK) * BLOCK
            grown = []
            for old, new in zip((self.packed, self.scale, self.minimum), parts):
                buf = new.new_zeros(new.shape[0], new.shape[1], cap, new.shape[3])
                if old is not None and n:
                    buf[:, :, :n] = old[:, :, :n]
                grown.append(buf)
            self.packed, self.scale, self.minimum = grown
        for buf, new in zip((self.packed, self.scale, self.minimum), parts):
            buf[:, :, n:n + f] = new

    def tensors(self) -> List[Tensor]:
        return [t for t in (self.packed, self.scale, self.minimum) if t is not None]

    def apply(self, fn) -> None:
        if self.packed is not None:
            self.packed, self.scale, self.minimum = (fn(t) for t in (self.packed, self.scale, self.minimum))


class QuantizedKVCache(Cache):
    """A growing KV cache that stores old keys/values in ``nbits`` bits.

    Args:
        nbits: 8, 4 or 2 bits per stored number.
        group_size: channels sharing one scale/minimum; must divide ``head_dim``.
        residual_length: at most this many of the newest tokens are kept exact.  A multi-token
            append (a prompt) leaves exactly ``residual_length`` of them; decoding one token at a
            time, when the exact window overflows, all but its newest ``ceil(residual_length / 2)``
            are quantized in one call -- so between those two counts are exact, and decoding pays
            for one quantization every ``residual_length / 2`` steps instead of one per step (the
            same batching as ``transformers``' ``QuantizedCache``, which flushes the whole window).
            0: quantize everything at once.

    ``update(key, value, layer_idx)`` appends ``(B, H_kv, S, D)`` tensors (``cache_position``
    must be ``None`` or the next positions) and returns every token: the quantized ones
    dequantized, then the residual window, as new tensors in the input dtype.  All tokens are
    kept, in order, so ``key_positions`` is ``arange(n)`` (``first + arange(n)`` after ``crop``
    dropped the ``first`` oldest); ``is_lossless`` is False because the values are approximate.
    ``get_seq_length`` is the position of the next token (tokens held plus any cropped).  ``memory_bytes()`` counts packed codes, scales, minima and the
    residual window, as allocated.  Budget per layer: quantized storage grows in blocks of 256
    tokens, so it holds at most ``n_q`` rounded up to a multiple of 256 (``n_q``: most tokens
    ever quantized) at ``bytes_per_token()``, plus the exact window's buffer of
    ``residual_length + 1`` tokens (decoding writes each new token into it in place: one copy,
    no reallocation).

    Example::

        cache = QuantizedKVCache(nbits=4, group_size=32, residual_length=16)
        k, v = cache.update(torch.randn(1, 4, 100, 64), torch.randn(1, 4, 100, 64), layer_idx=0)
        k.shape                  # (1, 4, 100, 64): 84 dequantized + 16 exact
    """

    is_lossless = False
    layout = "bhsd"

    def __init__(self, nbits: int = 8, group_size: int = 32, residual_length: int = 32):
        self.nbits = _check_nbits(nbits)
        positive_int("group_size", group_size)
        non_negative_int("residual_length", residual_length)
        self.group_size, self.residual_length = group_size, residual_length
        self.reset()

    def reset(self) -> None:
        """Forget every token and free all storage."""
        self._qk: List[_Quantized] = []
        self._qv: List[_Quantized] = []
        self._nq: List[int] = []                      # tokens quantized per layer
        self._rk: List[Optional[Tensor]] = []         # residual window, full precision: views of _wk / _wv
        self._rv: List[Optional[Tensor]] = []
        self._wk: List[Optional[Tensor]] = []         # the window's buffers, residual_length + 1 tokens
        self._wv: List[Optional[Tensor]] = []
        self._first: List[int] = []                   # position of the oldest token held (> 0 after crop)
        self._batch: Optional[int] = None

    def _grow(self, layer_idx: int) -> None:
        layer_index(layer_idx)
        while len(self._nq) <= layer_idx:
            self._qk.append(_Quantized())
            self._qv.append(_Quantized())
            self._nq.append(0)
            self._rk.append(None)
            self._rv.append(None)
            self._wk.append(None)
            self._wv.append(None)
            self._first.append(0)

    def _check(self, layer_idx: int, key: Tensor, value: Tensor) -> None:
        for name, t in (("key", key), ("value", value)):
            D = t.shape[3]
            if D % self.group_size:
                raise ValueError(f"group_size={self.group_size} must divide the head dim {D} of the {name} "
                                 f"for layer {layer_idx}")
            if D % (8 // self.nbits):
                raise ValueError(f"{self.nbits}-bit packing needs a head dim that is a multiple of "
                                 f"{8 // self.nbits}; the {name} for layer {layer_idx} has {D}")
            if not t.is_floating_point():
                raise ValueError(f"{name} for layer {layer_idx} must be floating point, got {t.dtype}")
        B = key.shape[0]
        if self._batch is not None and B != self._batch and any(self._seen_list()):
            raise ValueError(f"key for layer {layer_idx} has batch size {B}, but the cache holds {self._batch} "
                             f"rows; use batch_select_indices / batch_repeat_interleave, or reset()")
        old = self._rk[layer_idx]
        if old is not None and (old.shape[1] != key.shape[1] or old.shape[3] != key.shape[3]
                                or old.dtype != key.dtype or old.device != key.device
                                or self._rv[layer_idx].shape[3] != value.shape[3]):
            raise ValueError(f"key/value for layer {layer_idx} have shapes {tuple(key.shape)}/{tuple(value.shape)} "
                             f"({key.dtype}); the layer stores {old.shape[1]} heads of dim {old.shape[3]} ({old.dtype})")

    def _seen_list(self) -> List[int]:
        return [self.get_seq_length(l) for l in range(len(self._nq))]

    # ------------------------------------------------------------------ Cache API
    def update(self, key: Tensor, value: Tensor, layer_idx: int, cache_position=None):
        """Append ``S`` tokens; quantize those leaving the residual window; return all ``n`` tokens.

        Returns ``(B, H_kv, n, D)`` keys and values (new tensors).  Cost: ``O(S)`` quantization
        plus ``O(n)`` dequantization -- the whole history, every call.  A model should rather
        :meth:`store` and :meth:`attend` (what ``transformer``'s attention does), which never
        builds the dequantized history; ``update`` stays as the Hugging Face-style API and the
        reference the tests compare :meth:`attend` with.
        """
        self.store(key, value, layer_idx, cache_position)
        return self.get(layer_idx)

    def store(self, key: Tensor, value: Tensor, layer_idx: int, cache_position=None) -> None:
        """Append ``S`` tokens ``(B, H_kv, S, D)`` to ``layer_idx``, quantizing those that leave
        the residual window; return nothing.  Cost: ``O(S + residual_length)``."""
        check_kv_pair(key, value, layer_idx)
        self._grow(layer_idx)
        check_append(cache_position, self.get_seq_length(layer_idx), key.shape[2], type(self).__name__)
        self._check(layer_idx, key, value)
        l = layer_idx
        if self._rk[l] is not None and self._rk[l].shape[0] != key.shape[0]:  # rows changed while empty
            self._rk[l] = self._rv[l] = self._wk[l] = self._wv[l] = None
        self._batch = key.shape[0]
        # At most residual_length exact tokens.  A multi-token append (a prompt, a chunk) leaves
        # exactly residual_length of them; one token at a time (decoding), the window is cut back to
        # its newest half when it overflows: one quantization call every ~residual_length / 2 steps
        # instead of a dozen small operations on every step.
        R = self.residual_length
        if key.shape[2] == 1 and self._in_window(l):  # decoding: one write into the window's buffer
            wk, wv, held = self._wk[l], self._wv[l], self._rk[l].shape[2]
            wk[:, :, held:held + 1].copy_(key)
            wv[:, :, held:held + 1].copy_(value)
            held += 1
            if held > R:
                keep = (R + 1) // 2
                self._quantize(l, wk[:, :, :held - keep], wv[:, :, :held - keep])
                wk[:, :, :keep] = wk[:, :, held - keep:held].clone()  # (overlapping ranges: copy first)
                wv[:, :, :keep] = wv[:, :, held - keep:held].clone()
                held = keep
            self._rk[l], self._rv[l] = wk[:, :, :held], wv[:, :, :held]
            return
        res_k = key if self._rk[l] is None else torch.cat([self._rk[l], key], dim=2)
        res_v = value if self._rv[l] is None else torch.cat([self._rv[l], value], dim=2)
        held = res_k.shape[2]
        keep = R if key.shape[2] > 1 else (R + 1) // 2
        leaving = held - keep if held > R else 0
        if leaving > 0:
            self._quantize(l, res_k[:, :, :leaving], res_v[:, :, :leaving])
            res_k, res_v = res_k[:, :, leaving:], res_v[:, :, leaving:]
        # The window lives in a buffer of residual_length + 1 tokens (own memory: never a view
        # of a big prompt) that decoding then writes in place.
        held = res_k.shape[2]
        cap = max(R, held) + 1
        self._wk[l] = res_k.new_empty(res_k.shape[0], res_k.shape[1], cap, res_k.shape[3])
        self._wv[l] = res_v.new_empty(res_v.shape[0], res_v.shape[1], cap, res_v.shape[3])
        self._wk[l][:, :, :held], self._wv[l][:, :, :held] = res_k, res_v
        self._rk[l], self._rv[l] = self._wk[l][:, :, :held], self._wv[l][:, :, :held]

    def _quantize(self, l: int, key: Tensor, value: Tensor) -> None:
        """Append ``(B, H_kv, f, D)`` keys/values to layer ``l``'s quantized storage."""
        n = self._nq[l]
        self._qk[l].append(n, quantize(key, self.nbits, self.group_size))
        self._qv[l].append(n, quantize(value, self.nbits, self.group_size))
        self._nq[l] = n + key.shape[2]

    def _window_is_buffer(self, l: int) -> bool:
        """Is layer ``l``'s exact window a prefix of its window buffer?  (``crop``, ``rollback``
        and the batch operations leave a plain tensor instead: the next append then builds a
        new buffer.)"""
        rk, wk = self._rk[l], self._wk[l]
        return (rk is not None and wk is not None and rk.data_ptr() == wk.data_ptr() and rk.stride() == wk.stride()
                and self._rv[l].data_ptr() == self._wv[l].data_ptr())

    def _in_window(self, l: int) -> bool:
        """Can one more token be written into layer ``l``'s window buffer in place?"""
        return self._window_is_buffer(l) and self._rk[l].shape[2] < self._wk[l].shape[2]

    def attend(self, query: Tensor, layer_idx: int, mask: Optional[Tensor] = None, is_causal: bool = False,
               scale: Optional[float] = None, block: Optional[int] = None) -> Tensor:
        """Attention of ``query`` ``(B, H, S, D)`` over every token of ``layer_idx``, read from the
        quantized blocks in place (:func:`~kv_cache.long_context.quantized_attention.quantized_attention`:
        each block dequantized into a small scratch buffer as it is used, an online softmax across
        blocks, the exact residual tail last).  ``mask`` / ``is_causal`` as for
        ``scaled_dot_product_attention`` over the ``n`` keys in time order (``key_positions``).
        Returns ``(B, H, S, D)``; equals ``scaled_dot_product_attention`` over :meth:`update`'s
        dequantized history up to float rounding.  Cost: ``O(n)`` reads of the packed bytes,
        ``O(block)`` scratch memory instead of ``O(n)``."""
        if layer_idx >= len(self._nq) or self._held(layer_idx) == 0:
            raise ValueError(f"layer {layer_idx} of this QuantizedKVCache holds no tokens; store() some first")
        l = layer_idx
        return quantized_attention(query, self._qk[l].tensors(), self._qv[l].tensors(), self._nq[l], self.nbits,
                                   self._rk[l], self._rv[l], mask=mask, is_causal=is_causal, scale=scale, block=block)

    def get(self, layer_idx: int):
        """All tokens of ``layer_idx`` (dequantized, then exact), or ``None`` if it is empty."""
        if layer_idx >= len(self._nq) or self._held(layer_idx) == 0:
            return None
        n, rk, rv = self._nq[layer_idx], self._rk[layer_idx], self._rv[layer_idx]
        if n == 0:
            return rk, rv
        out = []
        for q, res in ((self._qk[layer_idx], rk), (self._qv[layer_idx], rv)):
            full = res.new_empty(res.shape[0], res.shape[1], n + res.shape[2], res.shape[3])
            dequantize(q.packed[:, :, :n], q.scale[:, :, :n], q.minimum[:, :, :n], self.nbits, out=full[:, :, :n])
            full[:, :, n:] = res
            out.append(full)
        return out[0], out[1]

    def _held(self, layer_idx: int) -> int:
        """Tokens held by ``layer_idx`` (quantized + exact)."""
        r = self._rk[layer_idx]
        return self._nq[layer_idx] + (0 if r is None else r.shape[2])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Position of the next token of ``layer_idx``: tokens held (quantized + exact) plus any
        dropped by :meth:`crop`."""
        if layer_idx >= len(self._nq):
            return 0
        return self._first[layer_idx] + self._held(layer_idx)

    def key_positions(self, layer_idx: int, in_cache: bool = False) -> Tensor:
        """Every token held is kept in order: ``first + arange(n)`` (``in_cache=True``: ``arange(n)``),
        ``first`` being 0 until :meth:`crop` drops the oldest tokens."""
        if layer_idx >= len(self._nq):
            return torch.zeros(0, dtype=torch.long)
        r, first = self._rk[layer_idx], 0 if in_cache else self._first[layer_idx]
        return torch.arange(first, first + self._held(layer_idx), device=None if r is None else r.device)

    def quantized_length(self, layer_idx: int = 0) -> int:
        """Tokens of ``layer_idx`` held in ``nbits`` bits (the rest are exact)."""
        return self._nq[layer_idx] if layer_idx < len(self._nq) else 0

    def batch_select_indices(self, indices) -> None:
        """Keep batch rows ``indices`` (in order) in every buffer.  O(stored bytes)."""
        if self._batch is None:
            return
        idx = as_index(indices, "indices", self._batch, self._device())
        self._rebatch(lambda t: t.index_select(0, idx))
        self._batch = idx.numel()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times.  O(stored bytes * repeats)."""
        positive_int("repeats", repeats)
        if self._batch is None:
            return
        self._rebatch(lambda t: t.repeat_interleave(repeats, dim=0))
        self._batch *= repeats

    def _device(self):
        for r in self._rk:
            if r is not None:
                return r.device
        return torch.device("cpu")

    def _rebatch(self, fn) -> None:
        for l in range(len(self._nq)):
            self._qk[l].apply(fn)
            self._qv[l].apply(fn)
            if self._rk[l] is not None:
                self._rk[l], self._rv[l] = fn(self._rk[l]), fn(self._rv[l])
            self._wk[l] = self._wv[l] = None  # the next append builds a buffer for the new rows

    def crop(self, max_length: int) -> None:
        """Keep only the ``max_length`` most recent tokens of every layer (``max_length >= 0``).

        The kept quantized tokens move to the front of their storage (still quantized), the
        residual window keeps its newest tokens, and ``key_positions`` starts at the first kept
        position; ``get_seq_length`` does not change.  Cost: one copy of the kept codes.
        """
        keep = self._crop_count(max_length)
        for l in range(len(self._nq)):
            drop, nq = self._held(l) - keep, self._nq[l]
            if drop <= 0:
                continue
            if drop >= nq:  # every quantized token goes, and the oldest of the residual window
                self._nq[l] = 0
                self._rk[l], self._rv[l] = self._rk[l][:, :, drop - nq:].clone(), self._rv[l][:, :, drop - nq:].clone()
                self._wk[l] = self._wv[l] = None
            else:
                for q in (self._qk[l], self._qv[l]):
                    for buf in (q.packed, q.scale, q.minimum):
                        buf[:, :, :nq - drop] = buf[:, :, drop:nq].clone()
                self._nq[l] = nq - drop
            self._first[l] += drop

    def rollback(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (negative: drop from the end).  Quantized tokens
        stay quantized, so after a rollback the newest tokens may be approximate.  Positions
        already dropped by :meth:`crop` cannot come back: going below them raises.  O(residual)."""
        targets = []
        for l in range(len(self._nq)):
            first = self._first[l]
            target = self._rollback_target(max_length, first + self._held(l))
            if target < first:
                raise ValueError(
                    f"rollback({max_length}) would keep positions 0..{target - 1} of layer {l}, but crop() already "
                    f"dropped positions 0..{first - 1}: expected a length in [{first}, {first + self._held(l)}] "
                    f"(or reset())")
            targets.append(target - first)
        for l, keep in enumerate(targets):
            if keep < self._nq[l]:
                self._nq[l] = keep
                if self._rk[l] is not None:
                    self._rk[l], self._rv[l] = self._rk[l][:, :, :0].clone(), self._rv[l][:, :, :0].clone()
            elif self._rk[l] is not None:
                r = keep - self._nq[l]
                self._rk[l], self._rv[l] = self._rk[l][:, :, :r].clone(), self._rv[l][:, :, :r].clone()
            self._wk[l] = self._wv[l] = None

    def memory_bytes(self) -> int:
        """Bytes allocated: packed codes, float16 scales and minima (capacity), residual window."""
        tensors = [t for q in self._qk + self._qv for t in q.tensors()]
        for l in range(len(self._nq)):  # the window: its buffer while it is one, else the tensor itself
            window = (self._wk[l], self._wv[l]) if self._window_is_buffer(l) else (self._rk[l], self._rv[l])
            tensors += [t for t in window if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> float:
        """Bytes one more *quantized* token adds, all layers and rows together (0 before any update)."""
        total = 0.0
        for l, r in enumerate(self._rk):
            if r is None:
                continue
            B, H = r.shape[:2]
            for D in (r.shape[3], self._rv[l].shape[3]):
                total += B * H * (D * self.nbits / 8 + 4 * D / self.group_size)
        return total

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(nbits={self.nbits}, group_size={self.group_size}, residual_length="
                f"{self.residual_length}, layers={len(self._nq)}, lengths={self._seen_list()}, "
                f"bytes={self.memory_bytes()})")
