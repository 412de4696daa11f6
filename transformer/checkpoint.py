"""Checkpoints that are safe to load and safe to write.

Safe to load: nothing is ever unpickled.  ``torch.save`` files are pickles, and unpickling runs
whatever code the file asks for, so a downloaded ``.pt`` can own your machine.  Here tensors live
in ``safetensors`` files (a JSON header plus raw bytes) and everything else in JSON.

Safe to write: a crash (exception, Ctrl-C, ``kill -9``, power cut) at any moment of
:func:`save_checkpoint` leaves either the previous checkpoint or the new one, never a mixture.

Safe to read while it is written: readers never move or delete anything, so they cannot get in
the writer's way; a reader racing a save gets the old or the new checkpoint, complete, never a
"missing file" (see :func:`load_checkpoint`).  Tidying up after a killed save is the writer's
job, at its next start (:func:`recover_checkpoint`).

Layout of a checkpoint directory::

    model.safetensors        the model's state_dict (tensor name -> tensor)
    train_state.json         optional: optimizer / scheduler / RNG / data position, as a JSON
    train_state.safetensors     skeleton whose tensors are stored here under flattened keys
    tokenizer.model ...      optional extra files copied in (``extra_files``)
    config.json              written last: the manifest (see below)

``config.json``::

    {"format": "kvcache-transformer-checkpoint", "format_version": 1, "model_type": "decoder",
     "created": "2025-01-01T12:00:00+00:00", "torch_version": "2.x",
     "config": {...ModelConfig.to_dict()...},
     "files": {"model.safetensors": {"sha256": "...", "size": 1234}, ...}}
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors.torch import load as st_load, save as st_save

FORMAT = "kvcache-transformer-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "config.json"
MODEL_FILE = "model.safetensors"
TRAIN_JSON = "train_state.json"
TRAIN_TENSORS = "train_state.safetensors"
_RESERVED = {MANIFEST, MODEL_FILE, TRAIN_JSON, TRAIN_TENSORS}
_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"}


class CheckpointError(Exception):
    """A checkpoint directory is missing, corrupt, or not in this project's format."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    ``model_state``: name -> tensor (on the requested device), ready for ``load_state_dict``.
    ``config``: the config dict given to :func:`save_checkpoint` (e.g. ``ModelConfig.to_dict()``).
    ``train_state``: the nested train state exactly as saved (tensors on CPU), or ``None``.
    ``path``: the directory it was read from (the ``.<name>.old`` backup if a save was between
    its renames).  ``model_type``: e.g. ``"decoder"``.
    ``metadata``: the rest of the manifest (``format_version``, ``created``, ``files``...).
    ``extra_data``: the extra files' bytes (e.g. the tokenizer), verified and read together
    with the weights, so they belong to the same save even if the folder is replaced later.
    """

    model_state: Dict[str, torch.Tensor]
    config: Dict[str, Any]
    train_state: Optional[Dict[str, Any]]
    path: Path
    model_type: str = "decoder"
    metadata: Dict[str, Any] = field(default_factory=dict)
    extra_data: Dict[str, bytes] = field(default_factory=dict)

    @property
    def extra_files(self) -> Dict[str, Path]:
        """Extra files saved alongside (e.g. ``{"tokenizer.model": path}``), by name.  Paths into
        ``path``, which a later save may replace: :attr:`extra_data` holds the bytes read."""
        return {n: self.path / n for n in self.metadata.get("files", {}) if n not in _RESERVED}


# ---- train_state <-> (JSON skeleton, flat tensor dict) ---------------------------------------

def _is_marker(k: str) -> bool:
    return k.startswith("__") and k.endswith("__")


def flatten_state(obj: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """Split a nested state into a JSON-able skeleton and a flat ``{key: tensor}`` dict.

    Tensors become ``{"__tensor__": "optimizer/state/0/exp_avg"}`` (numpy arrays
    ``{"__ndarray__": key}``); tuples ``{"__tuple__": [...]}``; dicts whose keys are not all
    plain strings (an optimizer's ``state`` is keyed by int) ``{"__items__": [[key, value], ...]}``.
    ``None``, bools, ints, floats (including inf/nan) and strings are stored as themselves, so
    ``unflatten_state(*flatten_state(x))`` equals ``x`` in value *and* type (except numpy
    scalars, which come back as the equal Python number).
    Anything else raises ``TypeError`` naming where it was found: arbitrary objects are
    exactly what we refuse to pickle.
    """
    tensors: Dict[str, torch.Tensor] = {}
    seen_storage: set = set()

    def key_for(path: str) -> str:
        key, n = path or "tensor", 1
        while key in tensors:
            key, n = f"{path}#{n}", n + 1
        return key

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = key_for(path)
            tensors[key] = _storable(x, seen_storage)
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = key_for(path)
            tensors[key] = torch.from_numpy(np.array(x, copy=True, order="C"))
            return {"__ndarray__": key}
        if isinstance(x, np.generic):
            return x.item()
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not _is_marker(k) for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            return {"__items__": [[walk(k, f"{path}/key"), walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise TypeError(f"train_state{path or ''} is a {type(x).__module__}.{type(x).__name__}; checkpoints "
                        f"store only tensors, numpy arrays, dict/list/tuple, str, int, float, bool and None "
                        f"(convert it, e.g. with .state_dict())")

    return walk(obj, ""), tensors


def unflatten_state(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if len(skeleton) == 1:
            (k, v), = skeleton.items()
            if k == "__tensor__":
                return tensors[v]
            if k == "__ndarray__":
                return tensors[v].numpy()
            if k == "__tuple__":
                return tuple(unflatten_state(i, tensors) for i in v)
            if k == "__items__":
                return {_hashable(unflatten_state(a, tensors)): unflatten_state(b, tensors) for a, b in v}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


def _hashable(k: Any) -> Any:
    return tuple(_hashable(i) for i in k) if isinstance(k, list) else k


def _storable(t: torch.Tensor, seen_storage: set) -> torch.Tensor:
    # safetensors refuses tensors that share memory (tied embeddings) or are non-contiguous.
    t = t.detach().cpu()
    ptr = t.untyped_storage().data_ptr() if t.numel() else None
    if ptr is not None and ptr in seen_storage or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
    if ptr is not None:
        seen_storage.add(ptr)
    return t


# ---- writing ---------------------------------------------------------------------------------

def _write_synced(path: Path, data: bytes) -> Dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _fsync_dir(path: Path) -> None:
    try:  # makes renames and new directory entries durable; not possible on Windows
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _siblings(directory: Path) -> Tuple[Path, str]:
    return directory.parent / f".{directory.name}.old", f".{directory.name}.tmp-"


def _looks_like_ours(directory: Path) -> bool:
    try:
        return not any(directory.iterdir()) or FORMAT.encode() in (directory / MANIFEST).read_bytes()
    except OSError:
        return False


def save_checkpoint(directory: Union[str, Path], model_state: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any], train_state: Optional[Mapping[str, Any]] = None,
                    extra_files: Optional[Mapping[str, Union[str, Path]]] = None,
                    model_type: str = "decoder") -> Path:
    """Write a checkpoint to ``directory`` atomically and return its path.

    Args:
        model_state: ``model.state_dict()``; tensors are moved to CPU (tied weights are stored
            once per name, so loading gives each name its own copy of the shared tensor).
        config: JSON-able dict, e.g. ``ModelConfig.to_dict()``.
        train_state: nested dict for resuming, e.g. ``{"optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "data": ds.state_dict(),
            "step": 1200}``; see :func:`flatten_state` for what it may contain.
        extra_files: ``{name_in_checkpoint: source_path}`` copied in, e.g. the tokenizer.
        model_type: which model class the weights belong to (``"decoder"``, ``"encoder_decoder"``).

    How the write stays atomic: everything goes into a fresh hidden sibling folder
    ``.<name>.tmp-<pid>-<random>``; each file is fsynced; the manifest ``config.json`` (with
    every file's sha256) is written last.  Then the old checkpoint is renamed to
    ``.<name>.old``, the new folder is renamed to ``<name>``, and the backup is deleted.
    Renames are atomic, so a crash leaves ``<name>`` complete (old or new) or, between the two
    renames, missing with a complete ``.<name>.old``: readers then read the backup
    (:func:`load_checkpoint`), and the writer's next start puts it back (:func:`recover_checkpoint`).
    An exception between the renames (e.g. the disk turned read-only) puts the old folder back at
    once when it can.  One writer per directory is assumed (a save deletes stale temp folders of
    earlier crashes); any number of readers may run at the same time.

    Raises ``CheckpointError`` if ``directory`` exists and is a non-empty folder that is not a
    checkpoint (so a typo cannot replace your documents), ``TypeError`` for unstorable state.
    Cost: one serialisation, write and fsync of every byte; sha256 at ~1 GB/s.
    """
    directory = Path(os.path.abspath(directory))  # "." or "a/../b" need a real name for the siblings
    if not model_type or not isinstance(model_type, str):
        raise ValueError(f"model_type must be a non-empty str, got {model_type!r}")
    if directory.exists() and not (directory.is_dir() and _looks_like_ours(directory)):
        raise CheckpointError(f"refusing to overwrite {str(directory)!r}: it exists and is not a checkpoint "
                              f"written by save_checkpoint; choose another directory or remove it")
    extra_files = dict(extra_files or {})
    for name in extra_files:
        if name in _RESERVED or name.startswith(".") or Path(name).name != name:
            raise ValueError(f"extra_files name {name!r} must be a plain file name, not starting with '.', "
                             f"and not one of {sorted(_RESERVED)}")
    for name, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(value).__name__}; expected a tensor")

    directory.parent.mkdir(parents=True, exist_ok=True)
    backup, tmp_prefix = _siblings(directory)
    for stale in directory.parent.glob(tmp_prefix + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.parent / f"{tmp_prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    moved_aside = False
    try:
        seen: set = set()
        files = {MODEL_FILE: _write_synced(tmp / MODEL_FILE, st_save(
            {k: _storable(v, seen) for k, v in model_state.items()},
            metadata={"order": json.dumps(list(model_state))}))}  # safetensors sorts names
        if train_state is not None:
            skeleton, tensors = flatten_state(dict(train_state))
            files[TRAIN_TENSORS] = _write_synced(tmp / TRAIN_TENSORS, st_save(tensors))
            files[TRAIN_JSON] = _write_synced(tmp / TRAIN_JSON, json.dumps(skeleton).encode())
        for name, source in extra_files.items():
            files[name] = _write_synced(tmp / name, Path(source).read_bytes())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_type": model_type,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "torch_version": torch.__version__, "config": dict(config), "files": files}
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=2).encode())
        _fsync_dir(tmp)
        # The swap.  Each rename is atomic; see the docstring for every crash point.
        if directory.exists():
            if backup.exists():
                shutil.rmtree(backup)  # leftover of a crash while deleting it; directory is good
            os.rename(directory, backup)
            moved_aside = True
            _fsync_dir(directory.parent)
        os.rename(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not os.path.lexists(directory):
            try:  # failed between the renames: the old checkpoint goes back where readers look first
                os.rename(backup, directory)
            except OSError:
                pass  # readers still find it as the backup; recover_checkpoint retries at the next start
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return directory


# ---- reading ---------------------------------------------------------------------------------

#: With directory file descriptors (POSIX) a reader opens every file inside the folder it opened,
#: even after the writer renamed that folder aside: one load sees one save.  Elsewhere files are
#: opened by path, and a folder replaced mid-read is noticed by its identity (device, inode).
_DIR_FD = os.open in os.supports_dir_fd and os.listdir in os.supports_fd
#: How many times a load starts again because a save replaced the folder while it was read.
_READ_ATTEMPTS = 20


class _OpenDir:
    """One checkpoint folder, opened for reading only: readers never move or delete anything."""

    def __init__(self, path: Path, backup_of: Optional[Path] = None):
        self.path, self.backup_of, self.fd = path, backup_of, None
        if _DIR_FD:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            st = os.fstat(self.fd)
        else:
            st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            self.close()
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(path))
        self.identity = (st.st_dev, st.st_ino)

    def read(self, name: str) -> Optional[bytes]:
        """The bytes of file ``name`` in this folder, or ``None`` if it has no such file."""
        try:
            if self.fd is None:
                return (self.path / name).read_bytes()
            with open(os.open(name, os.O_RDONLY, dir_fd=self.fd), "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def names(self) -> list:
        return sorted(os.listdir(self.path if self.fd is None else self.fd))

    def replaced(self) -> bool:
        """Does the path no longer name the folder that was opened (renamed aside, deleted, swapped)?
        A backup counts as replaced as soon as the checkpoint it backs up is back: the writer is
        about to delete it (or is deleting it: the folder outlives its files for a moment)."""
        if self.backup_of is not None and os.path.lexists(self.backup_of):
            return True
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self.identity

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _open_checkpoint_dir(directory: Path) -> Optional[_OpenDir]:
    """Open ``directory`` or, while a save is between its two renames, its complete backup.

    The writer's swap is ``rename(<name>, .<name>.old)``, ``rename(.<name>.tmp-*, <name>)``,
    ``rmtree(.<name>.old)``: at every instant one of the two names holds a complete checkpoint,
    so trying ``<name>`` and then the backup finds one, unless a whole save ran between the two
    tries (then ``<name>`` is back: try again).  ``None``: neither exists.
    """
    backup, _ = _siblings(directory)
    for _ in range(3):
        for path in (directory, backup):
            try:
                return _OpenDir(path, backup_of=directory if path == backup else None)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                if path == directory:
                    raise CheckpointError(f"{str(directory)!r} is a file; expected a checkpoint directory") from None
    return None


def _read_manifest(folder: _OpenDir) -> Dict[str, Any]:
    directory, raw = folder.path, folder.read(MANIFEST)
    path = directory / MANIFEST
    if raw is None:
        names = folder.names()
        pickles = [n for n in names if Path(n).suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(f"{str(directory)!r} is not a checkpoint of this project: it holds pickle files "
                                  f"{pickles} and no {MANIFEST}; pickles are never loaded here because "
                                  f"unpickling can run arbitrary code")
        raise CheckpointError(f"{str(directory)!r} is not a checkpoint of this project: no {MANIFEST} "
                              f"(found {names[:10]})")
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}): corrupt, or not written by "
                              f"save_checkpoint") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{str(directory)!r} is not a checkpoint of this project: {MANIFEST} lacks "
                              f"\"format\": \"{FORMAT}\" (a config from another library?)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(directory)!r} has format_version={manifest.get('format_version')!r}; "
                              f"this code reads format_version={FORMAT_VERSION}")
    if not isinstance(manifest.get("model_type"), str) or not manifest["model_type"]:
        raise CheckpointError(f"{str(path)!r} has no model_type; expected e.g. \"decoder\"")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files or not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{str(path)!r} is corrupt: expected a \"files\" table listing {MODEL_FILE} "
                              f"and a \"config\" object")
    return manifest


def _read_verified(folder: _OpenDir, name: str, manifest: Dict[str, Any]) -> bytes:
    path = folder.path / name
    expected = manifest["files"].get(name)
    if not isinstance(expected, dict):
        raise CheckpointError(f"checkpoint {str(folder.path)!r} is corrupt: its manifest does not list {name}")
    data = folder.read(name)
    if data is None:
        raise CheckpointError(f"checkpoint {str(folder.path)!r} is missing {name}, which its manifest lists")
    if len(data) != expected.get("size"):
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: {len(data)} bytes, expected "
                              f"{expected.get('size')} (truncated or overwritten)")
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt: its sha256 does not match the manifest")
    return data


def _load_in_order(data: bytes) -> Dict[str, torch.Tensor]:
    # A safetensors file starts with an 8-byte little-endian header length, then a JSON header.
    tensors = st_load(data)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    order = json.loads(header.get("__metadata__", {}).get("order", "[]"))
    return {k: tensors[k] for k in order} if sorted(order) == sorted(tensors) else tensors


def _read_checkpoint(directory: Path, wanted: Callable[[Dict[str, Any]], list],
                     hint: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, bytes], Path]:
    """``(manifest, {name: verified bytes}, folder read)`` for the files ``wanted(manifest)`` names.

    Every byte comes from one folder, so from one save.  If an error shows up *and* the folder
    was meanwhile replaced by a save (the writer deleted the backup a reader was reading, or,
    without directory descriptors, swapped files under it), the read starts again; an error in
    a folder nobody replaced is real and raised at once.
    """
    for attempt in range(_READ_ATTEMPTS):
        folder = _open_checkpoint_dir(directory)
        if folder is None:
            raise CheckpointError(f"checkpoint directory {str(directory)!r} does not exist"
                                  + (f"; {hint}" if hint else ""))
        try:
            manifest = _read_manifest(folder)
            data = {name: _read_verified(folder, name, manifest) for name in wanted(manifest)}
            return manifest, data, folder.path
        except CheckpointError:
            if not folder.replaced():
                raise
        finally:
            folder.close()
        time.sleep(0.001 * (attempt + 1))  # a save is under way: give it a moment
    raise CheckpointError(f"checkpoint {str(directory)!r} was replaced {_READ_ATTEMPTS} times while being read; "
                          f"is something saving it faster than it can be read?")


def verify_checkpoint(directory: Union[str, Path]) -> Dict[str, Any]:
    """Check the manifest and every listed file's size and sha256; return the manifest.

    Reads like :func:`load_checkpoint` (the backup while a save is between its renames; again if
    a save replaced the folder mid-read).  Raises :class:`CheckpointError` on any problem.
    Cost: reads every byte once.
    """
    return _read_checkpoint(Path(os.path.abspath(directory)), lambda m: list(m["files"]))[0]


def load_checkpoint(directory: Union[str, Path], device: Union[str, torch.device] = "cpu",
                    hint: Optional[str] = None, load_train_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Args:
        device: where model tensors go (train-state tensors stay on CPU; RNG states must).
        hint: appended to the "does not exist" error, e.g.
            ``"create it with: python train.py --out-dir out/shakespeare"``.
        load_train_state: ``False`` skips (and does not verify) the train state: faster for
            inference, which only needs the weights.

    Safe beside a writer saving the same directory: nothing is moved or deleted, and the result
    is the checkpoint before or after a concurrent save, complete.  If ``directory`` is missing
    but its ``.<name>.old`` backup exists (a save is between its two renames, or was killed
    there), the backup is read in place (``Checkpoint.path`` says so).  Extra files (the
    tokenizer) are read with the weights: ``Checkpoint.extra_data``.

    Raises :class:`CheckpointError` for a missing directory, a foreign folder (no manifest,
    another library's ``config.json``, pickles), an unsupported ``format_version``, a missing
    file, or a file whose size or sha256 differs from the manifest ("corrupt").
    Only JSON and safetensors are parsed: loading never runs code from the checkpoint.
    Cost: reads and hashes every byte once.
    """
    directory = Path(os.path.abspath(directory))

    def wanted(manifest):  # extras too: a missing tokenizer is found now, not later
        names = [n for n in manifest["files"] if n not in (TRAIN_JSON, TRAIN_TENSORS)]
        if load_train_state and TRAIN_JSON in manifest["files"]:
            names += [TRAIN_JSON, TRAIN_TENSORS]
        return names

    manifest, data, path = _read_checkpoint(directory, wanted, hint)
    try:
        model_state = _load_in_order(data.pop(MODEL_FILE))
        train_state = None
        if TRAIN_JSON in data:
            skeleton = json.loads(data.pop(TRAIN_JSON))
            train_state = unflatten_state(skeleton, st_load(data.pop(TRAIN_TENSORS)))
    except Exception as e:  # checksums matched, yet unparsable: written by something else
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: {type(e).__name__}: {e}") from None
    if torch.device(device).type != "cpu":
        model_state = {k: v.to(device) for k, v in model_state.items()}
    meta = {k: v for k, v in manifest.items() if k not in ("config", "model_type")}
    return Checkpoint(model_state, manifest["config"], train_state, path, manifest["model_type"], meta, data)


def recover_checkpoint(directory: Union[str, Path]) -> list:
    """Tidy ``directory`` after an interrupted save: for the *writer*, at its start, before it saves.

    * ``<name>`` missing, ``.<name>.old`` present (killed between the two renames): the backup is
      verified and renamed back.
    * both present (killed while deleting the backup): the backup is deleted.
    * ``.<name>.tmp-*`` folders (killed while writing): deleted.

    Readers never do this: they read the backup in place.  (A reader that renamed the backup
    back while the writer was between its renames made the writer's second rename fail.)
    Returns one sentence per thing done, for the log.
    """
    directory = Path(os.path.abspath(directory))
    backup, tmp_prefix = _siblings(directory)
    done = []
    if backup.is_dir():
        if not os.path.lexists(directory):
            verify_checkpoint(backup)
            os.rename(backup, directory)
            _fsync_dir(directory.parent)
            done.append(f"restored {directory} from {backup.name}, left by an interrupted save")
        elif directory.is_dir():  # the new checkpoint is in place (anything else: leave both alone)
            shutil.rmtree(backup)
            done.append(f"deleted {backup}, a backup an interrupted save left behind")
    for stale in sorted(directory.parent.glob(tmp_prefix + "*")):
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"deleted {stale}, a checkpoint an interrupted save had not finished")
    return done


# ---- whole models ----------------------------------------------------------------------------

#: ``model_type`` written by :func:`save_model` for each model class (and read by :func:`load_model`).
MODEL_TYPES = {"DecoderOnlyTransformer": "decoder", "EncoderDecoderTransformer": "encoder_decoder"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def save_model(directory: Union[str, Path], model: torch.nn.Module, train_state: Optional[Mapping[str, Any]] = None,
               extra_files: Optional[Mapping[str, Union[str, Path]]] = None) -> Path:
    """Save a ``DecoderOnlyTransformer`` / ``EncoderDecoderTransformer`` with its ``ModelConfig``.

    A thin layer over :func:`save_checkpoint` that fills in ``config`` and ``model_type`` from
    the model itself, so :func:`load_model` can rebuild it with nothing else.  Unwraps
    ``torch.compile`` (``_orig_mod``) and ``DistributedDataParallel`` (``module``) wrappers.
    Pass the tokenizer as ``extra_files={"tokenizer.model": path}`` to make the folder
    self-contained.
    """
    model = unwrap_model(model)
    name = type(model).__name__
    if name not in MODEL_TYPES:
        raise TypeError(f"save_model takes one of {sorted(MODEL_TYPES)}, got {name}")
    return save_checkpoint(directory, model.state_dict(), model.config.to_dict(), train_state, extra_files,
                           model_type=MODEL_TYPES[name])


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside ``torch.compile`` / ``DistributedDataParallel`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def resolve_run_dir(directory: Union[str, Path]) -> Path:
    """A ``train.py`` run directory (``out/``, holding ``best/`` and ``last/``) means its ``best/``;
    anything else (a checkpoint directory such as ``out/last``) is returned unchanged."""
    root = Path(directory)
    if not (root / MANIFEST).is_file() and ((root / "best").is_dir() or (root / ".best.old").is_dir()):
        return root / "best"
    return root


def load_model(directory: Union[str, Path], device: Union[str, torch.device] = "cpu",
               hint: Optional[str] = None, load_train_state: bool = False):
    """Rebuild the model (and its tokenizer, if saved) from a :func:`save_model` checkpoint.

    ``directory`` may also be a ``train.py`` run directory: its ``best/`` is loaded
    (:func:`resolve_run_dir`).  Returns ``(model, tokenizer_or_None, checkpoint)``; the model is
    in eval mode on ``device``.
    Raises :class:`CheckpointError` for anything :func:`load_checkpoint` rejects, an unknown
    ``model_type``, a config that is not a valid ``ModelConfig``, or weights that do not fit it.
    Nothing is unpickled.
    """
    from .config import ModelConfig
    from .encoder_decoder import EncoderDecoderTransformer
    from .model import DecoderOnlyTransformer
    from .tokenizer import ByteTokenizer, Tokenizer

    classes = {"decoder": DecoderOnlyTransformer, "encoder_decoder": EncoderDecoderTransformer}
    ckpt = load_checkpoint(resolve_run_dir(directory), device="cpu", hint=hint, load_train_state=load_train_state)
    if ckpt.model_type not in classes:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has model_type={ckpt.model_type!r}; "
                              f"expected one of {sorted(classes)}")
    try:
        config = ModelConfig.from_dict(ckpt.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r} has an invalid model config: {e}") from None
    model = classes[ckpt.model_type](config)
    try:
        model.load_state_dict(ckpt.model_state, strict=True)
    except RuntimeError as e:
        problems = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {str(ckpt.path)!r}: its weights do not fit its config: "
                              f"{problems[0] if problems else e}{more}; was it written by another version "
                              f"of this code?") from None
    tokenizer = None
    for name in TOKENIZER_FILES:
        if name in ckpt.extra_data:  # the bytes read with the weights: the folder may be gone by now
            cls = Tokenizer if name == Tokenizer.FILENAME else ByteTokenizer
            try:
                tokenizer = cls.from_bytes(ckpt.extra_data[name], source=ckpt.path / name)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {str(ckpt.path)!r}: its {name} is unusable: {e}") from None
            break
    return model.to(device).eval(), tokenizer, ckpt

