"""train.py and generate.py end to end, plus the training library they are built from.

The scripts run as subprocesses on a tiny model and a ~150 KB slice of Shakespeare, so every
run takes seconds.  What is checked:

* train -> generate works, and the run directory has the documented layout;
* a run killed with SIGKILL (between steps, or in the middle of writing a checkpoint) and
  resumed with ``--resume`` ends at *exactly* the loss of an uninterrupted run;
* generate.py's errors for missing, corrupt and foreign checkpoints;
* ``torchrun --nproc_per_node=2`` (gloo on CPU): exits cleanly, rank 0 alone writes;
* the encoder-decoder path: a reverse run reports exact match, generate.py takes ``--src``.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import generate as gen_script
import train as train_script
from transformer import training as T
from transformer.checkpoint import load_checkpoint, load_model, save_model, verify_checkpoint
from transformer.config import ModelConfig
from helpers import write_play_excerpts
from transformer.model import DecoderOnlyTransformer
from transformer.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parents[1]
# One thread: a tiny model gains nothing from two, and on a CPU shared with other work a second
# thread makes every parallel region wait for whichever thread was descheduled.
TINY = ["--preset", "tiny", "--max-steps", "20", "--eval-interval", "10", "--dropout", "0.1", "--no-progress",
        "--threads", "1"]



def run_script(*args, timeout=120, input=None, check=True):
    """Run ``python <args>`` in the repo root; return the CompletedProcess (text mode)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return write_play_excerpts(tmp_path_factory.mktemp("corpus") / "shakespeare.txt", hamlet=100_000, macbeth=50_000)


@pytest.fixture(scope="module")
def tiny_run(corpus_file, tmp_path_factory):
    """The reference: an uninterrupted 20-step run (with dropout, so RNG state matters on resume)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = run_script("train.py", *TINY, "--data", corpus_file, "--out-dir", out)
    return out, proc


# ---- train -> generate ----------------------------------------------------------------------

def test_train_writes_the_documented_layout(tiny_run):
    out, proc = tiny_run
    for name in ("best/config.json", "best/model.safetensors", "best/tokenizer.model", "last/config.json",
                 "last/train_state.json", "last/train_state.safetensors", "tokenizer.model", "metrics.json",
                 "log.jsonl"):
        assert (out / name).is_file(), name
    assert "bits/char" in proc.stdout and "final: best/ on the whole validation split" in proc.stdout
    m = metrics(out)
    assert m["steps"] == 20 and m["model"] == "decoder" and m["world_size"] == 1
    assert 0 < m["val_bits_per_char"] < 8 and m["tokens_per_s"] > 0 and "cpu" in m["machine"]
    assert m["val_bits_per_char"] == pytest.approx(m["val_loss"] / math.log(2) / m["val_chars_per_token"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20]
    verify_checkpoint(out / "best")
    assert load_checkpoint(out / "last").train_state["step"] == 20


def test_generate_streams_text_and_reports_speed_and_cache(tiny_run, capsys):
    out, _ = tiny_run
    # As a subprocess, the prompt from stdin (not a terminal), greedy, dynamic cache.
    cached = run_script("generate.py", "--checkpoint", out, "--max-new-tokens", "12", "--temperature", "0",
                        input="HAMLET:")
    assert cached.stdout.startswith("HAMLET:") and len(cached.stdout) > len("HAMLET:")
    assert "tokens/s" in cached.stderr and "dynamic KV cache, cache memory" in cached.stderr
    assert "cache memory 0 bytes" not in cached.stderr     # the cache generate() filled is the one we measure
    # The cache-free reference and the static cache give the same greedy text.
    common = ["--checkpoint", str(out), "--max-new-tokens", "12", "--temperature", "0", "--prompt", "HAMLET:"]
    assert gen_script.main([*common, "--no-use-cache"]) == 0
    reference = capsys.readouterr()
    assert reference.out == cached.stdout and "no cache" in reference.err
    assert gen_script.main([*common, "--cache", "static", "--num-samples", "2"]) == 0
    static = capsys.readouterr()
    assert static.out.count(cached.stdout.strip()) == 2 and "static KV cache" in static.err


def test_generate_in_process_sampling_is_seeded(tiny_run, capsys):
    out, _ = tiny_run
    args = ["--checkpoint", str(out), "--prompt", "To be", "--max-new-tokens", "15", "--seed", "3"]
    assert gen_script.main(args) == 0
    first = capsys.readouterr().out
    assert gen_script.main(args) == 0
    assert capsys.readouterr().out == first and first.startswith("To be")
    assert gen_script.main(["--checkpoint", str(out / "last"), "--prompt", "x", "--max-new-tokens", "2"]) == 0


# ---- resume after SIGKILL ---------------------------------------------------------------------

def test_resume_after_sigkill_matches_uninterrupted_run(tiny_run, corpus_file, tmp_path, capsys):
    full, _ = tiny_run
    out = tmp_path / "killed"
    killed = run_script("train.py", *TINY, "--data", corpus_file, "--out-dir", out, "--debug-sigkill-at-step", "15",
                        check=False)
    assert killed.returncode == -9, killed.stderr
    assert load_checkpoint(out / "last").train_state["step"] == 10 and not (out / "metrics.json").exists()
    capsys.readouterr()
    assert train_script.main([*TINY, "--data", str(corpus_file), "--out-dir", str(out), "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "resumed from" in resumed and "at step 10" in resumed
    a, b = metrics(full), metrics(out)
    assert b["resumed"] and b["steps"] == 20
    assert b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
    assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-6)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [10, 20]


def test_sigkill_while_saving_keeps_a_loadable_checkpoint(tiny_run, corpus_file, tmp_path, capsys):
    """Killed between moving the old last/ aside and moving the new one in: the worst moment."""
    full, _ = tiny_run
    out = tmp_path / "killed-in-save"
    killed = run_script("train.py", *TINY, "--data", corpus_file, "--out-dir", out, "--debug-sigkill-in-save", "2",
                        check=False)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "last").exists() and (out / ".last.old").is_dir()
    assert list(out.glob(".last.tmp-*"))            # the new checkpoint, written but never swapped in
    verify_checkpoint(out / "best")                  # other checkpoints are untouched
    capsys.readouterr()
    assert train_script.main([*TINY, "--data", str(corpus_file), "--out-dir", str(out), "--resume"]) == 0
    assert "at step 10" in capsys.readouterr().out   # the backup was recovered
    assert not list(out.glob(".last.*"))             # and the debris cleaned up by the next save
    assert metrics(out)["val_loss"] == pytest.approx(metrics(full)["val_loss"], abs=1e-6)


def test_resume_refuses_changed_settings_and_missing_runs(tiny_run, corpus_file, tmp_path):
    full, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(full, copy)
    with pytest.raises(SystemExit, match="--lr=0.5 differs"):
        train_script.main([*TINY, "--data", str(corpus_file), "--out-dir", str(copy), "--resume", "--lr", "0.5"])
    with pytest.raises(SystemExit, match="nothing to resume"):
        train_script.main([*TINY, "--data", str(corpus_file), "--out-dir", str(tmp_path / "none"), "--resume"])


def test_draft_run_reuses_the_tokenizer(tiny_run, corpus_file, tmp_path, capsys):
    """``--tokenizer out/`` (as for a speculative-decoding draft): same ids, own run directory."""
    full, _ = tiny_run
    draft = tmp_path / "draft"
    assert train_script.main([*TINY, "--data", str(corpus_file), "--tokenizer", str(full), "--out-dir", str(draft),
                              "--max-steps", "2", "--eval-interval", "2", "--d-model", "16"]) == 0
    assert "tokenizer: reused" in capsys.readouterr().out
    assert (draft / "best" / "tokenizer.model").read_bytes() == (full / "tokenizer.model").read_bytes()
    assert load_model(draft / "best")[0].config.d_model == 16


def test_train_flags_build_a_llama_style_block(tiny_run, corpus_file, tmp_path):
    """``--mlp swiglu`` is the gated SiLU MLP; ``--qk-norm``, ``--qkv-bias`` and ``--head-dim`` are
    ModelConfig fields like any other; the checkpoint keeps them and generates."""
    full, _ = tiny_run
    out = tmp_path / "llama_style"
    assert train_script.main([*TINY, "--data", str(corpus_file), "--tokenizer", str(full), "--out-dir", str(out),
                              "--max-steps", "2", "--eval-interval", "2", "--mlp", "swiglu", "--qk-norm",
                              "--no-bias", "--qkv-bias", "--head-dim", "24", "--d-ff", "40"]) == 0
    model = load_model(out / "best")[0]
    c = model.config
    assert (c.mlp, c.activation, c.qk_norm, c.bias, c.qkv_bias, c.head_dim) == ("gated", "silu", True, False, True, 24)
    assert model.decoder.blocks[0].mlp.fc_in.weight.shape[-1] == 2 * 40  # gate and up, fused
    out_ids = model.generate(torch.tensor([[1, 2, 3]]), 4, eos_token_id=None)
    assert out_ids.shape == (1, 7)
    with pytest.raises(SystemExit):
        train_script.main([*TINY, "--data", str(corpus_file), "--mlp", "glu"])


def test_distilled_draft_run_and_its_errors(tiny_run, corpus_file, tmp_path, capsys):
    """``--teacher out/``: the draft learns the teacher's distribution (KL) and says so; a teacher
    with another vocabulary or no checkpoint at all is refused before training starts."""
    full, _ = tiny_run
    args = [*TINY, "--data", str(corpus_file), "--tokenizer", str(full), "--max-steps", "4", "--eval-interval", "2",
            "--d-model", "16"]
    assert train_script.main([*args, "--teacher", str(full), "--out-dir", str(tmp_path / "kd")]) == 0
    assert "distilling from" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "kd" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] >= 0 for r in log if "train_loss" in r)
    with pytest.raises(SystemExit, match="--teacher .*does not exist; train the teacher first"):
        train_script.main([*args, "--teacher", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "x")])
    other = tmp_path / "other"
    save_model(other, DecoderOnlyTransformer(ModelConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=1)))
    with pytest.raises(SystemExit, match="vocabulary"):
        train_script.main([*args, "--teacher", str(other), "--out-dir", str(tmp_path / "y")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_script.main([*args, "--teacher", str(full), "--distill-weight", "1.5", "--out-dir", str(tmp_path / "z")])
    assert "--distill-weight must be in [0, 1], got 1.5" in capsys.readouterr().err



def test_teacher_text_run_resumes_exactly_and_its_errors(tiny_run, corpus_file, tmp_path, capsys):
    """``--teacher-samples``: the teacher writes text first and the batches mix it in; a run
    killed mid-way and resumed (the text rebuilt from the seed, the mix's RNG restored) ends at
    the loss of an uninterrupted run.  Without ``--teacher`` the flags are refused."""
    full, _ = tiny_run
    args = [*TINY, "--data", str(corpus_file), "--tokenizer", str(full), "--max-steps", "4", "--eval-interval", "2",
            "--d-model", "16", "--teacher", str(full), "--teacher-samples", "5", "--teacher-mix", "0.5"]
    assert train_script.main([*args, "--out-dir", str(tmp_path / "whole")]) == 0
    out = capsys.readouterr().out
    assert "the teacher writes 5 continuations" in out and "2 of every 4 rows per batch" in out
    killed = run_script("train.py", *args, "--out-dir", tmp_path / "killed", "--debug-sigkill-at-step", "3",
                        check=False)
    assert killed.returncode == -9, killed.stderr
    assert train_script.main([*args, "--out-dir", str(tmp_path / "killed"), "--resume"]) == 0
    a, b = metrics(tmp_path / "whole"), metrics(tmp_path / "killed")
    assert b["resumed"] and b["final_train_loss"] == pytest.approx(a["final_train_loss"], abs=1e-6)
    capsys.readouterr()
    for flags, message in ((["--teacher-samples", "8"], "--teacher-samples 8 needs --teacher"),
                           (["--teacher", str(full), "--teacher-mix", "2"], "--teacher-mix must be in [0, 1], got 2")):
        with pytest.raises(SystemExit):
            train_script.main([*TINY, "--data", str(corpus_file), *flags, "--out-dir", str(tmp_path / "bad")])
        assert message in capsys.readouterr().err

def test_distill_loss_is_ce_plus_kl():
    """weight 0: the plain cross-entropy; weight 1: KL(teacher || student), zero for a copy of the
    teacher and positive otherwise; in between, the mix; the teacher gets no gradient."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)
    student, teacher = DecoderOnlyTransformer(cfg), DecoderOnlyTransformer(cfg)
    x, y = torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (3, 10))
    ce = T.lm_loss(student, x, y)
    assert torch.allclose(T.distill_loss(student, teacher, x, y, 0.0), ce)
    p_t = torch.softmax(teacher(x).float(), -1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student(x).float(), -1))).sum(-1).mean()
    assert torch.allclose(T.distill_loss(student, teacher, x, y, 1.0), kl, atol=1e-6)
    assert kl > 1e-3
    assert torch.allclose(T.distill_loss(student, teacher, x, y, 0.25), 0.75 * ce + 0.25 * kl, atol=1e-6)
    assert T.distill_loss(teacher, teacher, x, y, 1.0).abs() < 1e-6
    T.distill_loss(student, teacher, x, y, 0.5).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---- generate.py errors -----------------------------------------------------------------------

def test_missing_checkpoint_names_the_command(tmp_path, capsys):
    assert gen_script.main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and f"python train.py --out-dir {tmp_path / 'nowhere'}" in err
    assert gen_script.missing_hint("out") == "create it with: python train.py"


def test_corrupt_and_foreign_checkpoints_are_refused(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    bad = tmp_path / "bad"
    shutil.copytree(out / "best", bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert gen_script.main(["--checkpoint", str(bad), "--prompt", "x"]) == 1
    assert "corrupt" in capsys.readouterr().err

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"w": torch.zeros(2)}, foreign / "pytorch_model.bin")
    assert gen_script.main(["--checkpoint", str(foreign), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "not a checkpoint of this project" in err and "pickle" in err

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert gen_script.main(["--checkpoint", str(hf), "--prompt", "x"]) == 1
    assert "not a checkpoint of this project" in capsys.readouterr().err


# ---- several processes ------------------------------------------------------------------------

def test_torchrun_two_processes_on_cpu(corpus_file, tmp_path):
    out = tmp_path / "ddp"
    proc = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                      "--preset", "tiny", "--max-steps", "6", "--eval-interval", "3", "--no-progress",
                      "--data", corpus_file, "--out-dir", out, timeout=180)
    assert "terminate called" not in proc.stderr
    assert proc.stdout.count("final: best/") == 1 and "2 process(es)" in proc.stdout   # rank 0 alone prints
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [3, 6]
    assert sorted(p.name for p in out.iterdir()) == ["best", "last", "log.jsonl", "metrics.json", "tokenizer.model"]
    m = metrics(out)
    assert m["world_size"] == 2 and m["tokens_seen"] == 2 * 6 * 4 * 32
    ranks = load_checkpoint(out / "last").train_state["ranks"]
    assert [r["data"]["seed"] for r in ranks] == [1337, 1338]      # each rank draws its own batches


# ---- encoder-decoder ----------------------------------------------------------------------------

def test_encoder_decoder_reverse_run_and_generate_src(tmp_path, capsys):
    out = tmp_path / "s2s"
    assert train_script.main(["--model", "encoder-decoder", "--task", "reverse", "--max-steps", "30",
                              "--eval-interval", "15", "--eval-examples", "40", "--d-model", "32", "--n-layers", "1",
                              "--n-encoder-layers", "1", "--batch-size", "16", "--task-max-len", "6",
                              "--no-progress", "--threads", "1", "--out-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "exact match" in stdout and "held-out 'reverse' problems" in stdout
    m = metrics(out)
    assert m["model"] == "encoder-decoder" and 0.0 <= m["exact_match"] <= 1.0 and m["eval_examples"] == 40
    assert gen_script.main(["--checkpoint", str(out), "--src", "5 9 12 4"]) == 0
    captured = capsys.readouterr()
    assert "expected answer 4 12 9 5" in captured.err and "tokens/s" in captured.err
    assert all(t.isdigit() for t in captured.out.split())
    assert gen_script.main(["--checkpoint", str(out), "--src", "5 99"]) == 2
    assert "symbols must be token ids in [3, 16)" in capsys.readouterr().err
    assert gen_script.main(["--checkpoint", str(out)]) == 2
    assert "--src" in capsys.readouterr().err


def test_default_seq2seq_preset_learns_reverse(tmp_path):
    """The issue's bar: the default encoder-decoder run reaches >= 99% exact match (about a minute)."""
    run_script("train.py", "--model", "encoder-decoder", "--task", "reverse", "--no-progress", "--out-dir",
               tmp_path / "rev", timeout=900)
    assert metrics(tmp_path / "rev")["exact_match"] >= 0.99


# ---- library pieces (in process, fast) ------------------------------------------------------------

def test_every_model_config_field_has_a_flag():
    parser = train_script.build_parser()
    flags = {a.dest for a in parser._actions}
    for field in ModelConfig.__dataclass_fields__:
        if field not in train_script._MODEL_FIELDS_NOT_FLAGS:
            assert field in flags, field
    for name in ("batch_size", "block_size", "max_steps", "lr", "warmup_steps", "eval_interval", "eval_batches",
                 "vocab_size", "tokenizer_type", "seed", "device", "compile", "out_dir", "resume", "data", "preset"):
        assert name in flags, name
    args = parser.parse_args(["--preset", "draft", "--n-kv-heads", "2", "--no-bias", "--lr", "1e-3"])
    model_over, tcfg, preset = train_script.resolve_configs(args)
    assert preset == "draft" and model_over["n_kv_heads"] == 2 and model_over["bias"] is False
    assert tcfg.lr == 1e-3 and tcfg.max_steps == T.PRESETS["draft"]["train"]["max_steps"]
    assert "--debug-sigkill-at-step" not in parser.format_help()


def test_presets_build_valid_models():
    for name, preset in T.PRESETS.items():
        ModelConfig(**{"vocab_size": 512, **preset["model"]})
        T.TrainConfig(**preset["train"]).validate()
    with pytest.raises(ValueError, match="--preset 'nope'"):
        T.preset_overrides("nope")


def test_warmup_cosine_schedule_and_optimizer_groups():
    f = T.WarmupCosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) < f(5) < f(9) < 1.0 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    model = DecoderOnlyTransformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2))
    opt = T.configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


def test_evaluate_lm_is_the_mean_over_every_target():
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    tokens = torch.randint(0, 50, (101,))
    # Windows of 16 restart their context, so compare with the same windows computed by hand.
    total, count = 0.0, 0
    for s in range(0, 100, 16):
        x, y = tokens[s:min(s + 16, 100)], tokens[s + 1:min(s + 17, 101)]
        with torch.no_grad():
            out = model(x[None])
        total += torch.nn.functional.cross_entropy(out[0], y, reduction="sum").item()
        count += y.numel()
    got = T.evaluate_lm(model, tokens, block_size=16, batch_size=3)
    assert count == 100 and got == pytest.approx(total / count, rel=1e-5)


def test_resolve_device_and_dtype():
    assert T.resolve_device("cpu").type == "cpu" and T.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="--device 'potato'"):
        T.resolve_device("potato")
    assert T.resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert T.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if T.cpu_has_fast_bf16() else torch.float32)


def test_thread_tuner_follows_the_faster_setting(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: calls[-1] if calls else 2)
    tuner = T.ThreadTuner(2, probe_every=10)
    speed = {2: 1.0, 1: 1.8}                      # quiet machine: two threads are faster
    for _ in range(30):
        n = tuner.before_step()
        tuner.after_step(speed[n])
    assert tuner.current == 2 and tuner.steps_at[1] == 3       # probed at steps 10, 20, 30; stayed
    speed = {2: 3.0, 1: 1.2}                      # busy machine: one thread is faster
    for _ in range(30):
        n = tuner.before_step()
        tuner.after_step(speed[n])
    assert tuner.current == 1
    assert T.ThreadTuner(1).before_step() == 1 and T.ThreadTuner(1).options == (1,)


def test_thread_count_does_not_change_results():
    """What lets ThreadTuner switch threads mid-run without breaking reproducibility: for the
    presets' kind of model (RMSNorm, no biases) a training step is bitwise identical with 1 or 2
    threads.  (LayerNorm and bias gradients are reductions split across threads: models with
    them may differ in the last bits, which is why train.py documents --threads N.)"""
    preset = dict(T.PRESETS["cpu"]["model"], d_model=64, max_seq_len=64)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = DecoderOnlyTransformer(ModelConfig(vocab_size=300, **preset))
        opt = T.configure_optimizer(model, 3e-3)
        x = torch.randint(0, 300, (4, 65))
        for _ in range(2):
            with T.autocast(torch.device("cpu"), T.resolve_dtype("auto", torch.device("cpu"))):
                loss = T.lm_loss(model, x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
        results.append([loss.detach()] + [p.detach().clone() for p in model.parameters()])
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_text_streamer_never_prints_half_a_character():
    tok = ByteTokenizer()
    text = "Fair 🌹, fair 玫瑰!"

    class Out:
        chunks = []

        def write(self, s):
            self.chunks.append(s)

        def flush(self):
            pass

    out = Out()
    streamer = gen_script.TextStreamer(tok, tok.encode("Fair "), out)
    for i in tok.encode(text)[len(tok.encode("Fair ")):]:
        streamer(torch.tensor([i]))
    assert streamer.end() == text
    assert "".join(out.chunks) == text[len("Fair "):] and not any("\ufffd" in c for c in out.chunks)


def test_format_bytes():
    assert gen_script.format_bytes(512) == "512 bytes" and gen_script.format_bytes(1536) == "1.5 KiB"
    assert gen_script.format_bytes(3 * 2 ** 20) == "3.0 MiB"


def test_parse_src_and_expected_answers():
    assert gen_script.parse_src("5 9 12", "reverse", 16) == [5, 9, 12, 2]
    ids = gen_script.parse_src("12+9", "add", 16)
    assert ids == [4, 5, 13, 12, 2] and gen_script.expected_answer("add", ids) == [5, 4]   # 21
    assert gen_script.expected_answer("sort", [7, 3, 5, 2]) == [3, 5, 7]
    with pytest.raises(ValueError, match="space-separated token ids"):
        gen_script.parse_src("a b", "reverse", 16)


def test_save_model_load_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig(vocab_size=260, d_model=16, n_layers=1, n_heads=2))
    tok_dir = tmp_path / "tok"
    path = ByteTokenizer().save(tok_dir)
    save_model(tmp_path / "ckpt", torch.compile(model, backend="eager"), extra_files={path.name: path})
    loaded, tok, ckpt = load_model(tmp_path / "ckpt")
    assert isinstance(tok, ByteTokenizer) and ckpt.model_type == "decoder" and not loaded.training
    x = torch.randint(0, 260, (2, 7))
    assert torch.equal(loaded(x), model.eval()(x))
