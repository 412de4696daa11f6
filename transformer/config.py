"""``ModelConfig``: every hyper-parameter of both models in one validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

POS_ENCODINGS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
MLPS = ("standard", "gated")
#: ``rope_scaling["rope_type"]`` values implemented (see :class:`~transformer.layers.RotaryEmbedding`).
ROPE_SCALINGS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class ModelConfig:
    """Shape and behaviour of a transformer.

    The same config serves the decoder-only model (``n_layers`` decoder blocks) and the
    encoder-decoder model (``n_encoder_layers`` encoder blocks, defaulting to ``n_layers``, plus
    ``n_layers`` decoder blocks with cross-attention).

    Attributes:
        vocab_size: tokens in the (target) vocabulary.
        src_vocab_size: source vocabulary of the encoder-decoder model (default: ``vocab_size``).
        d_model: width of the residual stream.
        n_layers: decoder blocks.
        n_heads: query heads.
        head_dim: width of one attention head.  ``None`` (default) means ``d_model // n_heads``
            (``d_model`` must then divide evenly); set it when the heads are wider or narrower
            than that (Qwen3: ``n_heads * head_dim != d_model``; the output projection maps
            ``n_heads * head_dim`` back to ``d_model``).
        n_kv_heads: key/value heads (grouped-query attention).  ``None`` means ``n_heads``
            (multi-head attention); 1 is multi-query attention.  Must divide ``n_heads``.
            The KV cache stores ``n_kv_heads`` heads, so GQA shrinks it by
            ``n_heads / n_kv_heads``.
        d_ff: hidden width of the MLP (default ``4 * d_model``).
        max_seq_len: longest sequence the model is trained for (size of the learned position
            table; RoPE has no table but generation still refuses longer prompts).
        pos_encoding: ``"learned"`` (GPT-2 style absolute embeddings) or ``"rope"`` (rotary).
        rope_theta: RoPE base frequency.
        rope_scaling: ``None`` (plain RoPE) or a dict stretching RoPE's wavelengths for longer
            contexts.  Supported: ``{"rope_type": "llama3", "factor", "low_freq_factor",
            "high_freq_factor", "original_max_position_embeddings"}`` (Llama 3.1's
            frequency-dependent rule, see :func:`~transformer.layers.rope_frequencies`).
        sliding_window: if set, each token attends to the ``sliding_window`` most recent
            positions only (itself included), in training and uncached runs too (Mistral-style
            sliding-window attention).  ``kv_cache.SlidingWindowKVCache(sliding_window)`` is
            then exact.  ``None`` (default): full causal attention.
        dropout: dropout probability on attention weights and residual branches (training only).
        bias: whether linear layers and norms have biases.
        qkv_bias: biases on the query/key/value projection only (Qwen2: yes, while the output
            projection and the MLP have none).  ``None`` (default): same as ``bias``.
        qk_norm: normalise each head's query and key (a norm of size ``head_dim``, the kind
            ``norm`` names) after the projection and before RoPE (Qwen3).
        norm: ``"layernorm"`` or ``"rmsnorm"``; ``norm_eps`` its epsilon.
        activation: MLP non-linearity (``"gelu"``, ``"gelu_tanh"`` as in GPT-2, ``"relu"``, ``"silu"``).
        mlp: ``"standard"`` (``fc_out(act(fc_in(x)))``, GPT-2) or ``"gated"`` (GLU:
            ``down(act(gate(x)) * up(x))``; SwiGLU with ``activation="silu"``: Llama, Mistral,
            Qwen).  The gated MLP has three ``d_model x d_ff`` matrices instead of two.
        tie_embeddings: share the token embedding with the output projection.
        n_encoder_layers: encoder blocks (encoder-decoder model only).
        pad_token_id / bos_token_id / eos_token_id: special token ids (may be ``None``).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_ff: Optional[int] = None
    max_seq_len: int = 256
    pos_encoding: str = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    sliding_window: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: Optional[bool] = None
    qk_norm: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    mlp: str = "standard"
    tie_embeddings: bool = True
    n_encoder_layers: Optional[int] = None
    src_vocab_size: Optional[int] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            if isinstance(self.d_model, int) and self.d_model % self.n_heads:
                raise ValueError(f"ModelConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                                 f"(or give head_dim explicitly)")
            self.head_dim = self.d_model // self.n_heads if isinstance(self.d_model, int) else None
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.n_encoder_layers is None:
            self.n_encoder_layers = self.n_layers
        if self.src_vocab_size is None:
            self.src_vocab_size = self.vocab_size
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot work."""
        for name in ("vocab_size", "src_vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                     "head_dim", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.n_encoder_layers, int) or self.n_encoder_layers < 0:
            raise ValueError(f"ModelConfig.n_encoder_layers must be an int >= 0, got {self.n_encoder_layers!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads} "
                f"(each key/value head serves a whole group of query heads)"
            )
        sw = self.sliding_window
        if sw is not None and (not isinstance(sw, int) or isinstance(sw, bool) or sw < 1):
            raise ValueError(f"ModelConfig.sliding_window must be None or a positive int, got {sw!r}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"ModelConfig.pos_encoding={self.pos_encoding!r}; expected one of {POS_ENCODINGS}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim}: RoPE needs an even head_dim")
        self._validate_rope_scaling()
        if self.norm not in NORMS:
            raise ValueError(f"ModelConfig.norm={self.norm!r}; expected one of {NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation={self.activation!r}; expected one of {ACTIVATIONS}")
        if self.mlp not in MLPS:
            raise ValueError(f"ModelConfig.mlp={self.mlp!r}; expected one of {MLPS}")
        for name in ("bias", "qk_norm", "qkv_bias", "tie_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, bool) and not (name == "qkv_bias" and v is None):
                raise ValueError(f"ModelConfig.{name}={v!r}; expected a bool" + (" or None" if name == "qkv_bias" else ""))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise ValueError(f"ModelConfig.{name}={v!r} must be None or in [0, vocab_size={self.vocab_size})")

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"ModelConfig.rope_scaling={rs!r}; expected None or a dict with rope_type in "
                             f"{sorted(ROPE_SCALINGS)} (other RoPE scalings are not implemented)")
        if self.pos_encoding != "rope":
            raise ValueError(f"ModelConfig.rope_scaling is set but pos_encoding={self.pos_encoding!r}; expected 'rope'")
        for key in ROPE_SCALINGS[kind]:
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"ModelConfig.rope_scaling[{key!r}]={v!r}; rope_type {kind!r} needs a positive "
                                 f"number for each of {list(ROPE_SCALINGS[kind])}")
        if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
            raise ValueError(f"ModelConfig.rope_scaling: high_freq_factor={rs['high_freq_factor']!r} must exceed "
                             f"low_freq_factor={rs['low_freq_factor']!r}")

    @property
    def attention_bias(self) -> bool:
        """Whether the query/key/value projection has biases (``qkv_bias``, else ``bias``)."""
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def to_dict(self) -> Dict[str, Any]:
        """Plain-JSON dict of every field (for checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise a ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)
