"""The fused decode products (``transformer.fused_decode``): the kernel against the unfused maths
(run by Triton's interpreter on this CPU), the model's decoding with and without them, and where
the model chooses them."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from transformer import fused_decode
from transformer.config import ModelConfig
from transformer.layers import MLP, Linear, RMSNorm, project

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KERNEL_CHECK = r'''
import torch
import torch.nn.functional as F
from transformer.fused_decode import fused_linear
g = torch.Generator().manual_seed(0)
worst = 0.0
for M, K, N, norm, gated, bias, resid, tiles, dtype in [
        (1, 64, 96, True, False, False, False, None, torch.float32),          # the default tiles
        (3, 64, 96, True, False, True, False, (32, 16, 1, 4, 1), torch.float32),
        (1, 64, 80, False, True, False, True, (64, 16, 2, 4, 1), torch.float32),  # K split in 2: the counter
        (5, 128, 64, False, False, False, True, (32, 16, 4, 4, 1), torch.float32),
        (16, 48, 40, True, False, True, True, (16, 16, 3, 4, 1), torch.float32),  # a ragged split, ragged N
        (1, 96, 40, True, False, False, True, (16, 32, 3, 4, 1), torch.float32),  # norm sums over three slices
        (2, 48, 40, False, True, True, True, (16, 16, 2, 4, 1), torch.float32),
        (4, 64, 48, True, False, False, True, (16, 16, 2, 4, 1), torch.float16)]:
    x = torch.randn(M, 2 * K if gated else K, generator=g)
    w = torch.randn(K, N, generator=g) / 8
    b = torch.randn(N, generator=g) if bias else None
    nw = torch.rand(K, generator=g) + 0.5 if norm else None
    r = torch.randn(M, N, generator=g) if resid else None
    x, w, b, nw, r = (t if t is None else t.to(dtype) for t in (x, w, b, nw, r))
    h = x.float()
    if gated:
        a, u = h.chunk(2, -1)
        h = F.silu(a) * u
    if norm:
        h = F.rms_norm(h, (K,), nw.float(), 1e-5)
    want = h @ w.float() + (b.float() if bias else 0) + (r.float() if resid else 0)
    got = fused_linear(x, w, b, norm_weight=nw, eps=1e-5, gated=gated, residual=r, tiles=tiles)
    assert got.dtype == dtype and got.shape == (M, N)
    err = (got.float() - want).abs().max().item() / want.abs().max().item()
    assert err < (4e-3 if dtype == torch.float16 else 1e-6), (M, K, N, norm, gated, bias, resid, tiles, dtype, err)
    again = fused_linear(x, w, b, norm_weight=nw, eps=1e-5, gated=gated, residual=r, tiles=tiles)
    assert torch.equal(got, again)  # the split's counters were reset: the same sum, bit for bit
    worst = max(worst, err if dtype == torch.float32 else 0)
print("ok", worst)
'''

MODEL_CHECK = r'''
import torch
from transformer import DecoderOnlyTransformer, ModelConfig, fused_decode
calls = []
real = fused_decode.fused_linear
fused_decode.fused_linear = lambda *a, **k: calls.append(k.get("gated")) or real(*a, **k)
for extra, batch in (({}, 1), ({"qkv_bias": True}, 2)):  # Llama; Qwen2's q/k/v biases, two rows
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, max_seq_len=64,
                      pos_encoding="rope", norm="rmsnorm", bias=False, mlp="gated", activation="silu", **extra)
    model = DecoderOnlyTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms and biases away from their initial 1 / 0
    ids = torch.randint(0, 97, (batch, 5))
    with torch.inference_mode():
        del calls[:]
        fused = model.generate(ids, 12, use_cache=True)
        assert calls.count(False) > 0 and (calls.count(True) > 0) == (batch == 1), calls  # the decode steps took them
        step_fused = model(fused[:, :1])
        with fused_decode.disabled():
            plain = model.generate(ids, 12, use_cache=True)
            step_plain = model(fused[:, :1])
    assert torch.equal(fused, plain), (fused, plain)
    err = (step_fused - step_plain).abs().max().item()
    assert err < 1e-5, err
print("ok")
'''


def _interpret(code: str) -> None:
    """Run ``code`` in a fresh interpreter with Triton's CPU interpreter on (it is chosen when the
    kernels are defined) and assert it printed ``ok``."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-3000:]


def test_fused_kernel_equals_the_unfused_maths():
    """The kernel, one row and several, each fusion alone and together, the reduction split 1,
    2, 3 and 4 ways (partial tiles included): within float32 rounding of norm -> activation ->
    product -> bias -> residual, and the same bits when called again (the split's counters reset
    themselves, and the tile's partial sums are added in a fixed order)."""
    _interpret(KERNEL_CHECK)


def test_model_decodes_the_same_tokens_with_the_fused_products():
    """A Llama-shaped model (RMSNorm, SiLU gate, grouped-query attention, RoPE), and one with
    Qwen2's q/k/v biases at two rows: cached greedy decoding through the fused products (they are
    called; with a norm or gate in front at one row only) gives the tokens of the unfused forward, and a one-token step the same logits
    within 1e-5 (float32, under the interpreter)."""
    _interpret(MODEL_CHECK)


def test_fused_products_are_chosen_only_where_they_serve_and_win(monkeypatch):
    """``available``: a CUDA tensor of half precision or the interpreter (float32/float16), no
    gradient to record, not ``disabled``; and where it measured faster: at most 16 rows (one with
    a norm or a gate in front), weights of at most 16M numbers."""
    monkeypatch.setattr(fused_decode, "HAS_TRITON", True)
    x = torch.randn(1, 3, 32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_decode.available(x)  # a CPU tensor, no interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_decode.available(x) and fused_decode.available(x.half())
    assert not fused_decode.available(x.bfloat16())  # the interpreter's bfloat16 products are wrong
    assert fused_decode.available(torch.randn(16, 32)) and not fused_decode.available(torch.randn(17, 32))
    one = torch.randn(1, 1, 64)
    assert fused_decode.available(one, gated=True) and fused_decode.available(one, norm=True)
    assert not fused_decode.available(torch.randn(2, 1, 64), gated=True)
    assert not fused_decode.available(torch.randn(2, 1, 64), norm=True)
    assert fused_decode.available(one, torch.empty(64, 1 << 18))  # 16M weights
    assert not fused_decode.available(one, torch.empty(64, (1 << 18) + 1))  # larger: cuBLAS
    w = torch.randn(32, 8, requires_grad=True)
    assert not fused_decode.available(x, w)  # training: the kernel has no backward
    with torch.no_grad():
        assert fused_decode.available(x, w)
    with fused_decode.disabled():
        assert not fused_decode.available(x)
    assert fused_decode.available(x)
    monkeypatch.setattr(fused_decode, "HAS_TRITON", False)
    assert not fused_decode.available(x)


def test_project_unfused_is_the_modules_in_turn():
    """Where the kernel does not serve (here: a CPU without the interpreter), ``project`` is the
    modules one after another, bit for bit: norm, gate, product, residual add."""
    g = torch.Generator().manual_seed(1)
    lin = Linear(16, 8, bias=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    x, r = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 8, generator=g)
    assert torch.equal(project(lin, x, norm=norm, residual=r), r + lin(norm(x)))
    ln = torch.nn.LayerNorm(16)
    assert torch.equal(project(lin, x, norm=ln), lin(ln(x)))
    gate_up = torch.randn(2, 3, 32, generator=g)
    assert torch.equal(project(lin, gate_up[..., :16] * 0 + x, residual=r), r + lin(x))
    down = Linear(16, 8, bias=False)
    assert torch.equal(project(down, gate_up, gated="silu"), down(F.silu(gate_up[..., :16]) * gate_up[..., 16:]))
    cfg = ModelConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=24, mlp="gated", activation="silu",
                      norm="rmsnorm", dropout=0.0)
    mlp = MLP(cfg).eval()
    assert torch.equal(mlp(x, norm=norm, residual=x), x + mlp(norm(x)))


def test_fused_linear_refuses_shapes_it_cannot_serve():
    """A mismatch is refused with both shapes named, before any kernel is looked up."""
    w = torch.randn(32, 8)
    with pytest.raises(ValueError, match=r"x \(2, 16\) does not fit weight \(32, 8\)"):
        fused_decode.fused_linear(torch.randn(2, 16), w)
    with pytest.raises(ValueError, match="gated=True"):
        fused_decode.fused_linear(torch.randn(1, 32), w, gated=True)  # a gated x is [gate | up]: 64 wide
    with pytest.raises(ValueError, match="1 to 16 rows"):
        fused_decode.fused_linear(torch.randn(17, 32), w)
    with pytest.raises(ValueError, match=r"residual \(1, 9\)"):
        fused_decode.fused_linear(torch.randn(1, 32), w, residual=torch.randn(1, 9))
