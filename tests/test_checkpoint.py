"""Checkpoints: exact round trips, atomic saves (even under SIGKILL), clear errors, no pickle."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer import checkpoint as ckpt_mod
from transformer.checkpoint import (CheckpointError, flatten_state, load_checkpoint, save_checkpoint,
                                    unflatten_state, verify_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))
    m[1].weight = m[0].weight                      # tied weights share storage
    return m


def _trained_state():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for _ in range(3):
        loss = m(torch.randint(0, 50, (4, 8))).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    gen = torch.Generator().manual_seed(42)
    torch.randint(0, 10, (5,), generator=gen)
    train_state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": 3,
                   "rng": {"torch": torch.get_rng_state(), "data": gen.get_state()},
                   "python_rng": random.Random(1).getstate(), "best_val": float("inf"),
                   "history": [(1, 2.5), (2, 2.25)], "note": "resumable", "none": None}
    return m, opt, sched, train_state


def _same(a, b):
    """Equal in value and type, recursively; tensors must match dtype and bits."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and a != a:
        assert b != b
    else:
        assert a == b


def test_round_trip_is_exact(tmp_path):
    m, opt, sched, train_state = _trained_state()
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer bytes")
    config = {"vocab_size": 50, "d_model": 16, "n_kv_heads": None}
    save_checkpoint(tmp_path / "ck", m.state_dict(), config, train_state, {"tokenizer.model": tok})
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == config and ck.model_type == "decoder" and ck.metadata["format_version"] == 1
    _same(dict(m.state_dict()), ck.model_state)
    _same(train_state, ck.train_state)
    assert ck.extra_files["tokenizer.model"].read_bytes() == b"tokenizer bytes"
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", "train_state.json", "train_state.safetensors"]

    # Everything loads back into fresh objects and training continues identically.
    m2 = _model()
    m2.load_state_dict(ck.model_state)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.train_state["optimizer"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=100)
    sched2.load_state_dict(ck.train_state["scheduler"])
    torch.set_rng_state(ck.train_state["rng"]["torch"])
    x = torch.randint(0, 50, (4, 8))
    torch.set_rng_state(train_state["rng"]["torch"])
    assert torch.equal(x, torch.randint(0, 50, (4, 8)))
    for model, o, s in ((m, opt, sched), (m2, opt2, sched2)):
        model(x).logsumexp(-1).mean().backward()
        o.step()
        s.step()
    _same(dict(m.state_dict()), dict(m2.state_dict()))
    assert sched.get_last_lr() == sched2.get_last_lr()
    assert load_checkpoint(tmp_path / "ck", load_train_state=False).train_state is None


def test_flatten_handles_tricky_containers():
    state = {0: {"__tensor__": "not a tensor"}, "a/b": torch.ones(2), "a": {"b": torch.zeros(2)},
             (1, "x"): [np.arange(3), np.float32(1.5)], "empty": torch.empty(0), "e2": torch.empty(0, 3),
             True: False, 2.5: -0.0}
    skeleton, tensors = flatten_state(state)
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back[0] == {"__tensor__": "not a tensor"} and back[(1, "x")][1] == 1.5
    assert np.array_equal(back[(1, "x")][0], np.arange(3)) and torch.equal(back["a"]["b"], torch.zeros(2))
    assert torch.equal(back["a/b"], torch.ones(2)) and back["e2"].shape == (0, 3) and back[True] is False
    with pytest.raises(TypeError, match=r"train_state/opt is a .*object"):
        flatten_state({"opt": object()})


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    save_checkpoint(d, {"w": torch.zeros(3)}, {"v": 1}, {"step": 1})
    real_write, real_rename = ckpt_mod._write_synced, os.rename
    for failing in ("write", "rename_old", "rename_new"):
        calls = {"n": 0}

        def write(path, data):
            if failing == "write" and path.name == "train_state.json":
                real_write(path, data[: len(data) // 2])
                raise OSError("disk full (simulated)")
            return real_write(path, data)

        def rename(src, dst):
            calls["n"] += 1
            if (failing, calls["n"]) in (("rename_old", 1), ("rename_new", 2)):
                raise KeyboardInterrupt("simulated crash")
            return real_rename(src, dst)

        monkeypatch.setattr(ckpt_mod, "_write_synced", write)
        monkeypatch.setattr(ckpt_mod.os, "rename", rename)
        with pytest.raises((OSError, KeyboardInterrupt)):
            save_checkpoint(d, {"w": torch.ones(3)}, {"v": 2}, {"step": 2})
        monkeypatch.setattr(ckpt_mod, "_write_synced", real_write)
        monkeypatch.setattr(ckpt_mod.os, "rename", real_rename)
        ck = load_checkpoint(d)        # after rename_new failed, the save put the old folder back
        assert ck.config == {"v": 1} and torch.equal(ck.model_state["w"], torch.zeros(3)), failing
        assert not list(tmp_path.glob(".ck.tmp-*"))
    save_checkpoint(d, {"w": torch.ones(3)}, {"v": 2})
    assert load_checkpoint(d).config == {"v": 2} and load_checkpoint(d).train_state is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]       # no temp or backup left


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_files_are_detected(tmp_path, damage):
    d = save_checkpoint(tmp_path / "ck", {"w": torch.randn(100)}, {}, {"m": torch.randn(10)})
    victim = d / ("model.safetensors" if damage != "delete" else "train_state.safetensors")
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-7]))
    else:
        victim.unlink()
    match = "missing train_state.safetensors" if damage == "delete" else r"model\.safetensors.* is corrupt"
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(d)
    with pytest.raises(CheckpointError):
        verify_checkpoint(d)


def test_foreign_and_missing_folders(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; run python train.py --out-dir x"):
        load_checkpoint(tmp_path / "x", hint="run python train.py --out-dir x")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(hf)
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "model.pt").write_bytes(pickle.dumps({"w": [1, 2]}))
    with pytest.raises(CheckpointError, match=r"pickle files \['model.pt'\].*never loaded"):
        load_checkpoint(pk)
    (hf / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(hf)
    d = save_checkpoint(tmp_path / "ck", {"w": torch.ones(1)}, {})
    manifest = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version=99"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(pk, {"w": torch.ones(1)}, {})          # never clobber a non-checkpoint folder
    assert (pk / "model.pt").exists()


_KILL_SCRIPT = """
import sys, torch
from transformer.checkpoint import save_checkpoint
path = sys.argv[1]
i = 0
while True:
    i += 1
    w = torch.full((500_000,), float(i))            # 2 MB per tensor, 6 MB per checkpoint
    save_checkpoint(path, {"a": w, "b": w + 0, "c": w * 1}, {"i": i}, {"i": i, "m": w[:1000]})
    print(i, flush=True)
"""


def test_sigkill_mid_save_never_breaks_the_checkpoint(tmp_path):
    """Three writers (one per directory, run side by side to save time) are SIGKILLed at random
    moments after their first save; most kills land inside a later save."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(0)
    dirs = [tmp_path / f"ck{k}" for k in range(3)]
    for d in dirs:
        save_checkpoint(d, {"a": torch.zeros(1), "b": torch.zeros(1), "c": torch.zeros(1)}, {"i": 0})
    procs = [subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(d)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for d in dirs]
    for d, proc in zip(dirs, procs):
        assert proc.stdout.readline()          # one save finished: now kill inside a later one
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ck = load_checkpoint(d)
        i = ck.config["i"]
        assert i >= 1
        for name in "abc":                    # all files come from one and the same save
            assert torch.equal(ck.model_state[name], torch.full((500_000,), float(i)))
        assert ck.train_state["i"] == i
