"""Load GPT-2 family weights saved by the Hugging Face libraries into :class:`DecoderOnlyTransformer`.

A GPT-2 checkpoint folder (``save_pretrained`` output, or a hub snapshot) holds::

    config.json                      n_layer, n_head, n_embd, n_positions, vocab_size, ...
    model.safetensors                the weights (or pytorch_model.bin, or sharded *.index.json)
    tokenizer.json                   optional: byte-level BPE (or vocab.json + merges.txt)

GPT-2 *is* this project's decoder-only model with ``pos_encoding="learned"``, LayerNorm with
biases, ``activation="gelu_tanh"`` (HF's ``gelu_new``) and tied embeddings, so loading is a
renaming of tensors.  GPT-2 stores its projections as ``Conv1D`` modules whose weight is
``(in_features, out_features)`` -- the transpose of ``nn.Linear``'s ``(out, in)`` but exactly the
layout of this project's :class:`~transformer.layers.Linear`, so they load as they are.

=================================  ==========================  =========================
Hugging Face key (``transformer.``  this project                 conversion
prefix optional)
=================================  ==========================  =========================
``wte.weight``  ``(V, d)``          ``decoder.tok_emb.weight``   as is
``wpe.weight``  ``(P, d)``          ``decoder.pos_emb.weight``   as is
``h.i.ln_1.{weight,bias}``          ``decoder.blocks.i.norm1``   as is
``h.i.attn.c_attn.weight (d, 3d)``  ``...attn.qkv_proj.weight``  as is; both order
                                                                 ``[q heads | k | v]``
``h.i.attn.c_proj.weight (d, d)``   ``...attn.out_proj.weight``  as is     
``h.i.ln_2.{weight,bias}``          ``decoder.blocks.i.norm2``   as is
``h.i.mlp.c_fc.weight (d, ff)``     ``...mlp.fc_in.weight``      as is     
``h.i.mlp.c_proj.weight (ff, d)``   ``...mlp.fc_out.weight``     as is     
``ln_f.{weight,bias}``              ``decoder.norm_f``           as is
``lm_head.weight (V, d)``           ``decoder.lm_head.weight``   only if not tied
=================================  ==========================  =========================

``h.i.attn.bias`` / ``h.i.attn.masked_bias`` (the causal-mask buffers old checkpoints saved)
are ignored.  Nothing is unpickled: weights are read with ``safetensors`` or with
``torch.load(weights_only=True)`` (``.bin`` files only on torch >= 2.10: older releases have
published bypasses of ``weights_only``), and the ``transformers`` package is not needed.

Entry points: :func:`load_gpt2_model` (also ``DecoderOnlyTransformer.from_pretrained_gpt2``),
:func:`load_gpt2_tokenizer`, and :func:`load_gpt2` which returns both (for ``generate.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .config import ModelConfig
from .model import DecoderOnlyTransformer

PathLike = Union[str, Path]

#: Weight files tried in this order (safetensors first: no code can hide in it).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: HF ``activation_function`` -> ``ModelConfig.activation``.  ``gelu_new``, ``gelu_pytorch_tanh``
#: and ``gelu_fast`` are three spellings of the same tanh approximation of GELU.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
#: GPT-2 options this model does not implement, with the only value it supports.
UNSUPPORTED = {"scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
               "scale_attn_weights": True, "add_cross_attention": False}
ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model", "GPT2DoubleHeadsModel")
#: Keys present in some checkpoints that carry no weights we need.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_IGNORED_PREFIXES = ("multiple_choice_head.",)


class CheckpointFormatError(ValueError):
    """A Hugging Face checkpoint folder this project cannot read (the message says why)."""


class GPT2FormatError(CheckpointFormatError):
    """The folder is not a GPT-2 checkpoint this loader can read (the message says why)."""


# ---- config ----------------------------------------------------------------------------------

def read_config_json(path: PathLike, what: str = "Hugging Face") -> dict:
    """The parsed ``config.json`` of the Hugging Face model folder ``path`` (a JSON object).

    Raises ``FileNotFoundError`` if the folder or its ``config.json`` is missing and
    :class:`GPT2FormatError` (a :class:`CheckpointFormatError`) if the JSON is broken or not an
    object.  ``what`` names the kind of folder in the messages.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} path {str(folder)!r} is not a folder; expected a folder with "
                                f"config.json and model.safetensors (or pytorch_model.bin)")
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {str(folder)!r}; a {what} folder has "
                                f"config.json next to model.safetensors (or pytorch_model.bin)")
    try:
        hf = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GPT2FormatError(f"{str(file)!r} is not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise GPT2FormatError(f"{str(file)!r} holds a {type(hf).__name__}; expected a JSON object")
    return hf


def read_gpt2_config(path: PathLike) -> dict:
    """The parsed ``config.json`` of the GPT-2 folder ``path``, checked to describe GPT-2.

    Raises ``FileNotFoundError`` if the folder or its ``config.json`` is missing and
    :class:`GPT2FormatError` if the JSON is broken or describes another architecture.
    """
    hf = read_config_json(path, "GPT-2")
    file = Path(path) / "config.json"
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type is None and not archs:
        raise GPT2FormatError(f"{str(file)!r} has neither model_type nor architectures; expected "
                              f"model_type='gpt2'")
    if model_type is not None and model_type != "gpt2":
        raise GPT2FormatError(f"{str(file)!r} has model_type={model_type!r}; expected 'gpt2'")
    bad = [a for a in archs if a not in ARCHITECTURES]
    if bad:
        raise GPT2FormatError(f"{str(file)!r} has architectures={archs!r}; expected one of {list(ARCHITECTURES)}")
    return hf


def gpt2_model_config(hf: dict) -> ModelConfig:
    """Translate a GPT-2 ``config.json`` dict into the equivalent :class:`ModelConfig`.

    ``n_layer -> n_layers``, ``n_head -> n_heads``, ``n_embd -> d_model``, ``n_positions``
    (or the older ``n_ctx``) ``-> max_seq_len``, ``n_inner`` (``None`` = ``4 * n_embd``)
    ``-> d_ff``, ``layer_norm_epsilon -> norm_eps``, ``tie_word_embeddings -> tie_embeddings``,
    ``activation_function`` via :data:`ACTIVATIONS`.  Dropout is 0: the model is for inference
    (set ``model.config``/modules yourself before fine-tuning).  ``eos``/``bos_token_id`` are
    kept when they are inside the vocabulary, else dropped (``None``).

    Raises :class:`GPT2FormatError` naming the key for a missing or unsupported setting.
    """
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        if key not in hf:
            raise GPT2FormatError(f"GPT-2 config.json lacks {key!r}; found keys {sorted(hf)}")
    for key, default in UNSUPPORTED.items():
        if hf.get(key, default) != default:
            raise GPT2FormatError(f"GPT-2 config.json has {key}={hf[key]!r}; this model only implements "
                                  f"{key}={default!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise GPT2FormatError(f"GPT-2 config.json has activation_function={act!r}; supported: {sorted(ACTIVATIONS)}")
    n_pos = hf.get("n_positions", hf.get("n_ctx"))
    if n_pos is None:
        raise GPT2FormatError("GPT-2 config.json has neither n_positions nor n_ctx (the context length)")
    vocab = hf["vocab_size"]

    def token(name):
        v = hf.get(name)
        return v if isinstance(v, int) and isinstance(vocab, int) and 0 <= v < vocab else None

    try:
        return ModelConfig(
            vocab_size=vocab, d_model=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=n_pos, pos_encoding="learned",
            dropout=0.0, bias=True, norm="layernorm", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            activation=ACTIVATIONS[act], tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            bos_token_id=token("bos_token_id"), eos_token_id=token("eos_token_id"),
            pad_token_id=token("pad_token_id"))
    except (TypeError, ValueError) as e:
        raise GPT2FormatError(f"GPT-2 config.json describes an impossible model: {e}") from None


# ---- weights ---------------------------------------------------------------------------------

#: ``torch.load(weights_only=True)`` has published bypasses in older releases (CVE-2025-32434 up
#: to 2.5.1, CVE-2026-24747 before 2.10): a crafted ``.bin`` could run code while "only" tensors
#: are read.  Below this version ``.bin`` weights are refused; safetensors files are always fine.
MIN_TORCH_FOR_PICKLED_WEIGHTS = (2, 10)


class InsecureTorchError(RuntimeError):
    """This torch cannot read pickled (``.bin``) weights safely; the message says what to do."""


def check_torch_for_pickled_weights(file: Path, version: Optional[str] = None) -> None:
    """Refuse to unpickle ``file`` with a torch older than :data:`MIN_TORCH_FOR_PICKLED_WEIGHTS`."""
    version = str(torch.__version__ if version is None else version)
    parts = version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return  # an unparsable (development) version string: trust it
    if (major, minor) < MIN_TORCH_FOR_PICKLED_WEIGHTS:
        need = ".".join(map(str, MIN_TORCH_FOR_PICKLED_WEIGHTS))
        raise InsecureTorchError(
            f"refusing to read {str(file)!r} with torch {version}: torch.load(weights_only=True) can be made to "
            f"run code in torch < {need} (CVE-2025-32434, CVE-2026-24747); upgrade torch (pip install "
            f"'torch>={need}') or use the folder's model.safetensors (convert with safetensors.torch.save_file)")


def _load_file(file: Path) -> Dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(file), device="cpu")
        except Exception as e:  # header or sizes do not parse: truncated or not safetensors at all
            raise GPT2FormatError(f"{str(file)!r} is not a readable safetensors file: "
                                  f"{type(e).__name__}: {e}") from None
    check_torch_for_pickled_weights(file)
    try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as e:
        raise GPT2FormatError(f"{str(file)!r} is not a plain tensor state dict: {type(e).__name__}: {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise GPT2FormatError(f"{str(file)!r} does not hold a flat name -> tensor dict")
    return sd


def weight_files(path: PathLike, allow_pickle: bool = True) -> List[Path]:
    """The weight files of the Hugging Face folder ``path``, in reading order.

    The first of :data:`WEIGHT_FILES` present: one file, or the shards an ``*.index.json``
    names (its ``weight_map``: tensor name -> shard file).  With ``allow_pickle=False`` only
    safetensors are looked for, and a folder holding only ``pytorch_model.bin`` weights is
    refused with :class:`CheckpointFormatError` rather than unpickled.  Raises
    ``FileNotFoundError`` naming the files looked for (or a missing shard).
    """
    folder = Path(path)
    names = WEIGHT_FILES if allow_pickle else tuple(n for n in WEIGHT_FILES if "safetensors" in n)
    for name in names:
        file = folder / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise GPT2FormatError(f"{str(file)!r} is not a shard index with a weight_map ({e!r})") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"shard {shard!r} listed in {str(file)!r} is missing")
        return [folder / shard for shard in shards]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    pickled = [n for n in WEIGHT_FILES if "safetensors" not in n and n in present]
    if pickled and not allow_pickle:
        raise CheckpointFormatError(
            f"{str(folder)!r} holds only pickled weights ({pickled}); they are refused here (unpickling can run "
            f"code). Convert them to model.safetensors (safetensors.torch.save_file) or, for GPT-2, use "
            f"transformer.gpt2.load_gpt2_model")
    raise FileNotFoundError(f"no weights in {str(folder)!r}: looked for {list(names)}, found {present}"
                            + (" (TensorFlow/Flax weights are not supported)" if any(
                                p.endswith((".h5", ".msgpack")) for p in present) else ""))


def load_gpt2_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """The raw Hugging Face tensors (HF names) of the GPT-2 folder ``path``, on the CPU.

    Reads the first of :data:`WEIGHT_FILES` present; an ``*.index.json`` names the shards of a
    sharded checkpoint (see :func:`weight_files`).  Raises ``FileNotFoundError`` naming the
    files looked for.
    """
    sd: Dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        sd.update(_load_file(file))
    return sd


def _expected_shapes(c: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """HF key (no ``transformer.`` prefix) -> shape it must have for config ``c``."""
    d, ff = c.d_model, c.d_ff
    shapes = {"wte.weight": (c.vocab_size, d), "wpe.weight": (c.max_seq_len, d),
              "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(c.n_layers):
        p = f"h.{i}."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                       p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
                       p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
                       p + "mlp.c_fc.weight": (d, ff), p + "mlp.c_fc.bias": (ff,),
                       p + "mlp.c_proj.weight": (ff, d), p + "mlp.c_proj.bias": (d,)})
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


_RENAMES = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
            "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out"}
_TOP = {"wte.weight": "decoder.tok_emb.weight", "wpe.weight": "decoder.pos_emb.weight",
        "ln_f.weight": "decoder.norm_f.weight", "ln_f.bias": "decoder.norm_f.bias",
        "lm_head.weight": "decoder.lm_head.weight"}


def convert_gpt2_state_dict(hf_sd: Dict[str, torch.Tensor], config: ModelConfig,
                            dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Rename HF GPT-2 tensors into this project's ``state_dict`` names (Conv1D = our Linear layout).

    Accepts keys with or without the ``transformer.`` prefix.  Every expected key must be
    present with its expected shape; causal-mask buffers are skipped; anything else raises.
    With tied embeddings the returned dict has ``decoder.lm_head.weight`` sharing
    ``decoder.tok_emb.weight``'s tensor.  Cost: at most one copy per tensor (dtype change).

    Raises :class:`GPT2FormatError` naming missing keys, unexpected keys, or the key whose
    shape differs (expected vs found).
    """
    sd = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf_sd.items()}
    expected = _expected_shapes(config)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise GPT2FormatError(f"GPT-2 weights lack {len(missing)} key(s) for a {config.n_layers}-layer model, "
                              f"e.g. {missing[:5]} (with or without the 'transformer.' prefix)")
    unexpected = [k for k in sd if k not in expected and k != "lm_head.weight"
                  and not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        raise GPT2FormatError(f"GPT-2 weights have {len(unexpected)} unexpected key(s) for a "
                              f"{config.n_layers}-layer model, e.g. {unexpected[:5]}")
    if config.tie_embeddings and "lm_head.weight" in sd:  # a tied head saved twice: check, then ignore
        expected = {**expected, "lm_head.weight": (config.vocab_size, config.d_model)}
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise GPT2FormatError(f"GPT-2 weight {k!r} has shape {tuple(sd[k].shape)}; expected {shape} "
                                  f"from config.json (n_embd={config.d_model}, d_ff={config.d_ff}, "
                                  f"vocab_size={config.vocab_size}, n_positions={config.max_seq_len})")
    out: Dict[str, torch.Tensor] = {}
    for k in _expected_shapes(config):
        t = sd[k]
        if k.startswith("h."):
            _, i, rest = k.split(".", 2)
            module, param = rest.rsplit(".", 1)
            name = f"decoder.blocks.{i}.{_RENAMES[module]}.{param}"
        else:
            name = _TOP[k]
        out[name] = t.to(dtype).contiguous()
    if config.tie_embeddings:
        out["decoder.lm_head.weight"] = out["decoder.tok_emb.weight"]
    return out


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r}; expected a torch.dtype or one of {sorted(names)}")
    return names[dtype]


def load_gpt2_model(path: PathLike, device: Union[str, torch.device] = "cpu",
                    dtype: Union[torch.dtype, str] = torch.float32) -> DecoderOnlyTransformer:
    """Build a :class:`DecoderOnlyTransformer` from a Hugging Face GPT-2 folder.

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` / ``pytorch_model.bin``
            (or their sharded ``*.index.json`` forms), e.g. ``save_pretrained`` output.
        device: where the parameters live.
        dtype: parameter dtype (``torch.float32`` default; ``"bfloat16"`` etc. accepted).

    Returns the model in eval mode.  Its ``config`` is the translated :class:`ModelConfig`
    (see :func:`gpt2_model_config`), so caches, ``generate`` and speculative decoding work on
    it unchanged.  Cost: reads the weights once; the model is built on the ``meta`` device
    first, so no time or memory goes into random initial weights that would be overwritten.

    Raises ``FileNotFoundError`` (missing folder, config.json or weights) or
    :class:`GPT2FormatError` (not GPT-2, unsupported option, missing/unexpected key, wrong shape).
    """
    dtype = _resolve_dtype(dtype)
    config = gpt2_model_config(read_gpt2_config(path))
    state = convert_gpt2_state_dict(load_gpt2_state_dict(path), config, dtype)
    with torch.device("meta"):
        model = DecoderOnlyTransformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:  # assign=True gave the head its own Parameter object: tie again
        model.decoder.lm_head.weight = model.decoder.tok_emb.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors {left} were not loaded from {str(path)!r}")
    return model.to(device).eval()


# ---- tokenizer -------------------------------------------------------------------------------

class GPT2Tokenizer:
    """Text <-> ids with a GPT-2 byte-level BPE, read by the optional ``tokenizers`` package.

    Same interface as the project's tokenizers where it makes sense: ``encode(text,
    add_bos=False, add_eos=False) -> List[int]``, ``decode(ids) -> str`` (special tokens kept,
    so decoding is lossless), ``vocab_size``, ``bos_id``/``eos_id`` (GPT-2: ``<|endoftext|>``,
    or ``None`` if unknown), ``pad_id`` (``None``: GPT-2 has no padding token).
    """

    pad_id = None

    def __init__(self, tokenizer, source: str = "<memory>", eos_id: Optional[int] = None,
                 bos_id: Optional[int] = None):
        self._tok = tokenizer
        self.source = source
        endoftext = tokenizer.token_to_id("<|endoftext|>")
        self.eos_id = eos_id if eos_id is not None else endoftext
        self.bos_id = bos_id if bos_id is not None else endoftext

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> List[int]:
        """Ids for ``text``; optional BOS in front / EOS at the end (``ValueError`` if unknown)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        for flag, tid, name in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
            if flag and tid is None:
                raise ValueError(f"add_{name}=True but this tokenizer has no {name} token")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ``ids`` (list, tuple or 1-D tensor)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids contains {bad[0]}; expected ids in [0, vocab_size={self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, source={self.source})"


def load_gpt2_tokenizer(path: PathLike) -> Optional[GPT2Tokenizer]:
    """The tokenizer of the GPT-2 folder ``path``, or ``None`` if it cannot be read here.

    Reads ``tokenizer.json`` or, failing that, ``vocab.json`` + ``merges.txt`` (GPT-2's
    byte-level BPE) with the optional ``tokenizers`` package.  Returns ``None`` when that
    package is not installed or the folder has neither; callers then work with token ids
    (``generate.py --prompt-ids``).  Special ids come from ``config.json`` when present.
    """
    try:
        import tokenizers
    except ImportError:
        return None
    folder = Path(path)
    ids = {}
    if (folder / "config.json").is_file():
        try:
            hf = json.loads((folder / "config.json").read_text())
            ids = {k: hf.get(f"{k}_token_id") for k in ("eos", "bos")}
            ids = {k: v for k, v in ids.items() if isinstance(v, int)}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            pass
    if (folder / "tokenizer.json").is_file():
        try:
            tok, source = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")), "tokenizer.json"
        except Exception as e:  # e.g. this project's ByteTokenizer marker, which shares the name
            raise GPT2FormatError(f"{str(folder / 'tokenizer.json')!r} is not a Hugging Face `tokenizers` "
                                  f"file: {type(e).__name__}: {e}") from None
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers import decoders, models, pre_tokenizers
        tok = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        if tok.token_to_id("<|endoftext|>") is not None:  # matched whole in text, as HF does
            tok.add_special_tokens(["<|endoftext|>"])
        source = "vocab.json+merges.txt"
    else:
        return None
    ids = {k: v for k, v in ids.items() if v < tok.get_vocab_size(with_added_tokens=True)}
    return GPT2Tokenizer(tok, source=f"{str(folder)!r}/{source}", eos_id=ids.get("eos"), bos_id=ids.get("bos"))


def parse_prompt_ids(text: str, vocab_size: int) -> List[int]:
    """``"464 2068 7586"`` (spaces and/or commas) -> ``[464, 2068, 7586]``, each checked to lie in
    ``[0, vocab_size)``: the ``--prompt-ids`` of the CLIs, for models without a tokenizer here.

    Raises ``ValueError`` naming ``--prompt-ids``, the text and what was expected.
    """
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected space-separated integer token ids, "
                         f"e.g. \"464 2068 7586\"") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if not ids or bad:
        raise ValueError(f"--prompt-ids {text!r}: expected at least one id, all in [0, vocab_size={vocab_size}); "
                         f"got {bad or 'nothing'}")
    return ids


def load_gpt2(path: PathLike, device: Union[str, torch.device] = "cpu",
              dtype: Union[torch.dtype, str] = torch.float32) -> Tuple[DecoderOnlyTransformer, Optional[GPT2Tokenizer]]:
    """``(model, tokenizer or None)`` from a GPT-2 folder: what ``generate.py --gpt2 PATH`` needs.

    See :func:`load_gpt2_model` (arguments, errors) and :func:`load_gpt2_tokenizer`.
    """
    return load_gpt2_model(path, device, dtype), load_gpt2_tokenizer(path)
