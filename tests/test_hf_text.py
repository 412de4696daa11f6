"""Text in, text out for Hugging Face folders: the folder's tokenizer.json, its EOS ids and chat
template, ``generate.py --model PATH --prompt "text"`` (streaming, ``--chat``) and ``--serve``.

The folder is built here: a byte-level BPE trained in-process with ``tokenizers`` (special tokens
like Llama 3's, a post-processor that adds BOS), a small chat template, and a random-weight
Llama saved by ``transformers``.  The CLI's text must be ``transformers``' greedy text.
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

from transformer.hf_tokenizer import load_hf_tokenizer, stop_at_eos  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld ✓ naïve café", "To be, or not to be: "
          "that is the question.", "Whether 'tis nobler in the mind to suffer", "日本語のテキスト and emoji 🙂"] * 20


def save_tokenizer(folder: Path, chat_template=TEMPLATE) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
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


def test_cli_refusals_name_the_flag(folder, tmp_path):
    _, path = folder
    r = run_cli("--gpt2", str(path), "--model", str(path), "--prompt", "x")
    assert r.returncode != 0 and "--model" in r.stderr and "--gpt2" in r.stderr
    r = run_cli("--chat", "--prompt", "x")
    assert r.returncode != 0 and "--chat needs --model" in r.stderr
    plain = tmp_path / "plain"
    import shutil
    shutil.copytree(path, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = run_cli("--model", str(plain), "--prompt", "x", "--chat", "--max-new-tokens", "2")
    assert r.returncode == 2 and "no chat_template" in r.stderr
    (plain / "tokenizer.json").unlink()
    r = run_cli("--model", str(plain), "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode != 0 and "--prompt-ids" in r.stderr
    r = run_cli("--model", str(plain), "--prompt-ids", "5 6 7", "--max-new-tokens", "2", "--temperature", "0")
    assert r.returncode == 0 and len(r.stdout.split("\n")[0].split()) == 2


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
