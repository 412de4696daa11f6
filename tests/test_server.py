"""The OpenAI-compatible server, tested as a user meets it: a real server process on
127.0.0.1 (started and stopped here), the official ``openai`` client and plain HTTP.

Every completed request's text must equal what ``generate()`` gives that prompt alone at
temperature 0; after a load test with disconnects and a memory budget that forces preemption,
no KV block may be leaked.  Requests are bounded in number and time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from helpers import scaled_init
from transformer import DecoderOnlyTransformer, ModelConfig
from transformer.checkpoint import save_model
from transformer.tokenizer import ByteTokenizer


ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny byte-level model with its tokenizer, saved as train.py would."""
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    model = scaled_init(DecoderOnlyTransformer(ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4,
                                                           n_kv_heads=2, max_seq_len=96, pos_encoding="rope")))
    tok = ByteTokenizer().save(d / "tok")
    save_model(d / "ck", model, extra_files={"tokenizer.json": tok})
    return d / "ck", model, ByteTokenizer()


class Server:
    """``python -m transformer.engine.server`` in a subprocess, stopped on exit."""

    def __init__(self, ckpt, *flags, entry=("-m", "transformer.engine.server")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, *entry, "--checkpoint", str(ckpt),
                                      "--port", str(self.port), *flags], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + TIMEOUT
        while True:
            try:
                if json.loads(urllib.request.urlopen(self.url + "/health", timeout=2).read())["status"] == "ok":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {self.proc.stdout.read()}")
            time.sleep(0.2)

    def post(self, path, body, raw=False):
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=TIMEOUT) as r:
            return r.read().decode()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint[0], "--num-blocks", "40", "--block-size", "4", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "64")
    yield s
    s.stop()


def expected_text(model, tok, prompt: str, n: int) -> str:
    ids = tok.encode(prompt)
    out = model.generate(torch.tensor([ids]), n, eos_token_id=None)[0, len(ids):].tolist()
    return tok.decode(out)


def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def test_openai_client_completions_match_generate(server, checkpoint):
    _, model, tok = checkpoint
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["kvcache-model"]
    r = c.completions.create(model="kvcache-model", prompt="To be, or", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected_text(model, tok, "To be, or", 12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    pieces = [ch.choices[0].text for ch in c.completions.create(model="kvcache-model", prompt="To be, or",
                                                               max_tokens=12, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == r.choices[0].text
    r2 = c.completions.create(model="kvcache-model", prompt="ab", max_tokens=5, temperature=0.9, seed=3, n=2)
    assert [ch.index for ch in r2.choices] == [0, 1]
    again = c.completions.create(model="kvcache-model", prompt="ab", max_tokens=5, temperature=0.9, seed=3, n=2)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r2.choices]  # seeded: reproducible


def test_plain_http_token_ids_stop_strings_and_endpoints(server, checkpoint):
    _, model, tok = checkpoint
    ids = tok.encode("Hello")
    status, body = server.post("/v1/completions", {"prompt": ids, "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == expected_text(model, tok, "Hello", 8)
    full = body["choices"][0]["text"]
    k = next(k for k in range(1, len(full) - 1) if full.find(full[k:k + 2]) == k)  # a stop string seen first at k
    status, body = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 8, "temperature": 0,
                                                   "stop": [full[k:k + 2]]})
    assert body["choices"][0]["text"] == full[:k] and body["choices"][0]["finish_reason"] == "stop"
    assert json.loads(server.get("/health"))["status"] == "ok"
    metrics = server.get("/metrics")
    for name in ("requests_running", "requests_waiting", "kv_blocks_used", "kv_blocks_free", "prefix_cache_hit_rate",
                 "preemptions_total", "generation_tokens_per_second"):
        assert f"\nkvcache_{name} " in "\n" + metrics


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "gpt-5", "prompt": "a"}, 404, "model"),
    ({"prompt": "a", "max_tokens": 500}, 400, "max_tokens"),
    ({"prompt": "a" * 200}, 400, "prompt"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": [1, 999]}, 400, "prompt"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a", "n": 0}, 400, "n"),
])
def test_bad_input_gets_an_openai_style_error_naming_the_field(server, body, status, param):
    got, err = server.post("/v1/completions", body, raw=isinstance(body, bytes))
    assert got == status and set(err["error"]) >= {"message", "type", "param"}
    assert err["error"]["param"] == param


def test_load_with_disconnects_and_preemption_leaks_nothing(server, checkpoint):
    """16 concurrent streaming clients on a 40-block pool (each needs up to 10 blocks), a
    quarter of them hanging up after two chunks; every finished text equals generate()'s."""
    _, model, tok = checkpoint
    prompts = [f"Line {i}: " + "ab" * (i % 5) for i in range(16)]
    results, errors = {}, []

    def one(i):
        try:
            c = client(server)
            stream = c.completions.create(model="kvcache-model", prompt=prompts[i], max_tokens=24, temperature=0,
                                          stream=True)
            text = []
            for k, ch in enumerate(stream):
                text.append(ch.choices[0].text)
                if i % 4 == 3 and k == 1:
                    stream.close()  # disconnect mid-stream
                    return
            results[i] = "".join(text)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not errors, errors
    assert len(results) == 12
    for i, text in results.items():
        assert text == expected_text(model, tok, prompts[i], 24), i
    deadline = time.time() + 10
    while time.time() < deadline:  # aborted requests are freed at the engine's next step
        m = dict(line.split() for line in server.get("/metrics").splitlines() if not line.startswith("#"))
        if float(m["kvcache_kv_blocks_used"]) == 0 and float(m["kvcache_requests_running"]) == 0:
            break
        time.sleep(0.1)
    assert float(m["kvcache_kv_blocks_used"]) == 0 and float(m["kvcache_requests_running"]) == 0
    assert float(m["kvcache_preemptions_total"]) > 0  # 16 x up to 10 blocks > 40


def test_a_full_waiting_queue_answers_503(checkpoint):
    s = Server(checkpoint[0], "--num-blocks", "40", "--block-size", "4", "--max-num-seqs", "1", "--max-waiting", "1")
    try:
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(s.post("/v1/completions", {
            "prompt": "x", "max_tokens": 80, "temperature": 0})[0])) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    finally:
        s.stop()


def test_generate_py_serve_starts_the_same_server(checkpoint):
    _, model, tok = checkpoint
    s = Server(checkpoint[0], "--num-blocks", "40", "--block-size", "4", entry=("generate.py", "--serve"))
    try:
        status, body = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 6, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == expected_text(model, tok, "Hi", 6)
    finally:
        s.stop()
