"""A naive KV cache used as the test oracle: obviously correct, deliberately slow.

Per layer it keeps one plain tensor per keys/values, grown with ``torch.cat`` (copying the whole
history on every append -- exactly what the real caches avoid).  Positional writes zero-pad the
tensor up to the largest position and then assign by index, row by row.  Batch operations,
``crop`` and ``rollback`` are single tensor expressions.  Every real cache must return exactly
(``torch.equal``) what this one returns.

Positions.  ``first[layer]`` is the position held by index 0 of the layer's tensor: 0 until
``crop(n)`` keeps only the last ``n`` tokens (then it grows by the number dropped).
``get_seq_length`` is ``first + tokens held`` (the next position), ``key_positions`` is
``first + arange(held)``, writes before ``first`` and rollbacks below it raise ``ValueError``.
"""

from __future__ import annotations

import torch


class ReferenceCache:
    """List-and-concatenate KV cache with the semantics of ``kv_cache.Cache``.

    ``layout`` is ``"bhsd"`` or ``"bshd"``; tensors are stored and returned in it.
    """

    def __init__(self, layout: str = "bhsd"):
        self.layout = layout
        self.sd = 2 if layout == "bhsd" else 1
        self.k: dict = {}  # layer -> tensor
        self.v: dict = {}
        self.first: dict = {}  # layer -> position of index 0 (> 0 only after crop)
        self.batch = None
        self.is_lossless = True  # False once crop dropped a token, until reset

    def _length(self, layer):
        return self.k[layer].shape[self.sd] if layer in self.k else 0

    def get_seq_length(self, layer=0):
        return self.first.get(layer, 0) + self._length(layer)

    def first_position(self, layer=0):
        return self.first.get(layer, 0)

    def key_positions(self, layer):
        f = self.first_position(layer)
        return torch.arange(f, f + self._length(layer))

    def get(self, layer):
        if self._length(layer) == 0:
            return None
        return self.k[layer], self.v[layer]

    def _write(self, old, new, cache_position, first):
        sd = self.sd
        if old is None or old.shape[sd] == 0:
            shape = list(new.shape)
            shape[sd] = 0
            old = new.new_zeros(shape)
        if cache_position is None:
            return torch.cat([old, new], dim=sd)
        pos = torch.as_tensor(cache_position).long() - first
        if pos.dim() == 0:
            pos = pos.reshape(1)
        end = int(pos.max()) + 1
        if end > old.shape[sd]:
            pad_shape = list(old.shape)
            pad_shape[sd] = end - old.shape[sd]
            old = torch.cat([old, old.new_zeros(pad_shape)], dim=sd)
        out = old.clone()
        for b in range(new.shape[0]):
            row_pos = pos if pos.dim() == 1 else pos[b]
            if sd == 2:
                out[b, :, row_pos] = new[b]
            else:
                out[b, row_pos] = new[b]
        return out

    def update(self, key, value, layer, cache_position=None):
        first = self.first_position(layer)
        if cache_position is not None and int(torch.as_tensor(cache_position).min()) < first:
            raise ValueError(f"position before {first}: crop() dropped it")
        self.k[layer] = self._write(self.k.get(layer), key, cache_position, first)
        self.v[layer] = self._write(self.v.get(layer), value, cache_position, first)
        self.first[layer] = first
        self.batch = key.shape[0]
        return self.k[layer], self.v[layer]

    def _apply(self, fn):
        for layer in list(self.k):
            if self._length(layer):  # an empty layer has nothing to reindex
                self.k[layer], self.v[layer] = fn(self.k[layer]), fn(self.v[layer])

    def batch_select_indices(self, indices):
        if self.batch is None:
            return
        idx = torch.as_tensor(indices).long()
        self._apply(lambda t: t[idx])
        self.batch = len(idx)

    def reorder_cache(self, beam_idx):
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats):
        if self.batch is None:
            return
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))
        self.batch *= repeats

    def crop(self, max_length):
        """Keep the last ``max_length`` tokens of every layer."""
        for layer in list(self.k):
            n = self._length(layer)
            if n > max_length:
                self.k[layer] = self.k[layer].narrow(self.sd, n - max_length, max_length)
                self.v[layer] = self.v[layer].narrow(self.sd, n - max_length, max_length)
                self.first[layer] = self.first_position(layer) + n - max_length
                self.is_lossless = False

    def rollback(self, max_length):
        """Keep the first ``max_length`` positions (negative: drop from the end); all or nothing."""
        keeps = {}
        for layer in list(self.k):
            end = self.get_seq_length(layer)
            target = max(0, min(end + max_length if max_length < 0 else max_length, end))
            if target < self.first_position(layer):
                raise ValueError(f"crop() already dropped positions below {self.first_position(layer)}")
            keeps[layer] = target - self.first_position(layer)
        for layer, keep in keeps.items():
            self.k[layer] = self.k[layer].narrow(self.sd, 0, keep)
            self.v[layer] = self.v[layer].narrow(self.sd, 0, keep)

    def reset(self):
        self.k, self.v, self.first, self.batch, self.is_lossless = {}, {}, {}, None, True
