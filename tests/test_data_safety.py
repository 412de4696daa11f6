"""Data safety of training runs: nothing trained is lost, and nothing that reads a run can break it.

What is guaranteed, and how each guarantee is tested (tiny models, a 60 KB corpus, the byte
tokenizer, so every training run takes about a second):

* **A run never replaces another run's files without being told to.**  ``train.py`` without
  ``--resume`` refuses an ``--out-dir`` that holds any of a run's files (checkpoints, backups,
  tokenizer, ``metrics.json``, ``log.jsonl``) before writing anything, naming ``--resume`` and
  ``--overwrite``; ``--overwrite`` deletes the old run's files first, so no stale checkpoint or
  log line survives.  ``--out-dir`` equal to (or holding, after resolving links) ``--data``,
  ``--teacher`` or ``--tokenizer`` is refused, naming both flags.  Tested with the issue's own
  commands: every byte of the first run is still there afterwards.  One ``train.py`` at a time
  per ``--out-dir``: the writer holds an exclusive lock on the folder, and a second one is
  refused before it reads or writes anything.
* **Reading a checkpoint never disturbs the writer, and a reader racing a save gets the old or
  the new checkpoint, never an error.**  Readers move nothing: between the writer's two renames
  they read the complete ``.<name>.old`` backup; every file of one load comes from the one
  folder that was opened, and a load whose folder was replaced mid-way starts again.  Tested
  deterministically (a reader run exactly between the writer's renames; a whole save run
  between reading the manifest and reading the weights), with a stress test (a training run
  saving every step while another process loads ``best/`` and ``last/`` in a loop: the trainer
  finishes, every load is a complete checkpoint), and after a SIGKILL in the middle of a save
  (readers read the backup and leave it in place; ``--resume``, the writer, restores it).
* **``--resume`` is not blocked by files other than the checkpoint.**  A torn last line of
  ``log.jsonl`` (what a full disk or a crash mid-write leaves) is dropped with a note on stderr.
  Out-of-space, read-only and permission errors while writing end the run with one line (no
  traceback, exit status 1) naming the path and saying that the last checkpoint is intact; the
  run then resumes.  Tested by simulating ``ENOSPC``/``EROFS``/``EACCES``/``EPERM`` at each kind
  of write (checkpoint, log, tokenizer, metrics), and, where the machine allows a private mount
  namespace (``unshare -m``), on a real full and a real read-only tmpfs (root ignores ``chmod``,
  so a read-only folder cannot be made any other way).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_script
from transformer import checkpoint as ckpt_mod
from transformer import run_dir
from transformer.checkpoint import load_checkpoint, load_model, save_checkpoint
from helpers import write_play_excerpts

REPO = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--tokenizer-type", "bytes", "--max-steps", "4", "--eval-interval", "2",
        "--eval-batches", "1", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_play_excerpts(tmp_path_factory.mktemp("corpus") / "plays.txt", hamlet=40_000, macbeth=20_000)


def train(corpus, out, *extra):
    """train.py in this process; returns its exit status (SystemExit propagates)."""
    return train_script.main([*FAST, "--data", str(corpus), "--out-dir", str(out), *map(str, extra)])


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_steps(out: Path) -> list:
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


# ---- 1. a new run never destroys an existing one ---------------------------------------------------

def test_new_run_in_an_existing_run_dir_is_refused_before_writing(corpus, tmp_path, capsys):
    """The issue's reproduction: a second run in the same --out-dir used to empty log.jsonl, rewrite
    the tokenizer at once and replace best/ (here: with a model of another shape) at its first
    evaluation."""
    run = tmp_path / "R"
    assert train(corpus, run, "--d-model", "64", "--n-heads", "4") == 0
    before = snapshot(run)
    for extra in ([], ["--max-steps", "10"]):
        with pytest.raises(SystemExit) as e:
            train(corpus, run, *extra)
        message = str(e.value.code)
        assert "already holds" in message and "--resume" in message and "--overwrite" in message
        assert str(run) in message and "best/" in message
    with pytest.raises(SystemExit):                      # the exact command: refused as well
        train(corpus, run, "--max-steps", "10", "--tokenizer", run, "--teacher", run)
    assert "--out-dir" in capsys.readouterr().err
    assert snapshot(run) == before                       # not one byte changed, nothing added
    assert load_model(run)[0].config.d_model == 64
    # any one of the run's files is enough to refuse
    for name in ("log.jsonl", "metrics.json", "tokenizer.json", ".last.old/config.json"):
        other = tmp_path / f"partial-{name.replace('/', '_')}"
        (other / name).parent.mkdir(parents=True)
        (other / name).write_text("{}")
        with pytest.raises(SystemExit, match="already holds"):
            train(corpus, other)
        assert snapshot(other) == {name: b"{}"}
    # a folder holding only other files is a fine place for a new run; the files stay
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert train(corpus, mine) == 0
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "best").is_dir()


def test_overwrite_replaces_the_whole_old_run(corpus, tmp_path):
    run = tmp_path / "R"
    assert train(corpus, run, "--d-model", "64", "--n-heads", "4", "--max-steps", "6") == 0
    (run / ".best.old").mkdir()                          # debris of an old crash goes too
    (run / "notes.txt").write_text("not the run's")
    assert train(corpus, run, "--overwrite") == 0
    assert load_model(run)[0].config.d_model == 32 and load_model(run / "last")[0].config.d_model == 32
    assert log_steps(run) == [2, 4]                      # no line of the old run (it had 2, 4, 6)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert not (run / ".best.old").exists() and (run / "notes.txt").read_text() == "not the run's"


def test_a_second_train_py_on_a_folder_in_use_is_refused(corpus, tmp_path):
    """Two processes on one --out-dir: a new run racing another's checks, a --resume, or an
    --overwrite of a run still training would write over each other.  The writer holds the
    folder's lock (here held by this test, as a running train.py would); every second run is
    refused before touching a byte, and the folder is free again once the holder lets go."""
    run = tmp_path / "R"
    assert train(corpus, run) == 0
    before = snapshot(run)
    holder = run_dir.RunFiles(str(run))
    holder.lock()
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match="in use by another train.py"):
                train(corpus, run, *extra)
        fresh = tmp_path / "fresh"  # a new folder: taken by the first, refused to the second
        other = run_dir.RunFiles(str(fresh))
        other.lock()
        with pytest.raises(SystemExit, match=f"--out-dir {fresh} is in use"):
            train(corpus, fresh)
        other.unlock()
        assert train(corpus, fresh) == 0
    finally:
        holder.unlock()
    assert snapshot(run) == before
    assert train(corpus, run, "--overwrite", "--max-steps", "6") == 0 and log_steps(run) == [2, 4, 6]


def test_overwrite_and_resume_contradict(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(corpus, tmp_path / "R", "--overwrite", "--resume")
    err = capsys.readouterr().err
    assert "--overwrite" in err and "--resume" in err
    assert not (tmp_path / "R").exists()


@pytest.mark.parametrize("flag", ["data", "teacher", "tokenizer"])
def test_out_dir_that_is_an_input_is_refused(corpus, tmp_path, capsys, flag):
    run = tmp_path / "R"
    assert train(corpus, run) == 0
    before = snapshot(run)
    link = tmp_path / "link-to-R"
    link.symlink_to(run)
    values = [run, link, run / "best"] if flag != "data" else [run, link, run / "log.jsonl"]
    for value in values:
        argv = [*FAST, "--out-dir", str(run), "--overwrite"]
        argv += ["--data", str(value)] if flag == "data" else ["--data", str(corpus), f"--{flag}", str(value)]
        with pytest.raises(SystemExit):
            train_script.main(argv)
        err = capsys.readouterr().err
        assert "--out-dir" in err and f"--{flag}" in err and str(value) in err, err
    assert snapshot(run) == before
    # a run directory inside a --data folder would feed its own log into the next run's corpus
    folder = tmp_path / "texts"
    folder.mkdir()
    shutil.copy(corpus, folder / "plays.txt")
    with pytest.raises(SystemExit):
        train_script.main([*FAST, "--data", str(folder), "--out-dir", str(folder / "run")])
    assert "inside --data" in capsys.readouterr().err and not (folder / "run").exists()


# ---- 2. readers never disturb the writer --------------------------------------------------------------

def _save(d: Path, value: float, step: int):
    return save_checkpoint(d, {"w": torch.full((1000,), value), "b": torch.full((10,), value)}, {"v": value},
                           {"step": step})


def _check_consistent(ck, expected=None):
    v = ck.config["v"]
    assert torch.equal(ck.model_state["w"], torch.full((1000,), v)) and torch.equal(ck.model_state["b"],
                                                                                    torch.full((10,), v))
    assert ck.train_state["step"] == int(v)
    if expected is not None:
        assert v == expected


def test_reader_between_the_writers_two_renames_moves_nothing(tmp_path, monkeypatch):
    """The crash of the issue: best/ is missing between the writer's renames; a reader that moved
    .best.old back made the writer's second rename fail ("Directory not empty")."""
    d = tmp_path / "best"
    _save(d, 1.0, 1)
    real_rename = os.rename
    seen = []

    def rename(src, dst):
        real_rename(src, dst)
        if Path(dst).name == ".best.old" and not seen:      # the old folder was just moved aside
            assert not d.exists()
            seen.append(load_checkpoint(d))                  # a reader, exactly now
            assert not d.exists() and (tmp_path / ".best.old").is_dir()   # ... moved nothing

    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    _save(d, 2.0, 2)                                         # the writer's second rename succeeds
    monkeypatch.undo()
    _check_consistent(seen[0], 1.0)                          # the reader got the old checkpoint, whole
    assert seen[0].path == tmp_path / ".best.old"
    _check_consistent(load_checkpoint(d), 2.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_a_save_during_a_load_gives_the_new_checkpoint_not_an_error(tmp_path, monkeypatch):
    """A whole save (both renames and the deletion of the backup) happens after the reader has read
    the manifest and before it reads the weights."""
    d = tmp_path / "last"
    _save(d, 1.0, 1)
    real = ckpt_mod._read_manifest
    saves = []

    def read_manifest(*args, **kwargs):
        manifest = real(*args, **kwargs)
        if not saves:
            saves.append(_save(d, 2.0, 2))
        return manifest

    monkeypatch.setattr(ckpt_mod, "_read_manifest", read_manifest)
    ck = load_checkpoint(d)
    assert saves
    _check_consistent(ck, 2.0)
    saves.clear()
    manifest = ckpt_mod.verify_checkpoint(d)                 # the same holds for verify_checkpoint
    assert manifest["config"]["v"] == 2.0 and load_checkpoint(d).config["v"] == 2.0


def test_load_model_takes_the_tokenizer_of_the_same_save(tmp_path, corpus, monkeypatch):
    """load_model used to open the tokenizer by path after load_checkpoint returned: a save in
    between (or a folder read from the backup, then deleted) broke it.  It is read with the weights."""
    run = tmp_path / "R"
    assert train(corpus, run) == 0
    real = ckpt_mod.load_checkpoint
    gone = []

    def load_then_vanish(*args, **kwargs):
        ck = real(*args, **kwargs)
        shutil.rmtree(ck.path)                               # the writer deleted what was read
        gone.append(ck.path)
        return ck

    monkeypatch.setattr(ckpt_mod, "load_checkpoint", load_then_vanish)
    model, tok, ck = load_model(run)
    monkeypatch.undo()
    assert gone and tok is not None and tok.decode(tok.encode("To be")) == "To be"


_READER = r"""
import json, sys, time
from pathlib import Path
from transformer.checkpoint import load_checkpoint, load_model
run, stop, limit = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
loads, errors, steps, t_end = {"best": 0, "last": 0, "from_backup": 0}, [], set(), time.time() + limit
while not stop.exists() and time.time() < t_end:
    for name in ("best", "last"):
        if not ((run / name).exists() or (run / f".{name}.old").exists()):
            continue                                  # nothing saved yet
        try:
            if name == "best":
                model, tok, ck = load_model(run)      # what generate.py does
                assert tok is not None and sum(p.numel() for p in model.parameters()) > 0
            else:
                model, tok, ck = load_model(run / "last", load_train_state=True)
                steps.add(ck.train_state["step"])
                assert tok is not None and ck.train_state["optimizer"]["state"]
            loads[name] += 1
            loads["from_backup"] += ck.path.name.endswith(".old")   # read between the writer's renames
        except BaseException as e:
            errors.append(f"{name}: {type(e).__name__}: {e}")
print(json.dumps({"loads": loads, "errors": errors[:5], "n_errors": len(errors), "steps": sorted(steps)}))
"""


def test_stress_readers_in_a_loop_beside_a_run_saving_every_step(corpus, tmp_path):
    run, stop = tmp_path / "R", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(run), str(stop), "120"], cwd=REPO, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        trainer = subprocess.run([sys.executable, "train.py", *FAST, "--max-steps", "20", "--eval-interval", "1",
                                  "--data", str(corpus), "--out-dir", str(run)], cwd=REPO, env=env(),
                                 capture_output=True, text=True, timeout=120)
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    assert trainer.returncode == 0, trainer.stderr[-3000:]
    assert reader.returncode == 0, err
    result = json.loads(out)
    assert result["n_errors"] == 0, result            # "from_backup": loads made between the two renames
    assert result["loads"]["best"] >= 3 and result["loads"]["last"] >= 3, result
    assert len(result["steps"]) >= 2                         # the reader saw the run move on
    assert sorted(p.name for p in run.iterdir()) == ["best", "last", "log.jsonl", "metrics.json", "tokenizer.json"]


def test_reader_after_a_kill_in_a_save_reads_the_backup_and_resume_restores_it(corpus, tmp_path):
    run = tmp_path / "R"
    killed = subprocess.run([sys.executable, "train.py", *FAST, "--data", str(corpus), "--out-dir", str(run),
                             "--debug-sigkill-in-save", "2"], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not (run / "last").exists() and (run / ".last.old").is_dir()
    ck = load_checkpoint(run / "last")                       # the reader gets the complete backup ...
    assert ck.train_state["step"] == 2 and ck.path == run / ".last.old"
    ckpt_mod.verify_checkpoint(run / "last")
    assert not (run / "last").exists() and (run / ".last.old").is_dir()   # ... and leaves it in place
    assert train(corpus, run, "--resume") == 0                # the writer restores it, then goes on
    assert load_checkpoint(run / "last").train_state["step"] == 4
    assert not list(run.glob(".last*")) and log_steps(run) == [2, 4]


def test_recover_checkpoint_is_the_writers_cleanup(tmp_path):
    """What the writer does at its next start after each kind of interrupted save."""
    d, backup = tmp_path / "last", tmp_path / ".last.old"
    _save(d, 1.0, 1)
    os.rename(d, backup)                                     # killed between the renames
    (tmp_path / ".last.tmp-123-abcd").mkdir()                # ... with the new one written, not moved in
    assert len(ckpt_mod.recover_checkpoint(d)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    _check_consistent(load_checkpoint(d), 1.0)
    shutil.copytree(d, backup)                               # killed while deleting the backup
    assert ckpt_mod.recover_checkpoint(d) and sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert ckpt_mod.recover_checkpoint(d) == []              # nothing to do
    os.rename(d, backup)
    (backup / "model.safetensors").write_bytes(b"damaged")  # a backup that is not complete is not restored
    with pytest.raises(ckpt_mod.CheckpointError, match="corrupt"):
        ckpt_mod.recover_checkpoint(d)
    assert backup.is_dir() and not d.exists()


def test_failed_second_rename_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    _save(d, 1.0, 1)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ck.tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    with pytest.raises(OSError):
        _save(d, 2.0, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    _check_consistent(load_checkpoint(d), 1.0)


# ---- 3. resume is not blocked by the log or by a full disk ------------------------------------------

def test_resume_drops_a_torn_last_log_line(corpus, tmp_path, capsys):
    run = tmp_path / "R"
    killed = subprocess.run([sys.executable, "train.py", *FAST, "--data", str(corpus), "--out-dir", str(run),
                             "--debug-sigkill-at-step", "3"], cwd=REPO, env=env(), capture_output=True, text=True,
                            timeout=120)
    assert killed.returncode == -9, killed.stderr
    with open(run / "log.jsonl", "ab") as f:
        f.write(b'{"step": 4, "train_loss": 3.1, "val_lo')  # what a full disk leaves
    capsys.readouterr()
    assert train(corpus, run, "--resume") == 0
    err = capsys.readouterr().err
    assert "log.jsonl" in err and "torn" in err
    assert log_steps(run) == [2, 4]
    # a damaged line in the middle is not what a crash leaves: refused, naming the line
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
    with pytest.raises(SystemExit, match=r"log\.jsonl.* line 2 is not valid JSON"):
        train(corpus, run, "--resume")


def _fail_checkpoint_write(monkeypatch, code, nth=2):
    """Make the ``nth`` write of last/ fail with ``code`` (after writing half of its first file)."""
    real = ckpt_mod._write_synced
    count = {"n": 0}

    def write(path, data):
        if path.parent.name.startswith(".last.tmp-") and path.name == "model.safetensors":
            count["n"] += 1
            if count["n"] == nth:
                real(path, data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
        return real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_synced", write)


def _fail_log_append(monkeypatch, code):
    real = train_script.RunFiles.append_log

    def append(self, record):
        if record["step"] == 4:
            with open(self.log, "a") as f:
                f.write(json.dumps(record)[:20])             # a torn line, then the disk is full
            raise OSError(code, os.strerror(code))
        return real(self, record)

    monkeypatch.setattr(train_script.RunFiles, "append_log", append)


def _fail_tokenizer(monkeypatch, code):
    from transformer.tokenizer import ByteTokenizer

    def save(self, directory):
        raise OSError(code, os.strerror(code), str(Path(directory) / "tokenizer.json"))

    monkeypatch.setattr(ByteTokenizer, "save", save)


def _fail_metrics(monkeypatch, code):
    real = run_dir._write_file

    def write(path, text):
        if path.name.startswith(".metrics.json"):
            real(path, text[: len(text) // 2])
            raise OSError(code, os.strerror(code))
        return real(path, text)

    monkeypatch.setattr(run_dir, "_write_file", write)


@pytest.mark.parametrize("site, code, where, step", [
    ("checkpoint", errno.ENOSPC, "last", 2),
    ("checkpoint", errno.EPERM, "last", 2),
    ("log", errno.ENOSPC, "log.jsonl", 2),
    ("metrics", errno.EACCES, "metrics.json", 4),
    ("tokenizer", errno.EROFS, "tokenizer.json", None),
])
def test_disk_errors_end_the_run_with_one_line_and_it_resumes(corpus, tmp_path, monkeypatch, capsys, site, code,
                                                              where, step):
    run = tmp_path / "R"
    {"checkpoint": _fail_checkpoint_write, "log": _fail_log_append, "tokenizer": _fail_tokenizer,
     "metrics": _fail_metrics}[site](monkeypatch, code)
    with pytest.raises(SystemExit) as e:
        train(corpus, run)
    monkeypatch.undo()
    message = str(e.value.code)
    assert "\n" not in message and message.startswith("error: ")
    assert str(run / where) in message and os.strerror(code).lower() in message.lower()
    assert errno.errorcode[code] in message
    if step is None:                                        # nothing saved yet
        assert "no checkpoint" in message and "--overwrite" in message
        assert train(corpus, run, "--overwrite") == 0
    else:
        assert f"the last checkpoint, {run / 'last'} (step {step}), is intact" in message
        assert f"--out-dir {run} --resume" in message
        assert load_checkpoint(run / "last").train_state["step"] == step
        assert not list(run.glob(".*"))                     # no half-written folder or file left
        capsys.readouterr()
        assert train(corpus, run, "--resume") == 0
        assert log_steps(run) == [2, 4]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4


_FULL_DISK = r"""
import errno, os, sys
import train
from transformer import checkpoint as c
real, n = c._write_synced, [0]
def write(path, data):
    if path.parent.name.startswith(".last.tmp-"):
        n[0] += 1
        if n[0] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(path, data)
c._write_synced = write
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_full_disk_in_a_subprocess_prints_no_traceback(corpus, tmp_path):
    run = tmp_path / "R"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, *FAST, "--data", str(corpus), "--out-dir", str(run)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: cannot write") and "ENOSPC" in proc.stderr and "intact" in proc.stderr


def _can_mount_tmpfs(tmp_path) -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"],
                          capture_output=True).returncode == 0


_REAL_FS = r"""
set -u
mount -t tmpfs -o size=8m tmpfs "$MNT" || exit 90
run="$MNT/R"
python train.py $ARGS --out-dir "$run" --debug-sigkill-at-step 3 > /dev/null 2>&1
echo "killed $?"
# 1. a full file system: fill it, resume, free it, resume
dd if=/dev/zero of="$MNT/filler" bs=64k > /dev/null 2>&1
python train.py $ARGS --out-dir "$run" --resume > /dev/null 2> "$MNT/../full.err"
echo "full $?"
echo "left:" $(ls -A "$run")
rm "$MNT/filler"
# 2. a read-only file system
mount -o remount,ro "$MNT"
python train.py $ARGS --out-dir "$run" --resume > /dev/null 2> "$MNT/../ro.err"
echo "readonly $?"
mount -o remount,rw "$MNT"
python train.py $ARGS --out-dir "$run" --resume > /dev/null 2> "$MNT/../ok.err"
echo "resumed $?"
python -c "import json; print('steps', json.load(open('$run/metrics.json'))['steps'])"
"""


def test_real_full_and_read_only_file_systems(corpus, tmp_path):
    """A private tmpfs (``unshare -m``): a real ENOSPC and a real EROFS on ``--resume``."""
    if not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs `unshare -m` and permission to mount a tmpfs (the simulated errors above still run)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = " ".join([*FAST, "--data", str(corpus)])
    proc = subprocess.run(["unshare", "-m", "sh", "-c", _REAL_FS], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(env(), MNT=str(mnt), ARGS=args))
    assert proc.stdout.splitlines() == ["killed 137", "full 1", "left: best last log.jsonl tokenizer.json",
                                        "readonly 1", "resumed 0", "steps 4"], \
        proc.stdout + proc.stderr
    full, ro = (tmp_path / "full.err").read_text(), (tmp_path / "ro.err").read_text()
    for err, name in ((full, "ENOSPC"), (ro, "EROFS")):
        assert err.count("\n") == 1 and "Traceback" not in err and name in err, err
        assert f"the last checkpoint, {mnt / 'R' / 'last'} (step 2), is intact" in err
