"""Load Llama, Mistral, Qwen2, Qwen3 (and GPT-2) checkpoints saved by Hugging Face into the one
:class:`~transformer.model.DecoderOnlyTransformer`.

These "Llama-family" models are this project's decoder configured differently from GPT-2
(:func:`hf_model_config` does the translation)::

    GPT-2                          Llama / Mistral / Qwen2 / Qwen3
    learned positions              RoPE (rope_theta; Llama 3.1: rope_scaling "llama3")
    LayerNorm with bias            RMSNorm (rms_norm_eps -> norm_eps), no biases
    fc_out(gelu(fc_in(x)))         SwiGLU: down(silu(gate(x)) * up(x))         mlp="gated"
    n_heads heads of d/n_heads     grouped-query attention (n_kv_heads); Qwen3: head_dim set
                                   Qwen2: biases on q/k/v only               qkv_bias=True
                                   Qwen3: RMSNorm of each q/k head           qk_norm=True
                                   Mistral: sliding_window (may be null)

Weights are renamed and packed into this project's fused projections.  Hugging Face's
``nn.Linear`` stores ``(out, in)``; this project's :class:`~transformer.layers.Linear` stores
``(in, out)``, so each matrix is transposed as it is copied:

======================================================  ==================================
Hugging Face key (``model.layers.i.`` prefix)            this project (``decoder.blocks.i.``)
======================================================  ==================================
``input_layernorm.weight``                               ``norm1.weight``
``self_attn.{q,k,v}_proj.{weight,bias}``                 ``attn.qkv_proj`` columns
                                                         ``[q heads | k heads | v heads]``
``self_attn.o_proj.weight``                              ``attn.out_proj.weight``
``self_attn.{q,k}_norm.weight`` (Qwen3)                  ``attn.{q,k}_norm.weight``
``post_attention_layernorm.weight``                      ``norm2.weight``
``mlp.{gate,up}_proj.weight``                            ``mlp.fc_in`` columns ``[gate | up]``
``mlp.down_proj.weight``                                 ``mlp.fc_out.weight``
``model.embed_tokens.weight`` / ``model.norm.weight``    ``decoder.tok_emb`` / ``decoder.norm_f``
``lm_head.weight`` (untied only)                         ``decoder.lm_head.weight``
======================================================  ==================================

RoPE convention: Hugging Face's Llama-family checkpoints are stored for the "rotate-half"
RoPE (channel ``i`` paired with ``i + head_dim/2``; their conversion from Meta's interleaved
layout permuted the q/k rows once), and :func:`~transformer.layers.apply_rotary` is rotate-half
too, so q/k load as they are: no permutation, no convention switch.

Memory: the model is built on the ``meta`` device (no memory, no random initialisation), then
given uninitialised storage of the chosen dtype on the chosen device; each safetensors shard is
then read, its tensors copied into place (a q/k/v or gate/up matrix into its column slice, so
pieces may sit in different shards) and the shard freed.  Peak: the model plus one shard.
Only safetensors are read (no unpickling) and ``transformers`` is not imported.

Entry points: :func:`load_pretrained` (also ``DecoderOnlyTransformer.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, NamedTuple, Optional, Union

import torch

from .config import ModelConfig
from .gpt2 import (ACTIVATIONS, CheckpointFormatError, PathLike, _load_file, _resolve_dtype, load_gpt2_model,
                   read_config_json, weight_files)
from .model import DecoderOnlyTransformer

#: ``config.json`` ``model_type`` values :func:`load_pretrained` reads.
SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
#: Keys some checkpoints carry that hold nothing this model needs (RoPE tables it recomputes).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- config ----------------------------------------------------------------------------------

def hf_model_config(hf: dict) -> ModelConfig:
    """Translate a Llama / Mistral / Qwen2 / Qwen3 ``config.json`` dict into a :class:`ModelConfig`.

    ``hidden_size -> d_model``, ``num_hidden_layers -> n_layers``, ``num_attention_heads ->
    n_heads``, ``num_key_value_heads -> n_kv_heads``, ``head_dim``, ``intermediate_size ->
    d_ff``, ``max_position_embeddings -> max_seq_len``, ``rms_norm_eps -> norm_eps``,
    ``rope_theta`` and ``rope_scaling`` (or transformers 5's ``rope_parameters`` holding both),
    ``tie_word_embeddings -> tie_embeddings``, ``hidden_act -> activation``, biases
    (``attention_bias``/``mlp_bias``; Qwen2's q/k/v biases), the sliding window and the special
    token ids (kept when inside the vocabulary; a list of eos ids keeps its first).

    Raises :class:`~transformer.gpt2.CheckpointFormatError` naming the key of a missing or
    unsupported setting.
    """
    mt = hf.get("model_type")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings"):
        if key not in hf:
            raise CheckpointFormatError(f"{mt} config.json lacks {key!r}; found keys {sorted(hf)}")
    act = hf.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise CheckpointFormatError(f"{mt} config.json has hidden_act={act!r}; supported: {sorted(ACTIVATIONS)}")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5: theta and scaling in one dict
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = dict(hf.get("rope_scaling") or rope)
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise CheckpointFormatError(f"{mt} config.json rotates part of each head (partial_rotary_factor); "
                                    f"only full-head RoPE is implemented")
    qkv_bias, bias = _biases(hf, mt)
    vocab = hf["vocab_size"]

    def token(name):
        v = hf.get(name)
        v = v[0] if isinstance(v, list) and v else v
        return v if isinstance(v, int) and isinstance(vocab, int) and 0 <= v < vocab else None

    try:
        return ModelConfig(
            vocab_size=vocab, d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"), d_ff=hf["intermediate_size"], max_seq_len=hf["max_position_embeddings"],
            pos_encoding="rope", rope_theta=float(theta), rope_scaling=scaling,
            sliding_window=_sliding_window(hf, mt), dropout=0.0, bias=bias, qkv_bias=qkv_bias,
            qk_norm=mt == "qwen3", norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            activation=ACTIVATIONS[act], mlp="gated", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"))
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{mt} config.json describes a model this project cannot build: {e}") from None


def _biases(hf: dict, mt: str):
    """``(qkv_bias, bias)`` of a family: Qwen2 has q/k/v biases only; Llama has
    ``attention_bias`` (q/k/v/o) and ``mlp_bias``, which must agree here; Qwen3's
    ``attention_bias`` (q/k/v/o but no MLP bias) and Mistral have none in released checkpoints."""
    if mt == "qwen2":
        return True, False
    attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if mt == "llama" and attn == mlp:
        return None, attn
    if attn or mlp:
        raise CheckpointFormatError(f"{mt} config.json has attention_bias={attn}, mlp_bias={mlp}; this model "
                                    f"implements biases on q/k/v only (qkv_bias) or on every projection (bias)")
    return None, False


def _sliding_window(hf: dict, mt: str) -> Optional[int]:
    """Mistral: ``sliding_window`` (``null``: full attention).  Qwen2/Qwen3: a window only on the
    layers ``layer_types`` (or ``use_sliding_window``/``max_window_layers``) marks; this model has
    one window for every layer, so a mix is refused."""
    if mt == "mistral":
        return hf.get("sliding_window")
    if mt not in ("qwen2", "qwen3"):
        return None
    n = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= hf.get(
        "max_window_layers", n) else "full_attention" for i in range(n)]
    kinds = set(types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"} and hf.get("sliding_window"):
        return hf["sliding_window"]
    raise CheckpointFormatError(f"{mt} config.json has layer_types={types!r}; this model applies one "
                                f"sliding_window to every layer or to none")


# ---- weights ---------------------------------------------------------------------------------

class Target(NamedTuple):
    """Where one Hugging Face tensor goes: ``param`` (a name in ``named_parameters``), the
    columns ``[lo, hi)`` of it (``None``: the whole tensor) and whether to transpose (HF
    ``nn.Linear`` ``(out, in)`` into this project's ``(in, out)`` ``Linear``)."""

    param: str
    lo: Optional[int] = None
    hi: Optional[int] = None
    transpose: bool = False

    def view(self, p: torch.Tensor) -> torch.Tensor:
        """The part of parameter ``p`` this tensor fills (a view: copying into it writes ``p``)."""
        return p if self.lo is None else p[..., self.lo:self.hi]


def weight_targets(c: ModelConfig) -> Dict[str, Target]:
    """Hugging Face tensor name -> :class:`Target` for a Llama-family model of config ``c``."""
    q, kv, ff = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.d_ff
    out = {"model.embed_tokens.weight": Target("decoder.tok_emb.weight"),
           "model.norm.weight": Target("decoder.norm_f.weight")}
    if not c.tie_embeddings:
        out["lm_head.weight"] = Target("decoder.lm_head.weight")
    parts = {"self_attn.q_proj": ("attn.qkv_proj", 0, q), "self_attn.k_proj": ("attn.qkv_proj", q, q + kv),
             "self_attn.v_proj": ("attn.qkv_proj", q + kv, q + 2 * kv), "self_attn.o_proj": ("attn.out_proj", None, None),
             "mlp.gate_proj": ("mlp.fc_in", 0, ff), "mlp.up_proj": ("mlp.fc_in", ff, 2 * ff),
             "mlp.down_proj": ("mlp.fc_out", None, None)}
    for i in range(c.n_layers):
        hf, ours = f"model.layers.{i}.", f"decoder.blocks.{i}."
        out[hf + "input_layernorm.weight"] = Target(ours + "norm1.weight")
        out[hf + "post_attention_layernorm.weight"] = Target(ours + "norm2.weight")
        if c.qk_norm:
            for n in ("q_norm", "k_norm"):
                out[hf + f"self_attn.{n}.weight"] = Target(ours + f"attn.{n}.weight")
        for name, (mod, lo, hi) in parts.items():
            out[hf + name + ".weight"] = Target(ours + mod + ".weight", lo, hi, transpose=True)
            has_bias = c.attention_bias if name[-6:] in ("q_proj", "k_proj", "v_proj") else c.bias
            if has_bias:
                out[hf + name + ".bias"] = Target(ours + mod + ".bias", lo, hi)
    return out


def _empty_model(config: ModelConfig, dtype: torch.dtype, device) -> DecoderOnlyTransformer:
    """The model with uninitialised ``dtype`` storage on ``device``: built on ``meta`` (free),
    then ``to_empty``.  Ties the head again and recomputes RoPE's float32 frequencies (a
    non-persistent buffer, which ``to_empty`` leaves uninitialised)."""
    with torch.device("meta"):
        model = DecoderOnlyTransformer(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.tok_emb.weight
    if model.decoder.rotary is not None:
        model.decoder.rotary.reset_frequencies(device)
    return model


@torch.no_grad()
def _copy_weights(model: DecoderOnlyTransformer, path: PathLike, mt: str) -> None:
    """Fill ``model``'s parameters from the safetensors shards of ``path``, one shard at a time."""
    params = dict(model.named_parameters())
    targets = weight_targets(model.config)
    missing = set(targets)
    for file in weight_files(path, allow_pickle=False):
        # in a function of its own, so nothing of this shard outlives the call: the next shard
        # is read only after every tensor of this one is freed
        missing -= _copy_shard(_load_file(file), file.name, params, targets, model.config, mt)
    if missing:
        raise CheckpointFormatError(f"{mt} weights lack {len(missing)} key(s) for this config, "
                                    f"e.g. {sorted(missing)[:5]}")


def _copy_shard(shard: Dict[str, torch.Tensor], name: str, params: Dict[str, torch.nn.Parameter],
                targets: Dict[str, Target], config: ModelConfig, mt: str) -> set:
    """Copy the tensors of one shard (HF name -> tensor) into ``params``; the names copied."""
    unexpected = [k for k in shard if k not in targets and not k.endswith(_IGNORED_SUFFIXES)
                  and not (k == "lm_head.weight" and config.tie_embeddings)]
    if unexpected:
        raise CheckpointFormatError(f"{mt} weights in {name!r} have {len(unexpected)} unexpected key(s) "
                                    f"for this config ({config.n_layers} layers), e.g. {unexpected[:5]}")
    done = set()
    for key, t in shard.items():
        target = targets.get(key)
        if target is None:
            continue
        src, dst = (t.T if target.transpose else t), target.view(params[target.param])
        if src.shape != dst.shape:
            shape = tuple(dst.T.shape if target.transpose else dst.shape)
            raise CheckpointFormatError(f"{mt} weight {key!r} has shape {tuple(t.shape)}; expected {shape} "
                                        f"from config.json")
        dst.copy_(src)
        done.add(key)
    return done


def load_pretrained(path: PathLike, dtype: Union[torch.dtype, str, None] = None,
                    device: Union[str, torch.device] = "cpu") -> DecoderOnlyTransformer:
    """Build a :class:`DecoderOnlyTransformer` from a Hugging Face model folder.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json`` with its shards), e.g. ``save_pretrained`` output.
            ``model_type`` must be one of :data:`SUPPORTED_MODEL_TYPES`; GPT-2 goes to
            :func:`transformer.gpt2.load_gpt2_model`.
        dtype: parameter dtype (a ``torch.dtype`` or ``"bfloat16"``...); ``None``: the one
            ``config.json`` declares (``dtype``, or ``torch_dtype`` in older files), else float32.
        device: where the parameters live (weights are copied there shard by shard).

    Returns the model in eval mode; ``model.config`` is the translated :class:`ModelConfig`, so
    caches, ``generate``, the fast path and the serving engine run it unchanged.  Cost: one read
    of the weights; peak memory about the model plus one shard (see the module docstring).

    Raises ``ValueError`` for an unsupported ``model_type`` (naming it and the supported ones),
    :class:`~transformer.gpt2.CheckpointFormatError` (a ``ValueError``) for an unsupported
    setting, pickled-only weights, or a missing/unexpected/misshapen tensor, and
    ``FileNotFoundError`` for a missing folder, ``config.json`` or weights.
    """
    hf = read_config_json(path)
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{str(Path(path) / 'config.json')!r} has model_type={mt!r}; supported model types are "
                         f"{list(SUPPORTED_MODEL_TYPES)}")
    declared = hf.get("dtype", hf.get("torch_dtype"))
    dtype = _resolve_dtype(dtype if dtype is not None else declared if declared is not None else torch.float32)
    weight_files(path, allow_pickle=False)  # refuse a pickle-only folder before any work (GPT-2 too)
    if mt == "gpt2":
        return load_gpt2_model(path, device=device, dtype=dtype)
    model = _empty_model(hf_model_config(hf), dtype, device)
    _copy_weights(model, path, mt)
    return model.eval()

