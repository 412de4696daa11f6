"""The run directory: what ``train.py`` writes, and what it promises never to lose.

A run directory (``--out-dir``, default ``out/``) holds one training run::

    best/              checkpoint with the lowest validation loss (what generate.py loads)
    last/              checkpoint of the latest evaluation, with the train state (for --resume)
    tokenizer.model    the run's tokenizer (tokenizer.json for the byte tokenizer)
    metrics.json       final numbers, written once at the end
    log.jsonl          one JSON line per evaluation, appended

and, for a moment, the backups and temporary files of its atomic writes (``.last.old``,
``.last.tmp-*``, ``.metrics.json.tmp-*``...).  Those names are :attr:`RunFiles.PATTERNS`: a
folder holding any of them *holds a run*.  Other files in the folder are never touched.

What each way of starting ``train.py`` may do to it:

* **A new run** refuses a folder that holds a run, before any process has written anything
  (:meth:`RunFiles.refuse_existing_run`): a repeated command or a typo must not replace hours
  of training.
* **--resume** continues the run in it.  The writer first tidies up after a save that was
  killed (:func:`~transformer.checkpoint.recover_checkpoint`; readers never move files), then
  drops the log lines of steps after the checkpoint it resumes from, including a torn last
  line, the one thing a crash in the middle of an append leaves (:meth:`RunFiles.truncate_log`).
* **--overwrite** deletes the old run's files, and only those, first (:meth:`RunFiles.remove_run`).
* Under all three, one process at a time: the writer holds an exclusive lock on the folder itself
  (``flock`` of the directory, no lock file) from before its first check to its exit, and a
  second ``train.py`` on the same ``--out-dir`` -- a new run racing the first one's checks, a
  ``--resume`` or an ``--overwrite`` of a run still training -- is refused (:meth:`RunFiles.lock`).
  The kernel drops the lock when the process ends, however it ends: no stale lock to clean up.
* Under all three, the run's inputs (``--data``, ``--teacher``, ``--tokenizer``) may not be, or
  lie inside, the run directory, nor may it lie inside ``--data``: the run would write over what
  it reads, or read its own log as text next time (:func:`check_inputs_outside`).

How files are written: checkpoints by renaming a finished folder into place
(:func:`~transformer.checkpoint.save_checkpoint`), the tokenizer and ``metrics.json`` by writing
a hidden temporary file and renaming it over the old one (:meth:`RunFiles.save_tokenizer`,
:func:`write_text_atomic`): a crash leaves the old version or the new, never half of one.
``log.jsonl`` is appended to, one line per evaluation, so a crash can tear its last line and
nothing else.

How disk errors are reported: a full disk, a read-only file system or a missing permission is
not a bug in the program but a state of the machine, and a traceback would bury the one thing
the user needs: which path, and what to do next.  ``train.py`` wraps each write in
:func:`writing`, which turns such an ``OSError`` (:data:`DISK_ERRORS`) into :class:`WriteFailed`
naming the path; it then exits with the one line of :func:`write_failure_message`: what failed
and why, whether the last checkpoint is intact (it is, if there is one: saves are atomic), and
the command that continues the run.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .checkpoint import CheckpointError, load_checkpoint, recover_checkpoint


def check_inputs_outside(out_dir: str, inputs: Mapping[str, Optional[str]]) -> None:
    """``ValueError`` if ``out_dir`` is (after resolving links) or holds one of ``inputs``
    (``{flag name: path or None}``, e.g. ``{"data": ..., "teacher": ..., "tokenizer": ...}``), or
    lies inside the ``data`` folder: the run would write over what it reads (or, next time, read
    its own log as text).  Cost: one ``resolve`` per path."""
    out = Path(out_dir).expanduser().resolve()
    for flag, value in inputs.items():
        if value is None:
            continue
        path = Path(value).expanduser().resolve()
        if path == out:
            raise ValueError(f"--out-dir {out_dir!r} and --{flag} {value!r} are the same folder: this run "
                             f"would write over what it reads; choose another --out-dir")
        if out in path.parents:
            raise ValueError(f"--{flag} {value!r} is inside --out-dir {out_dir!r}: this run would write over "
                             f"what it reads; choose another --out-dir")
        if flag == "data" and path in out.parents:
            raise ValueError(f"--out-dir {out_dir!r} is inside --data {value!r}: the run's own files "
                             f"(log.jsonl, metrics.json) would become part of the corpus; choose an --out-dir "
                             f"outside it")


# ---- small files, written atomically ---------------------------------------------------------

def _write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it: on disk, not only in the page cache, when this returns."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (via ``.<name>.tmp-<pid>``): a crash or a full disk
    leaves the old file or the new one, and no temporary file.  Cost: one write, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """:func:`write_text_atomic` of ``obj`` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


# ---- disk errors: one line, not a traceback --------------------------------------------------

#: Write errors that end a run with one line instead of a traceback: errno -> what to do about it.
DISK_ERRORS = {errno.ENOSPC: "free some space", errno.EROFS: "make it writable",
               errno.EACCES: "fix its permissions", errno.EPERM: "fix its permissions"}
if hasattr(errno, "EDQUOT"):
    DISK_ERRORS[errno.EDQUOT] = "free some space (disk quota)"


class WriteFailed(Exception):
    """Writing ``path`` failed with one of :data:`DISK_ERRORS` (``error``: the ``OSError``)."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(f"{path}: {error}")
        self.path, self.error = Path(path), error


@contextlib.contextmanager
def writing(path: Path):
    """Name the file being written in the disk errors that escape the block: an ``OSError`` in
    :data:`DISK_ERRORS` becomes :class:`WriteFailed` (``path``); any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise WriteFailed(path, e) from e
        raise


def write_failure_message(failure: WriteFailed, files: "RunFiles") -> str:
    """One line: what could not be written and why, the state of the last checkpoint, what next.
    Cost: reads the last checkpoint back (its step), if there is one."""
    code = failure.error.errno
    what = f"error: cannot write {failure.path}: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
    fix = DISK_ERRORS[code]
    if not (files.last.is_dir() or (files.root / ".last.old").is_dir()):
        return (f"{what}; no checkpoint of this run was written yet: {fix}, then start it again with the same "
                f"command and --overwrite")
    try:
        step = (load_checkpoint(files.last).train_state or {}).get("step", "?")
    except CheckpointError as e:
        return f"{what}; the last checkpoint, {files.last}, could not be read back either: {e}"
    return (f"{what}; the last checkpoint, {files.last} (step {step}), is intact: {fix}, then continue with: "
            f"python train.py --out-dir {files.root} --resume")


# ---- the run's files -------------------------------------------------------------------------

class RunFiles:
    """Where a run writes (rank 0 only): ``best/``, ``last/``, tokenizer, ``metrics.json``, ``log.jsonl``.

    Its methods report disk errors as plain ``OSError``; callers wrap them in :func:`writing` to
    name the path.
    """

    #: Everything a run writes in its directory, with the backups and temporary files of its
    #: atomic writes: what makes a folder "hold a run", and what --overwrite deletes.
    PATTERNS = ("best", "last", ".best.old", ".last.old", ".best.tmp-*", ".last.tmp-*", "tokenizer.model",
                "tokenizer.json", ".tokenizer.tmp-*", "metrics.json", ".metrics.json.tmp-*", "log.jsonl",
                ".log.jsonl.tmp-*")

    def __init__(self, out_dir: str):
        self._lock_fd: Optional[int] = None
        self.root = Path(out_dir)
        self.best, self.last = self.root / "best", self.root / "last"
        self.metrics, self.log = self.root / "metrics.json", self.root / "log.jsonl"

    def existing(self) -> List[Path]:
        """The run files already in the directory (none if it does not exist).  Cost: a few globs."""
        if not self.root.is_dir():
            return []
        return [p for pattern in self.PATTERNS for p in sorted(self.root.glob(pattern))]

    def _refuse_a_file(self) -> None:
        """``SystemExit`` if ``--out-dir`` names a file (a folder is created when missing)."""
        if self.root.exists() and not self.root.is_dir():
            raise SystemExit(f"error: --out-dir {str(self.root)!r} is a file; expected a folder (created if missing)")

    def lock(self) -> None:
        """Take the folder for this process (creating it if missing), or ``SystemExit`` if another
        ``train.py`` holds it.  An exclusive, non-blocking ``flock`` of the directory itself, held
        until :meth:`unlock` or the process ends; nothing is written.  Where ``fcntl`` is missing
        (Windows) there is no lock."""
        try:
            import fcntl
        except ImportError:
            return
        self._refuse_a_file()
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SystemExit(f"error: --out-dir {self.root} is in use by another train.py (it holds the folder's "
                             f"lock); wait for that run to end, or choose another --out-dir") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release :meth:`lock` (the end of the process does it too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def refuse_existing_run(self) -> None:
        """``SystemExit`` unless the directory is free for a new run: nothing here has been written yet."""
        self._refuse_a_file()
        found = self.existing()
        if found:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
            raise SystemExit(f"error: --out-dir {self.root} already holds a run ({names}); continue it with "
                             f"--resume, replace it with --overwrite (its checkpoints, tokenizer and logs are "
                             f"deleted first), or choose another --out-dir")

    def remove_run(self) -> List[str]:
        """``--overwrite``: delete the run files (other files in the folder stay); their names."""
        found = self.existing()
        for p in found:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        return [p.name for p in found]

    def make_ready(self, resume: bool, overwrite: bool) -> List[str]:
        """Rank 0, before the run reads or writes anything: with ``resume``, tidy up after a killed
        save of ``best/`` or ``last/`` (``SystemExit`` if a backup is unreadable); with
        ``overwrite``, delete the old run.  Returns one line per thing done, for the log."""
        if resume:
            try:
                done = [line for d in (self.best, self.last) for line in recover_checkpoint(d)]
            except CheckpointError as e:
                raise SystemExit(f"error: --resume: {e}")
            return [f"--resume: {line}" for line in done]
        if overwrite and self.existing():
            return [f"--overwrite: deleted {', '.join(self.remove_run())} of the old run in {self.root}"]
        return []

    def save_tokenizer(self, tok, source: Optional[Path] = None) -> Path:
        """Save ``tok`` as ``tokenizer.model`` (or ``tokenizer.json``) atomically and return its path.

        Nothing is written if that file already holds ``source``'s bytes (the file or folder
        ``tok`` was loaded from: a resumed run's ``last/``), so resuming on a read-only disk gets
        as far as it can.  The other kind of tokenizer file is removed: one tokenizer per run
        directory.  Cost: reads both files to compare them (a few hundred KB at most).
        """
        target = self.root / tok.FILENAME
        if source is not None and source.is_dir():
            source = source / target.name
        same = (source is not None and source.name == target.name and source.is_file() and target.is_file()
                and source.read_bytes() == target.read_bytes())
        if not same:
            tmp = self.root / f".tokenizer.tmp-{os.getpid()}"
            try:
                os.replace(tok.save(tmp), target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for name in ("tokenizer.model", "tokenizer.json"):
            if name != target.name and (self.root / name).exists():
                (self.root / name).unlink()
        return target

    def start_log(self) -> None:
        """A new run: create the directory and an empty ``log.jsonl``."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.log, "")

    def append_log(self, record: Dict[str, Any]) -> None:
        """One evaluation's ``record`` as a JSON line (a crash mid-append tears only this line)."""
        with open(self.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_log(self, after_step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (the killed run's tail).

        A last line that is not valid JSON is what a crash or a full disk leaves in the middle of
        an append: it is dropped, with a note on stderr.  An invalid line elsewhere is not, and
        stops the resume with its line number.  The log is rewritten atomically, and only if it
        changes.  Cost: reads and parses the whole log.
        """
        if not self.log.exists():
            return
        raw = self.log.read_bytes()
        lines = [(i, ln) for i, ln in enumerate(raw.split(b"\n"), 1) if ln.strip()]
        keep = []
        for k, (i, line) in enumerate(lines):
            try:
                record = json.loads(line.decode("utf-8"))
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, expected an object")
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if k == len(lines) - 1:
                    print(f"note: {self.log}: dropped its torn last line (line {i}, {len(line)} bytes of an "
                          f"interrupted write)", file=sys.stderr)
                    continue
                raise SystemExit(f"error: --resume: {self.log} line {i} is not valid JSON ({e}); only a torn "
                                 f"last line is dropped automatically: repair or delete that line")
            if record.get("step", 0) <= after_step:
                keep.append(line.decode("utf-8") + "\n")
        text = "".join(keep)
        if text.encode("utf-8") != raw:
            write_text_atomic(self.log, text)
