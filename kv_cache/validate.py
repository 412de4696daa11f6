"""The two argument checks every cache repeats: a count, and a layer index.

``bool`` is rejected although it is an ``int`` subclass (``num_layers=True`` is a bug, not 1).
Messages name the parameter, the value received and what was expected::

    positive_int("num_heads", 0)          ValueError: num_heads must be a positive int, got 0
    non_negative_int("start_idx", -1)     ValueError: start_idx must be a non-negative int, got -1
    int_at_least("window", 1, 2)          ValueError: window must be an int >= 2, got 1
    layer_index(-1)                       ValueError: layer_idx must be a non-negative int, got -1
    layer_index(2, num_layers=2)          IndexError: layer_idx=2 is out of range: this cache has
                                                      num_layers=2 (valid layer_idx 0..1)
"""

from __future__ import annotations

from typing import Optional


def int_at_least(name: str, value, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) ``>= minimum``; else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        expected = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    """``value`` if it is an int ``>= 1`` (a size, a count, a number of repeats)."""
    return int_at_least(name, value, 1)


def non_negative_int(name: str, value) -> int:
    """``value`` if it is an int ``>= 0`` (an offset, a count that may be zero)."""
    return int_at_least(name, value, 0)


def layer_index(value, num_layers: Optional[int] = None, name: str = "layer_idx") -> int:
    """Check a layer index and return it.

    Caches that grow a layer on first use (``num_layers=None``) accept any int ``>= 0``
    (``ValueError`` otherwise).  Caches with a fixed number of layers accept ``0..num_layers-1``
    and raise ``IndexError`` otherwise, like indexing a list of layers would.
    """
    if num_layers is None:
        return non_negative_int(name, value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_layers:
        raise IndexError(f"{name}={value!r} is out of range: this cache has num_layers={num_layers} "
                         f"(valid {name} 0..{num_layers - 1})")
    return value
