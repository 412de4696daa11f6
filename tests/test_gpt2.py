"""GPT-2 loading: the same logits and greedy tokens as ``transformers``, clear errors, no pickle.

Small GPT-2 models with random weights are built with ``transformers`` (the reference), saved
to a temporary folder the way the Hugging Face libraries save them, and loaded with
:mod:`transformer.gpt2`, which does not use ``transformers``.  ``initializer_range`` is large so
that logits are far apart and greedy decoding has no near-ties that rounding could flip.
"""

import json
import pathlib
import re
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from transformer import DecoderOnlyTransformer  # noqa: E402
from transformer.gpt2 import (GPT2FormatError, InsecureTorchError, gpt2_model_config, load_gpt2,  # noqa: E402
                              load_gpt2_model, load_gpt2_state_dict, load_gpt2_tokenizer, parse_prompt_ids)

VOCAB, N_POS, PROMPT, NEW = 320, 128, 8, 100
SHAPES = {
    "2L-64w-4h-gelu_new": dict(n_layer=2, n_embd=64, n_head=4),
    "3L-96w-6h-relu-ninner-untied": dict(n_layer=3, n_embd=96, n_head=6, activation_function="relu",
                                         n_inner=80, tie_word_embeddings=False),
    "1L-32w-2h-gelu": dict(n_layer=1, n_embd=32, n_head=2, activation_function="gelu"),
}


def _hf_model(seed=0, **kw):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=N_POS, initializer_range=0.3,
                                  bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _save_legacy_bin(hf, folder: pathlib.Path) -> pathlib.Path:
    """``pytorch_model.bin`` in the layout of the original hub checkpoints: no ``transformer.``
    prefix, with the ``attn.bias``/``attn.masked_bias`` mask buffers, tied head omitted.

    (``transformers`` >= 5 ignores ``save_pretrained(safe_serialization=False)`` and always writes
    safetensors, so the pickle-zip format is written here with ``torch.save``.)"""
    folder.mkdir(parents=True)
    hf.config.save_pretrained(folder)
    sd = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """shape name -> (HF model, safetensors folder, pytorch_model.bin folder)."""
    root = tmp_path_factory.mktemp("gpt2")
    out = {}
    for name, kw in SHAPES.items():
        hf = _hf_model(**kw)
        hf.save_pretrained(root / name / "st", safe_serialization=True)
        out[name] = (hf, root / name / "st", _save_legacy_bin(hf, root / name / "bin"))
    return out


# ---- equivalence with transformers -------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["st", "bin"])
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_transformers(checkpoints, shape, fmt):
    hf, st, bin_ = checkpoints[shape]
    folder = st if fmt == "st" else bin_
    assert (folder / ("model.safetensors" if fmt == "st" else "pytorch_model.bin")).is_file()
    model = DecoderOnlyTransformer.from_pretrained_gpt2(folder)
    assert not model.training and model.decoder.lm_head.weight.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_100_tokens_match_transformers(checkpoints, shape):
    hf, st, _ = checkpoints[shape]
    model = load_gpt2_model(st)
    prompt = torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW,
                         min_new_tokens=NEW, pad_token_id=0)
    assert theirs.shape == (2, PROMPT + NEW)
    for cache in ("dynamic", "static"):
        ours = model.generate(prompt, NEW, cache_implementation=cache, eos_token_id=None)
        assert torch.equal(ours, theirs), f"{cache} cache diverges from transformers"


def test_loading_does_not_use_transformers(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    hf, st, bin_ = checkpoints["1L-32w-2h-gelu"]
    for folder in (st, bin_):
        with torch.no_grad():
            torch.testing.assert_close(load_gpt2(folder)[0](torch.arange(9)[None]), hf(torch.arange(9)[None]).logits,
                                       atol=1e-4, rtol=0)


def test_config_translation(checkpoints):
    c = load_gpt2_model(checkpoints["3L-96w-6h-relu-ninner-untied"][1]).config
    assert (c.n_layers, c.d_model, c.n_heads, c.d_ff, c.vocab_size, c.max_seq_len) == (3, 96, 6, 80, VOCAB, N_POS)
    assert (c.activation, c.tie_embeddings, c.pos_encoding, c.norm, c.bias) == ("relu", False, "learned",
                                                                                 "layernorm", True)
    base = dict(model_type="gpt2", n_layer=2, n_head=2, n_embd=8, vocab_size=300, n_ctx=64, n_inner=None,
                layer_norm_epsilon=1e-6, eos_token_id=50256, bos_token_id=7)
    c = gpt2_model_config(base)
    assert (c.max_seq_len, c.d_ff, c.norm_eps, c.activation, c.tie_embeddings) == (64, 32, 1e-6, "gelu_tanh", True)
    assert (c.eos_token_id, c.bos_token_id) == (None, 7)  # out-of-vocabulary ids are dropped
    for hf_name, ours in [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu"),
                          ("relu", "relu")]:
        assert gpt2_model_config({**base, "activation_function": hf_name}).activation == ours


def test_dtype_is_selectable_and_tie_survives(checkpoints):
    _, st, _ = checkpoints["2L-64w-4h-gelu_new"]
    model = load_gpt2_model(st, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.decoder.lm_head.weight is model.decoder.tok_emb.weight
    assert model.num_parameters() == sum(p.numel() for p in _hf_model(**SHAPES["2L-64w-4h-gelu_new"]).parameters())
    model.generate(torch.zeros(1, 3, dtype=torch.long), 5, eos_token_id=None)  # runs in bf16


def test_sharded_safetensors(tmp_path, checkpoints):
    hf = checkpoints["1L-32w-2h-gelu"][0]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ids = torch.arange(30)[None]
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2_model(tmp_path)(ids), hf(ids).logits, atol=1e-4, rtol=0)


# ---- errors -----------------------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path, checkpoints):
    """A fresh copy of a valid safetensors checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoints["1L-32w-2h-gelu"][1], dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    from safetensors.torch import load_file, save_file
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


def test_missing_folder_config_and_weights(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_gpt2_model(tmp_path / "nope")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt2_model(folder)
    _save_legacy_bin(_hf_model(**SHAPES["1L-32w-2h-gelu"]), tmp_path / "x")
    (tmp_path / "x" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights .*model\.safetensors.*pytorch_model\.bin"):
        load_gpt2_model(tmp_path / "x")


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="llama"), "model_type='llama'; expected 'gpt2'"),
    (dict(architectures=["LlamaForCausalLM"]), "architectures=.*LlamaForCausalLM"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (dict(reorder_and_upcast_attn=True), "reorder_and_upcast_attn=True"),
    (dict(scale_attn_weights=False), "scale_attn_weights=False"),
    (dict(add_cross_attention=True), "add_cross_attention=True"),
    (dict(activation_function="tanh"), "activation_function='tanh'"),
    (dict(n_head=5), "divisible by n_heads=5"),
])
def test_refuses_configs_it_cannot_run(folder, changes, match):
    _edit_config(folder, **changes)
    with pytest.raises(GPT2FormatError, match=match):
        load_gpt2_model(folder)


def test_missing_unexpected_and_misshapen_keys(folder):
    _edit_weights(folder, lambda sd: sd.pop("transformer.h.0.mlp.c_fc.bias"))
    with pytest.raises(GPT2FormatError, match=r"lack 1 key.*'h\.0\.mlp\.c_fc\.bias'"):
        load_gpt2_model(folder)
    _edit_weights(folder, lambda sd: sd.update({"transformer.h.0.mlp.c_fc.bias": torch.zeros(128),
                                                 "transformer.h.1.ln_1.weight": torch.ones(32)}))
    with pytest.raises(GPT2FormatError, match=r"unexpected key.*'h\.1\.ln_1\.weight'"):
        load_gpt2_model(folder)
    _edit_weights(folder, lambda sd: sd.pop("transformer.h.1.ln_1.weight"))
    _edit_config(folder, n_positions=64)  # config and weights disagree
    with pytest.raises(GPT2FormatError, match=r"'wpe\.weight' has shape \(128, 32\); expected \(64, 32\)"):
        load_gpt2_model(folder)
    _edit_config(folder, n_positions=N_POS, n_layer=2)
    with pytest.raises(GPT2FormatError, match="lack .* for a 2-layer model"):
        load_gpt2_model(folder)


def test_untied_checkpoint_needs_lm_head(tmp_path, checkpoints):
    dst = tmp_path / "untied"
    shutil.copytree(checkpoints["3L-96w-6h-relu-ninner-untied"][1], dst)
    _edit_weights(dst, lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(GPT2FormatError, match="lm_head.weight"):
        load_gpt2_model(dst)


class _Evil:
    """Unpickling this would create ``marker``: loading must refuse it instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_never_unpickles_objects(tmp_path, folder):
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": _Evil(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(GPT2FormatError, match="not a plain tensor state dict"):
        load_gpt2_state_dict(folder)
    assert not marker.exists()
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GPT2FormatError, match="not a readable safetensors file"):
        load_gpt2_model(folder)


@pytest.mark.parametrize("version", ["2.5.1", "2.5.1+cpu", "2.9.1"])
def test_bin_weights_are_refused_on_a_torch_with_weights_only_bypasses(checkpoints, monkeypatch, capsys, version):
    """torch.load(weights_only=True) has published bypasses before torch 2.10 (CVE-2025-32434,
    CVE-2026-24747): there ``.bin`` weights are refused (the API raises, the CLI prints one line)
    and safetensors still load."""
    hf, st, bin_ = checkpoints["1L-32w-2h-gelu"]
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.raises(InsecureTorchError, match=rf"torch {re.escape(version)}.*torch < 2\.10.*CVE-2025-32434.*"
                                                 rf"model\.safetensors"):
        load_gpt2_model(bin_)
    assert isinstance(load_gpt2_model(st), DecoderOnlyTransformer)
    import generate as gen_script
    assert gen_script.main(["--gpt2", str(bin_), "--prompt-ids", "1 2", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to read") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("version", ["2.10.0", "2.13.0+cpu", "2.11.0a0+git1234", "3.0.0"])
def test_bin_weights_load_on_a_current_torch(checkpoints, monkeypatch, version):
    hf, _, bin_ = checkpoints["1L-32w-2h-gelu"]
    monkeypatch.setattr(torch, "__version__", version)
    assert isinstance(load_gpt2_model(bin_), DecoderOnlyTransformer)


# ---- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_from_tokenizer_json_and_vocab_merges(tmp_path, checkpoints):
    tokenizers = pytest.importorskip("tokenizers")
    text = "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 20
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    a, b = tmp_path / "json", tmp_path / "vocab_merges"
    a.mkdir(), b.mkdir()
    bpe.save(str(a / "tokenizer.json"))
    bpe.save_model(str(b))
    toks = [load_gpt2_tokenizer(a), load_gpt2_tokenizer(b)]
    sample = "To be, or not to be? 'Tis nobler, é 🙂<|endoftext|>x"
    assert toks[0].encode(sample) == toks[1].encode(sample)
    for tok in toks:
        assert tok.vocab_size == 300 and tok.eos_id == tok.bos_id == 0
        assert tok.decode(tok.encode(sample, add_eos=True)) == sample + "<|endoftext|>"
        assert tok.encode("<|endoftext|>") == [0]
    ref = transformers.GPT2TokenizerFast.from_pretrained(str(b))  # a local folder: no download
    assert toks[1].encode(sample) == ref.encode(sample)

    # load_gpt2: model plus tokenizer when the folder has one, None otherwise
    dst = tmp_path / "with_tok"
    shutil.copytree(checkpoints["1L-32w-2h-gelu"][1], dst)
    assert load_gpt2(dst)[1] is None
    shutil.copy(a / "tokenizer.json", dst)
    model, tok = load_gpt2(dst)
    assert isinstance(model, DecoderOnlyTransformer) and tok.encode(sample) == toks[0].encode(sample)
    (dst / "tokenizer.json").write_text('{"type": "bytes", "offset": 4}')  # this project's ByteTokenizer marker
    with pytest.raises(GPT2FormatError, match="not a Hugging Face `tokenizers` file"):
        load_gpt2_tokenizer(dst)


def test_parse_prompt_ids():
    assert parse_prompt_ids("464 2068, 7586", 50257) == [464, 2068, 7586]
    for bad, match in [("1 x", "integer token ids"), ("", "at least one id"), ("5 300", r"vocab_size=300\); got \[300\]")]:
        with pytest.raises(ValueError, match=match):
            parse_prompt_ids(bad, 300)


# ---- the example ------------------------------------------------------------------------------

def test_speculative_example_demo_runs(capsys):
    import importlib.util
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gpt2_speculative.py"
    spec = importlib.util.spec_from_file_location("gpt2_speculative", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--demo", "--max-new-tokens", "12"]) == 0  # 0: identical to target.generate
    out = capsys.readouterr().out
    assert "speculative output identical to target.generate (greedy): True" in out and "accepted" in out
