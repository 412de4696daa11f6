"""Llama-family checkpoints (llama, mistral, qwen2, qwen3) and GPT-2 loaded from local Hugging
Face folders run exactly as ``transformers`` runs them, through every path of this project.

Each model type is built with random weights by ``transformers`` itself and saved with
``save_pretrained`` (safetensors), so the folders are what a user downloads; the loader reads
them without ``transformers``.  The shapes are small but exercise what differs between the
families: grouped-query attention, Llama 3's RoPE scaling, an untied head, Qwen2's q/k/v biases,
Qwen3's per-head q/k norms and a ``head_dim`` that is not ``hidden_size / heads``.
"""

import copy
import json
import sys
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kv_cache import AdvancedKVCache, CacheConfig, PagedCacheView  # noqa: E402
from transformer import DecoderOnlyTransformer, generate  # noqa: E402
from transformer import hf_models  # noqa: E402
from transformer.engine import LLMEngine, SamplingParams  # noqa: E402
from transformer.fast_decode import FastDecoder  # noqa: E402
from transformer.gpt2 import CheckpointFormatError  # noqa: E402
from transformer.hf_models import SUPPORTED_MODEL_TYPES, hf_model_config, load_pretrained  # noqa: E402

VOCAB, PROMPT, NEW = 101, 12, 100
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
               eos_token_id=2)
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 32}
#: model type -> (transformers config class, model class, settings beyond the common ones)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=_LLAMA3, rope_theta=50000.0,
                                                      tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def hf_model(kind: str, seed: int = 0, **changes):
    """A random-weight ``transformers`` model of family ``kind`` (float32, eval mode)."""
    cfg_cls, model_cls, extra = FAMILIES[kind]
    kw = copy.deepcopy(dict(_COMMON, **extra, **changes))  # transformers may edit the dicts it is given
    if kind == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "num_key_value_heads",
                                                       "max_position_embeddings")}
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """model type -> (transformers model, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for kind in FAMILIES:
        hf = hf_model(kind)
        hf.save_pretrained(root / kind)
        out[kind] = (hf, root / kind)
    return out


def _prompts(n=2, seed=2):
    return torch.randint(3, VOCAB, (n, PROMPT), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(hf, prompt):
    """``transformers``' own greedy continuation of ``prompt`` ``(B, P)``: ``NEW`` tokens, no early stop."""
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW,
                      min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
    assert out.shape == (prompt.shape[0], PROMPT + NEW)
    return out


@pytest.fixture(scope="module")
def greedy(folders):
    """model type -> (prompt, transformers' greedy output)."""
    out = {}
    for kind, (hf, _) in folders.items():
        prompt = _prompts()
        out[kind] = (prompt, _hf_greedy(hf, prompt))
    return out


# ---- the model: logits and greedy tokens ---------------------------------------------------------

@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_transformers(folders, kind):
    hf, folder = folders[kind]
    model = DecoderOnlyTransformer.from_pretrained(folder)
    assert not model.training and model.config.mlp == ("standard" if kind == "gpt2" else "gated")
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.std() > 0.5  # not a degenerate model whose logits would match anything
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_100_greedy_tokens_match_transformers_through_every_exact_cache(folders, greedy, kind):
    """dynamic and static caches, and the long-context caches configured to keep every token
    (a window covering the whole run), and the paged pool: all give ``transformers``' tokens."""
    model = load_pretrained(folders[kind][1])
    prompt, theirs = greedy[kind]
    total = PROMPT + NEW
    runs = {"dynamic": {}, "static": {},
            "sliding_window": dict(cache_config={"window": total}),
            "sinks": dict(cache_config={"num_sink_tokens": 4, "window": total})}
    for cache, kw in runs.items():
        ours = generate(model, prompt, NEW, cache_implementation=cache, eos_token_id=None, **kw)
        assert torch.equal(ours, theirs), f"{kind}: the {cache} cache diverges from transformers"
    c = model.config
    manager = AdvancedKVCache(CacheConfig(
        max_batch_size=4, max_sequence_length=c.max_seq_len, embed_dim=c.d_model, num_heads=c.n_heads,
        num_kv_heads=c.n_kv_heads, head_dim=c.head_dim, num_layers=c.n_layers, block_size=8, memory_limit_mb=4))
    with PagedCacheView(manager, ["a", "b"]) as view:
        ours = generate(model, prompt, NEW, cache_implementation=view, eos_token_id=None)
    assert torch.equal(ours, theirs), f"{kind}: the paged pool diverges from transformers"
    manager.check_invariants()


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_quantized_cache_stays_within_quantisation_error(folders, kind):
    """The 8-bit quantized cache is lossy by design: its logits stay within a small fraction of
    the logit spread of the exact ones, and its greedy tokens mostly agree."""
    model = load_pretrained(folders[kind][1])
    prompt = _prompts()
    exact = generate(model, prompt, 40, eos_token_id=None, output_logits=True)
    ids = exact.sequences
    with torch.no_grad():  # teacher-forced: both caches see the same tokens
        ref = model(ids)
        cache = hf_models_cache(model, "quantized")
        model(ids[:, :PROMPT], cache=cache)
        steps = [model(ids[:, i:i + 1], cache=cache)[:, -1] for i in range(PROMPT, ids.shape[1])]
    err = (torch.stack(steps, 1) - ref[:, PROMPT:]).abs()
    assert err.max() < 0.05 * ref.std(), f"8-bit cache logit error {err.max():.3g} vs logit std {ref.std():.3g}"
    quant = generate(model, prompt, 40, cache_implementation="quantized", eos_token_id=None)
    assert (quant[:, PROMPT:] == ids[:, PROMPT:]).float().mean() > 0.5


def hf_models_cache(model, kind):
    from transformer.generation import make_cache
    return make_cache(model.config, kind, 2, None, like=model.decoder.lm_head.weight)


# ---- the fast path, speculative decoding and the serving engine ----------------------------------

@pytest.mark.parametrize("kind", FAMILIES)
def test_fast_path_matches_transformers(folders, greedy, kind):
    model = load_pretrained(folders[kind][1])
    prompt, theirs = greedy[kind]
    fast = FastDecoder(model, batch_size=2, max_cache_len=PROMPT + NEW)
    assert torch.equal(fast.generate(prompt, NEW), theirs), f"{kind}: the fast path diverges"


def test_compiled_fast_path_matches_transformers(folders, greedy):
    """``torch.compile`` (fullgraph) of a block with every Llama-family option on: GQA, a gated
    MLP, q/k norms, a head_dim that is not d_model / heads (Qwen3)."""
    model = load_pretrained(folders["qwen3"][1])
    prompt, theirs = greedy["qwen3"]
    ours = generate(model, prompt, NEW, eos_token_id=None, fast=True, compile=True)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("target, draft", [("llama", "qwen2"), ("qwen3", "mistral")])
def test_speculative_decoding_keeps_the_target_greedy_tokens(folders, greedy, target, draft):
    from spec_decoding import speculative_generate
    big, small = load_pretrained(folders[target][1]), load_pretrained(folders[draft][1])
    prompt, theirs = greedy[target]
    tokens, stats = speculative_generate(big, small, prompt[:1], NEW, num_draft_tokens=4, eos_token_id=None)
    assert torch.equal(tokens[0], theirs[0]), f"{target} drafted by {draft} diverges"
    assert stats.generated_tokens == NEW and stats.target_forward_passes < NEW  # rounds took several tokens


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_serving_engine_matches_transformers(folders, kind):
    """Ragged prompts, continuous batching over the paged pool, prompt chunks: each request's
    100 greedy tokens are ``transformers``' for that prompt alone."""
    hf, folder = folders[kind]
    model = load_pretrained(folder)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (5, 17, 30)]
    engine = LLMEngine(model, num_blocks=64, block_size=8, max_num_seqs=3, max_num_batched_tokens=24)
    outs = engine.generate([p.tolist() for p in prompts], SamplingParams(max_tokens=NEW, ignore_eos=True))
    for p, out in zip(prompts, outs):
        theirs = hf.generate(p[None], attention_mask=torch.ones_like(p[None]), do_sample=False, max_new_tokens=NEW,
                             min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)
        assert out == theirs[0, len(p):].tolist()
    engine.check_invariants()


# ---- loading: what is read, what is refused -----------------------------------------------------

def test_config_translation(folders):
    c = load_pretrained(folders["qwen3"][1]).config
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff) == (64, 4, 2, 24, 96)
    assert c.qk_norm and c.mlp == "gated" and c.activation == "silu" and c.norm == "rmsnorm" and c.tie_embeddings
    c = load_pretrained(folders["llama"][1]).config
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_theta == 50000.0 and not c.tie_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    c = load_pretrained(folders["qwen2"][1]).config
    assert c.attention_bias and not c.bias


def test_llama3_rope_scaling_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformer.layers import rope_frequencies
    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_scaling=dict(_LLAMA3),
                                   rope_theta=500000.0)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_frequencies(128, 500000.0, _LLAMA3)
    torch.testing.assert_close(ours, theirs.float(), atol=0, rtol=1e-6)
    assert not torch.equal(ours, rope_frequencies(128, 500000.0))  # the rule changed something


def test_sharded_folder_is_read_one_shard_at_a_time(folders, tmp_path, monkeypatch):
    """A ``model.safetensors.index.json`` folder loads to the same logits, and each shard's
    tensors are freed before the next shard is read (peak: the model plus one shard)."""
    hf, _ = folders["llama"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(shards)) >= 3
    alive = []  # weak references to the tensors of shards already read
    real = hf_models._load_file

    def load_and_watch(file):
        assert all(r() is None for r in alive), "a previous shard is still in memory"
        sd = real(file)
        alive.extend(weakref.ref(t) for t in sd.values())
        return sd

    monkeypatch.setattr(hf_models, "_load_file", load_and_watch)
    model = load_pretrained(tmp_path)
    ids = _prompts()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_dtype_and_device_are_the_callers(folders):
    model = load_pretrained(folders["qwen2"][1], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.decoder.rotary.inv_freq.dtype == torch.float32  # RoPE angles stay float32
    assert model.decoder.lm_head.weight is model.decoder.tok_emb.weight  # tied after to_empty
    out = generate(model, _prompts(1), 5, eos_token_id=None)
    assert out.shape == (1, PROMPT + 5)


def test_loading_does_not_import_transformers(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now fails
    for kind in FAMILIES:
        assert isinstance(load_pretrained(folders[kind][1]), DecoderOnlyTransformer)


def _copy(folder, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type_is_refused_by_name(folders, tmp_path):
    folder = _copy(folders["llama"][1], tmp_path)
    _edit_config(folder, model_type="phi3")
    with pytest.raises(ValueError, match=r"model_type='phi3'.*'llama', 'mistral', 'qwen2', 'qwen3'"):
        load_pretrained(folder)
    assert set(SUPPORTED_MODEL_TYPES) == {"gpt2", "llama", "mistral", "qwen2", "qwen3"}


@pytest.mark.parametrize("changes, match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling.*yarn|rope_type"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(hidden_act="tanh"), "hidden_act='tanh'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(num_key_value_heads=3), "n_kv_heads"),
])
def test_settings_it_cannot_run_are_refused(folders, tmp_path, changes, match):
    folder = _copy(folders["llama"][1], tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointFormatError, match=match):
        load_pretrained(folder)


def test_qwen_with_a_window_on_some_layers_only_is_refused():
    hf = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
              vocab_size=VOCAB, max_position_embeddings=256, sliding_window=16, use_sliding_window=True,
              max_window_layers=1)
    with pytest.raises(CheckpointFormatError, match="layer_types"):
        hf_model_config(hf)
    assert hf_model_config(dict(hf, max_window_layers=0)).sliding_window == 16


def test_missing_misshapen_and_unexpected_tensors_are_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _copy(folders["mistral"][1], tmp_path)
    file = folder / "model.safetensors"
    original = load_file(file)
    sd = dict(original)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, file)
    with pytest.raises(CheckpointFormatError, match=r"lack 1 key.*up_proj"):
        load_pretrained(folder)
    sd = dict(original, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 64)})
    save_file(sd, file)
    with pytest.raises(CheckpointFormatError, match=r"k_proj.weight.*shape \(8, 64\); expected \(32, 64\)"):
        load_pretrained(folder)
    save_file(dict(original, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}), file)
    with pytest.raises(CheckpointFormatError, match=r"unexpected.*layers\.2"):
        load_pretrained(folder)


def test_pickled_weights_are_refused_not_unpickled(folders, tmp_path):
    folder = _copy(folders["qwen2"][1], tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="pickled weights.*safetensors"):
        load_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_loaded_model_saves_and_reloads_as_this_projects_checkpoint(folders, tmp_path, kind):
    """Every new config field (gated MLP, head_dim, q/k norms, RoPE scaling) survives the
    project's own checkpoint format, so ``generate.py --checkpoint`` runs a converted model."""
    from transformer.checkpoint import load_model, save_model
    model = load_pretrained(folders[kind][1])
    save_model(tmp_path / "ck", model)
    again, _, _ = load_model(tmp_path / "ck")
    assert again.config == model.config
    ids = _prompts()
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
