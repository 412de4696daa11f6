"""Text in, text out for Hugging Face folders: the folder's tokenizer.json, its EOS ids and chat
template, ``generate.py --model PATH --prompt "text"`` (streaming, ``--chat``) and ``--serve``.

The folders are built here: a byte-level BPE trained in-process with ``tokenizers`` and a
random-weight model saved by ``transformers``.  A Llama folder has special tokens like Llama 3's,
a post-processor that adds BOS and a small chat template; a Qwen2 folder has no BOS, ChatML
turns, named chat templates and its EOS ids in generation_config.json.  The CLI's text must be
``transformers``' greedy text.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import generate as gen_script  # noqa: E402
from transformer.detokenizer import IncrementalDetokenizer  # noqa: E402
from transformer.hf_tokenizer import load_hf_tokenizer, stop_at_eos  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld ✓ naïve café", "To be, or not to be: "
          "that is the question.", "Whether 'tis nobler in the mind to suffer", "日本語のテキスト and emoji 🙂"] * 20


def train_bpe(specials=SPECIALS) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen style) trained on :data:`CORPUS` in ~0.1 s."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def save_tokenizer(folder: Path, chat_template=TEMPLATE) -> tokenizers.Tokenizer:
    """Llama 3 style: a post-processor that adds ``<|begin_of_text|>``; turns end with ``<|eot_id|>``."""
    from tokenizers import processors
    tok = train_bpe()
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(transformers model, folder): a random Llama whose vocabulary is the tokenizer's."""
    root = tmp_path_factory.mktemp("hf_text") / "llama"
    tok = save_tokenizer(root)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, initializer_range=0.2,
                                   bos_token_id=tok.token_to_id("<|begin_of_text|>"),
                                   eos_token_id=[tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")])
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(root)
    return hf, root


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    """(transformers model, folder): a random Qwen2 (q/k/v biases, no BOS at all), ChatML named
    templates in tokenizer_config.json, EOS ids in config.json (one) and generation_config.json
    (a list), as Qwen's own folders have them."""
    from tokenizers import processors
    root = tmp_path_factory.mktemp("hf_text") / "qwen2"
    tok = train_bpe(QWEN_SPECIALS)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "{{ 1/0 }}"}]}))
    end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, initializer_range=0.2, eos_token_id=end,
                                   tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    hf.save_pretrained(root)
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, end], "pad_token_id": end}))
    return hf, root


def hf_greedy_text(hf, tok, ids, n):
    """``transformers``' greedy continuation of ``ids``, stopped at the folder's EOS ids, as text."""
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, pad_token_id=0)
    new = stop_at_eos(out[0, len(ids):].tolist(), tok.eos_ids)
    return tok.decode(ids + new)


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "generate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


# ---- the tokenizer ------------------------------------------------------------------------------

def test_round_trip_bos_and_eos_ids(folder):
    tok = load_hf_tokenizer(folder[1])
    text = "héllo wörld ✓ 🙂 日本語"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == tok._tok.token_to_id("<|begin_of_text|>")  # the post-processor's BOS
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == text
    assert "<|begin_of_text|>" in tok.decode(ids, skip_special_tokens=False)
    eot, eot_doc = tok._tok.token_to_id("<|eot_id|>"), tok._tok.token_to_id("<|end_of_text|>")
    assert tok.eos_ids == [eot, eot_doc]  # tokenizer_config's eos_token first, then config.json's list
    assert stop_at_eos([5, 6, eot_doc, 7], tok.eos_ids) == [5, 6, eot_doc]
    with pytest.raises(ValueError, match="vocab_size"):
        tok.decode([tok.vocab_size])


def test_chat_template_renders_like_transformers(folder):
    tok = load_hf_tokenizer(folder[1])
    messages = [{"role": "user", "content": "Hi there"}]
    ours = tok.apply_chat_template(messages)
    assert ours == "<|begin_of_text|><|user|>Hi there<|eot_id|><|assistant|>"
    theirs = transformers.AutoTokenizer.from_pretrained(folder[1]).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs


def test_streaming_pieces_join_to_the_whole_text(folder):
    """Byte-level pieces of multi-byte characters are held back until whole."""
    import io
    sys.path.insert(0, str(ROOT))
    from generate import TextStreamer
    tok = load_hf_tokenizer(folder[1])
    ids = tok.encode("naïve café 🙂 日本語", add_special_tokens=False)
    out = io.StringIO()
    streamer = TextStreamer(tok, [], out=out)
    pieces = []
    for i in ids:
        before = out.getvalue()
        streamer(torch.tensor([i]))
        pieces.append(out.getvalue()[len(before):])
    assert "".join(pieces) == streamer.end() == "naïve café 🙂 日本語"
    assert all("\ufffd" not in p for p in pieces)


def test_missing_tokenizer_and_broken_files_are_refused(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizers"):
        load_hf_tokenizer(tmp_path)


def test_qwen_folder_no_bos_eos_from_every_file_named_templates(qwen_folder):
    hf_model, path = qwen_folder
    tok = load_hf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in ("To be, or not", "héllo wörld ✓", ""):
        assert tok.encode(text) == theirs.encode(text)  # no BOS: Qwen has none
    assert tok.bos_id is None and not tok.add_bos and tok.pad_id == tok._tok.token_to_id("<|endoftext|>")
    im_end, end = tok._tok.token_to_id("<|im_end|>"), tok._tok.token_to_id("<|endoftext|>")
    assert tok.eos_ids == [im_end, end]  # tokenizer_config, then generation_config's list (config.json's repeats)
    messages = [{"role": "user", "content": "Hi"}]
    ours = tok.apply_chat_template(messages)  # the template named "default" of the list
    assert ours == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert ours == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _folder_with(tmp_path, name, tokenizer_config, config=None, generation_config=None, post_bos=False):
    from tokenizers import processors
    tok = train_bpe()
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    folder = tmp_path / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    for file, data in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                       ("generation_config.json", generation_config)):
        if data is not None:
            (folder / file).write_text(json.dumps(data))
    return folder, tok


def test_eos_ids_are_read_from_each_file(tmp_path):
    _, tok = _folder_with(tmp_path, "probe", {})
    eot, end, user = (tok.token_to_id(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|user|>"))
    cases = [  # (tokenizer_config, config, generation_config) -> eos_ids
        ({"eos_token": "<|eot_id|>"}, None, None, [eot]),
        ({"eos_token": {"content": "<|eot_id|>", "special": True}}, None, None, [eot]),  # older files
        ({}, {"eos_token_id": end}, None, [end]),
        ({}, None, {"eos_token_id": [end, user]}, [end, user]),
        ({"eos_token": "<|eot_id|>"}, {"eos_token_id": [end, eot]}, {"eos_token_id": user}, [eot, user, end]),
        ({"eos_token": "<|not-in-vocab|>"}, {"eos_token_id": [10 ** 6, None]}, None, []),
    ]
    for k, (tc, c, gc, want) in enumerate(cases):
        folder, _ = _folder_with(tmp_path, f"eos{k}", tc, c, gc)
        loaded = load_hf_tokenizer(folder)
        assert loaded.eos_ids == want, (tc, c, gc)
        assert loaded.eos_id == (want[0] if want else None)


def test_bos_follows_the_post_processor_or_the_flag_never_twice(tmp_path):
    specs = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    folder, raw = _folder_with(tmp_path, "post", specs, post_bos=True)
    bos = raw.token_to_id("<|begin_of_text|>")
    tok, theirs = load_hf_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.add_bos and tok.encode("To be") == theirs.encode("To be") and tok.encode("To be")[0] == bos
    assert tok.encode("<|begin_of_text|>To be") == tok.encode("To be")  # transformers would give two BOS
    assert tok.encode("To be", add_special_tokens=False) == tok.encode("To be")[1:]
    assert tok.encode("To be", add_bos=False) == tok.encode("To be")[1:]
    assert tok.encode("To be", add_eos=True)[-1] == tok.eos_id == raw.token_to_id("<|eot_id|>")
    folder, _ = _folder_with(tmp_path, "flag", {**specs, "add_bos_token": True})  # no BOS in the post-processor
    tok = load_hf_tokenizer(folder)
    plain = raw.encode("To be", add_special_tokens=False).ids
    assert tok.add_bos and tok.encode("To be") == [bos] + plain
    assert tok.encode("<|begin_of_text|>To be") == [bos] + plain
    assert tok.encode("To be", add_special_tokens=False) == plain
    folder, _ = _folder_with(tmp_path, "none", specs)
    tok = load_hf_tokenizer(folder)
    assert not tok.add_bos and tok.encode("To be") == plain
    assert tok.encode("To be", add_bos=True) == [bos] + plain


def test_chat_template_sources_and_helpers(tmp_path):
    jinja_only = "{% for m in messages %}[{{ m.role }}]{{ m.content | tojson }}{% endfor %}{{ eos_token }}"
    folder, _ = _folder_with(tmp_path, "jinja", {"eos_token": "<|eot_id|>"})
    (folder / "chat_template.jinja").write_text(jinja_only)  # transformers >= 4.50 saves the template here
    tok = load_hf_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "naïve ✓"}]) == '[user]"naïve ✓"<|eot_id|>'
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
              "{{ strftime_now('%Y') }}")
    folder, _ = _folder_with(tmp_path, "strict", {"chat_template": strict})
    tok = load_hf_tokenizer(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).isdigit()
    with pytest.raises(ValueError, match="first message must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    folder, _ = _folder_with(tmp_path, "escape", {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(Exception, match="unsafe|access"):  # the sandbox refuses Python internals
        load_hf_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}])
    folder, _ = _folder_with(tmp_path, "plain", {})
    with pytest.raises(ValueError, match="--chat.*no chat_template"):
        load_hf_tokenizer(folder).apply_chat_template([{"role": "user", "content": "x"}])


class _CountingTokenizer:
    """Wraps a tokenizer and records the length of every decode (to check the window)."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


def _metaspace_tokenizer():
    """SentencePiece-style (Llama 2, Mistral): ▁ for spaces, byte fallback (``<0xF0>``...) for
    characters outside the vocabulary, a decoder that strips the first space -- so a window that
    starts mid-text decodes differently from the whole text.  Built by hand: characters of
    CORPUS[:4] plus a few merges."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers
    chars = sorted(set("".join(CORPUS[:4]).replace(" ", "▁")) | {"▁"})
    merges = [("▁", "t"), ("▁t", "o"), ("▁", "b"), ("▁b", "e"), ("h", "e"), ("▁", "n"), ("▁n", "o")]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + [a + b for a, b in merges]
    tok = tokenizers.Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, merges, byte_fallback=True,
                                          unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_incremental_detokenizer_pieces_join_to_the_decode(kind):
    raw = train_bpe() if kind == "byte_level" else _metaspace_tokenizer()
    text = "To be, or not 🙂 日本語 naïve café ✓ — whether 'tis nobler " * 8
    ids = raw.encode(text, add_special_tokens=False).ids
    assert len(ids) > 150
    counting = _CountingTokenizer(raw)
    prompt = ids[:7]
    detok = IncrementalDetokenizer(counting, prompt)
    pieces = [detok.add([i]) for i in ids[7:]]
    pieces.append(detok.finish())
    assert "".join(pieces) == raw.decode(ids)[len(raw.decode(prompt)):]
    assert not any("\ufffd" in p for p in pieces)
    # Each decode covers the last piece's ids plus the ids held back (one character's bytes):
    # bounded, not growing with the text, so O(1) per token.
    assert max(counting.lengths) <= 8 < len(ids) / 20
    for cut in range(1, 40):  # prompts of every length, decodes starting inside characters included
        prompt, whole = ids[:cut], raw.decode(ids[:cut + 40])
        if raw.decode(prompt).endswith("\ufffd") or whole.endswith("\ufffd"):
            continue  # a prompt or a stream cut inside a character (see the next test for those)
        detok = IncrementalDetokenizer(raw, prompt, window=3)
        got = "".join(detok.add([i]) for i in ids[cut:cut + 40]) + detok.finish()
        assert got == whole[len(raw.decode(prompt)):], cut


def test_incremental_detokenizer_holds_back_half_a_character_and_flushes_it(folder):
    tok = load_hf_tokenizer(folder[1])
    ids = tok.encode("a🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    emitted = [detok.add([i]) for i in ids[:-1]]  # the emoji's last byte is missing
    assert "".join(emitted) == "a" and detok.finish() == "\ufffd"
    detok = IncrementalDetokenizer(tok, [tok.bos_id])
    assert detok.add([tok.eos_id]) == "" and detok.add(ids) == "a🙂"  # special tokens print nothing
    with pytest.raises(ValueError, match="window"):
        IncrementalDetokenizer(tok, window=0)


# ---- generate.py --model -------------------------------------------------------------------------

def test_cli_text_in_text_out_equals_transformers_greedy(folder):
    hf, path = folder
    tok = load_hf_tokenizer(path)
    prompt = "To be, or not"
    r = run_cli("--model", str(path), "--prompt", prompt, "--max-new-tokens", "24", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    expected = hf_greedy_text(hf, tok, tok.encode(prompt), 24)
    assert r.stdout in (expected, expected + "\n")
    assert r.stdout.startswith(prompt)


def test_cli_chat_uses_the_template(folder):
    hf, path = folder
    tok = load_hf_tokenizer(path)
    r = run_cli("--model", str(path), "--prompt", "Hi", "--chat", "--max-new-tokens", "16", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    expected = hf_greedy_text(hf, tok, ids, 16)
    assert r.stdout in (expected, expected + "\n")


def _main(capsys, *argv):
    """generate.py's main() in-process (milliseconds instead of a new interpreter)."""
    code = gen_script.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_qwen_folder_text_and_chat_equal_transformers_greedy(qwen_folder, capsys):
    """No BOS, ChatML, EOS ids from generation_config.json; every cache kind that keeps all tokens."""
    hf, path = qwen_folder
    tok = load_hf_tokenizer(path)
    prompt = "héllo wörld ✓"
    expected = hf_greedy_text(hf, tok, tok.encode(prompt), 20)
    for cache in ("dynamic", "static", "quantized"):
        code, out, err = _main(capsys, "--model", path, "--prompt", prompt, "--max-new-tokens", 20,
                               "--temperature", 0, "--cache", cache, "--kv-residual", 64)
        assert code == 0, err
        assert out in (expected, expected + "\n"), cache
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    code, out, err = _main(capsys, "--model", path, "--prompt", "Hi", "--chat", "--max-new-tokens", 12,
                           "--temperature", 0, "--dtype", "float32", "--device", "cpu")
    assert code == 0, err
    expected = hf_greedy_text(hf, tok, ids, 12)
    assert out in (expected, expected + "\n") and out.startswith("user\nHi\nassistant\n")


def test_cli_sampling_is_seeded(folder, capsys):
    path = folder[1]
    runs = [_main(capsys, "--model", path, "--prompt", "To be", "--max-new-tokens", 10, "--temperature", 1.0,
                  "--top-k", 50, "--top-p", 0.9, "--seed", seed)[1] for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0].startswith("To be")


def test_cli_refusals_name_the_flag(folder, tmp_path, capsys):
    _, path = folder
    code, _, err = _main(capsys, "--gpt2", path, "--model", path, "--prompt", "x")
    assert code != 0 and "--model" in err and "--gpt2" in err
    code, _, err = _main(capsys, "--chat", "--prompt", "x")
    assert code != 0 and "--chat needs --model" in err
    code, _, err = _main(capsys, "--model", path, "--chat", "--serve")
    assert code != 0 and "--chat with --serve" in err
    code, _, err = _main(capsys, "--model", path, "--chat", "--prompt-ids", "5 6")
    assert code != 0 and "--chat" in err and "--prompt-ids '5 6'" in err
    code, _, err = _main(capsys, "--model", path, "--prompt", "x", "--prompt-ids", "5 6")
    assert code != 0 and "--prompt 'x'" in err and "--prompt-ids '5 6'" in err
    code, _, err = _main(capsys, "--model", tmp_path / "nowhere", "--prompt", "x")
    assert code != 0 and f"--model {tmp_path / 'nowhere'}" in err and "expected a folder" in err
    with pytest.raises(SystemExit):
        _main(capsys, "--model", path, "--prompt", "x", "--top-p", "2")
    assert "--top-p" in capsys.readouterr().err
    plain = tmp_path / "plain"
    import shutil
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    code, _, err = _main(capsys, "--model", plain, "--prompt", "x", "--chat", "--max-new-tokens", 2)
    assert code == 2 and "--chat" in err and "no chat_template" in err and str(plain) in err
    (plain / "tokenizer.json").unlink()
    code, _, err = _main(capsys, "--model", plain, "--prompt", "x", "--max-new-tokens", 2)
    assert code == 2 and f"--model {plain}" in err and "no tokenizer.json" in err and "--prompt-ids" in err
    code, out, err = _main(capsys, "--model", plain, "--prompt-ids", "5 6 7", "--max-new-tokens", 2,
                           "--temperature", 0)
    assert code == 0 and len(out.split("\n")[0].split()) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_the_folder_with_its_tokenizer(folder):
    """``generate.py --serve --model PATH``: a text prompt in, transformers' greedy text out."""
    import urllib.error
    import urllib.request
    hf, path = folder
    tok = load_hf_tokenizer(path)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "generate.py", "--serve", "--model", str(path), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.3)
        body = json.dumps({"prompt": "To be", "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            reply = json.loads(r.read())
        ids = tok.encode("To be")
        expected = hf_greedy_text(hf, tok, ids, 12)[len(tok.decode(ids)):]
        assert reply["choices"][0]["text"] == expected
        # The same request streamed (server-sent events): the pieces join to the same text.
        body = json.dumps({"prompt": "To be", "max_tokens": 12, "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        pieces = []
        with urllib.request.urlopen(req, timeout=30) as r:
            for line in r.read().decode("utf-8").splitlines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.append(json.loads(line[len("data: "):])["choices"][0]["text"])
        assert "".join(pieces) == expected and len(pieces) > 1  # (random weights: invalid UTF-8 decodes to U+FFFD)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_generation_path_stops_at_any_of_several_eos_ids(folder):
    """Llama 3 style: a list of EOS ids; each path stops right after the first one produced."""
    from spec_decoding import speculative_generate
    from transformer.engine import LLMEngine, SamplingParams
    from transformer.hf_models import load_pretrained
    model = load_pretrained(folder[1])
    prompt = torch.tensor([load_hf_tokenizer(folder[1]).encode("To be, or not")])
    free = model.generate(prompt, 30, eos_token_id=None)[0, prompt.shape[1]:].tolist()
    a, b = free[5], free[9]  # two ids the greedy run produces: stop at whichever comes first
    stop = min(free.index(a), free.index(b)) + 1
    want = free[:stop]
    for kw in ({}, {"fast": True}):
        out = model.generate(prompt, 30, eos_token_id=[b, a], **kw)[0, prompt.shape[1]:].tolist()
        assert out == want, kw
    tokens, _ = speculative_generate(model, model, prompt, 30, eos_token_id=[b, a], num_draft_tokens=3)
    assert tokens[0, prompt.shape[1]:].tolist() == want
    engine = LLMEngine(model, num_blocks=32, block_size=8, eos_token_id=[b, a])
    assert engine.generate([prompt[0].tolist()], SamplingParams(max_tokens=30))[0] == want
    with pytest.raises(ValueError, match="eos_token_id must be None or an int token id or a non-empty list"):
        model.generate(prompt, 3, eos_token_id=[])


def test_cli_empty_prompt_starts_from_eos_or_is_refused(folder, tmp_path, capsys):
    """An empty --prompt starts the model from an EOS token ("a document just ended"); a folder whose
    tokenizer has neither BOS nor EOS has nothing to start from and is refused naming --prompt."""
    hf, path = folder
    bare, _ = _folder_with(tmp_path, "bare", {})  # no BOS post-processor, no special tokens named
    import shutil
    shutil.copy(path / "model.safetensors", bare / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("eos_token_id"), cfg.pop("bos_token_id")
    (bare / "config.json").write_text(json.dumps(cfg))
    code, _, err = _main(capsys, "--model", bare, "--prompt", "", "--max-new-tokens", 2, "--temperature", 0)
    assert code == 2 and "--prompt" in err and "no BOS or EOS" in err
    (bare / "generation_config.json").write_text(json.dumps({"eos_token_id": hf.config.eos_token_id}))
    code, out, err = _main(capsys, "--model", bare, "--prompt", "", "--max-new-tokens", 3, "--temperature", 0)
    assert code == 0, err
    assert out.strip() != ""
