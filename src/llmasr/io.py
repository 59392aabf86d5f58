"""Reading checkpoints safely, loading state dicts strictly, writing files atomically.

Every file this toolkit reads with ``torch.load`` goes through :func:`load_torch_file`, every strict
state-dict load through :func:`load_state_dict_strict`, and every file it writes through
:func:`atomic_write` (or its ``torch.save`` / text / JSON shorthands).

Loading: ``torch.load(weights_only=True)`` plus the few Python globals real checkpoints contain
(:data:`SAFE_GLOBALS`). Unpickling anything else could run code, so such a file is refused with a
one-line error naming the file and the global; a file the user trusts is opted in by listing it
(or a directory holding it) in the environment variable ``LLMASR_TRUST_CHECKPOINTS``
(``os.pathsep``-separated), which loads it with full unpickling.

Writing: the data goes to a file of the destination's name inside ``.<name>.<8 random hex>.tmp/``
in the destination's directory, is fsync'ed and renamed over the destination, so readers see the
old file or the new one, never a partial one. Modes are ``0o666`` / ``0o777`` minus the umask
(``0644`` under umask 022), like any other file the user writes: a checkpoint another user's decode
must read is not private (``mkstemp`` made it 0600). The writer holds an ``flock`` on the
temporary directory, so :func:`prune_stale_temp_files` can tell the leftovers of a killed process
from a write in progress.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import logging
import os
import pathlib
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

PathLike = Union[str, os.PathLike]

TRUST_ENV = "LLMASR_TRUST_CHECKPOINTS"


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint that cannot be used: unreadable, refused as unsafe, or not matching the model.

    (Both a RuntimeError and a ValueError: callers written against either keep working.)"""


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

try:  # numpy >= 2 moved the pickled helpers to numpy._core; files written by numpy 1.x name numpy.core
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray


def _path_class(name: str):
    # A path pickled on the other OS family cannot be instantiated here (WindowsPath on Linux
    # raises); its pure variant keeps the value and loads anywhere.
    native = "WindowsPath" if os.name == "nt" else "PosixPath"
    return getattr(pathlib, name) if name == native else getattr(pathlib, "Pure" + name)


# Globals (beyond tensors and containers) that published and our own checkpoints contain, each
# harmless to call: it only builds a plain value.
SAFE_GLOBALS: List[Any] = [
    # FireRedASR packages: {"args": argparse.Namespace, "model_state_dict": ...}
    argparse.Namespace,
    # SpeechLLM / icefall / our training checkpoints store every option, e.g. exp_dir as a Path
    # (Python 3.13 names the classes pathlib._local.*).
    *[(_path_class(cls), f"{module}.{cls}") for module in ("pathlib", "pathlib._local")
      for cls in ("PosixPath", "WindowsPath")],
    # env_info's "torch-version" (torch.__version__)
    torch.torch_version.TorchVersion,
    # numpy values in icefall params and the numpy RNG state in our rank_states (scalars, arrays,
    # dtypes), under both the numpy 2 and the numpy 1 module names
    np.dtype,
    *sorted({type(np.dtype(code)) for code in "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]},
            key=lambda cls: cls.__name__),
    np.ndarray,
    *[(getattr(_np_multiarray, fn), f"{module}.multiarray.{fn}") for module in ("numpy._core", "numpy.core")
      for fn in ("scalar", "_reconstruct")],
]


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _is_trusted(path: str) -> bool:
    real = os.path.realpath(path)
    for entry in os.environ.get(TRUST_ENV, "").split(os.pathsep):
        if not entry:
            continue
        trusted = os.path.realpath(entry)
        if real == trusted or real.startswith(trusted.rstrip(os.sep) + os.sep):
            return True
    return False


def _unreadable(what: str, path: str, e: BaseException) -> CheckpointError:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        detail = "the file is empty"
    elif not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip or (legacy) a pickle
        detail = "not written by torch.save"
    else:
        unpickler = re.search(r"WeightsUnpickler error: (.*)", str(e), re.S)
        detail = _first_line(unpickler.group(1) if unpickler else str(e)).split(". ")[0] or type(e).__name__
    return CheckpointError(f"{what} {path} is corrupt or truncated, or not a torch file ({detail})")


def load_torch_file(path: PathLike, what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` that cannot run code hidden in the file (see the module docstring).

    ``what`` names the file in errors ("Zipformer checkpoint", "FireRedASR package", ...).
    ``mmap``: map a zip-format file instead of reading it (a large model is then not held twice
    while its weights are copied into a module); ignored for legacy-format files.

    Raises FileNotFoundError, or :class:`CheckpointError` for an unreadable or refused file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    mmap = bool(mmap) and zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (OSError, MemoryError):  # not about the content (permissions, I/O, memory): as raised
        raise
    except Exception as e:
        message = str(e)
        refusal = re.search(r"WeightsUnpickler error: (.*)", message, re.S)
        # "Unsupported operand": not a pickle at all, i.e. a damaged or foreign file
        if refusal is None or "Unsupported operand" in refusal.group(1):
            raise _unreadable(what, path, e) from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        built = re.search(r"but got <class '([^']+)'>", message)
        needs = (f"the Python global {found.group(1)!r}" if found else
                 f"an object of type {built.group(1)!r}" if built else _first_line(refusal.group(1)))
    if not _is_trusted(path):
        raise CheckpointError(
            f"refusing to load {what} {path}: it needs {needs}, which is not among the types checkpoints are "
            f"expected to hold and could run code while loading; if you trust this file, set "
            f"{TRUST_ENV}={os.path.abspath(path)} (files or directories, separated by {os.pathsep!r})"
        )
    logging.warning(f"{what} {path} needs {needs}: loading it with full unpickling ({TRUST_ENV} trusts it)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as e:
        raise _unreadable(what, path, e) from None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / a DeepSpeed engine (both keep it in ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class StateDictMismatch(NamedTuple):
    missing: List[str]  # model keys absent from the state dict (in model order)
    unexpected: List[str]  # state-dict keys the model lacks (in file order)
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # (key, in the file, in the model)


def _examples(keys: Sequence[str], limit: int = 5) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    allow_missing: Iterable[str] = (),
    ignore_unexpected_prefixes: Iterable[str] = (),
    context: str = "",
    hints: Optional[Callable[[StateDictMismatch], Iterable[str]]] = None,
) -> List[str]:
    """Load ``state_dict`` into ``module`` (unwrapped from DDP/DeepSpeed), or raise one
    :class:`CheckpointError` listing every problem at once::

        <source> does not match the model (<context>): 2 missing: a, b | 1 unexpected: c |
        1 shape mismatch: d: checkpoint (4, 8) vs model (4, 16) | <hints>

    ``allow_missing``: model keys that may be absent (they keep their values, e.g. frozen weights
    or recomputable buffers); ``ignore_unexpected_prefixes``: file keys that are not the module's
    (e.g. the decoder of a whole ASR model when loading its encoder); ``context``: what the model
    is; ``hints(mismatch)``: extra explanations for the error. Returns the keys left unloaded.
    """
    module = unwrap_model(module)
    own = module.state_dict()
    allowed = set(allow_missing)
    prefixes = tuple(ignore_unexpected_prefixes)
    mismatch = StateDictMismatch(
        missing=[k for k in own if k not in state_dict and k not in allowed],
        unexpected=[k for k in state_dict if k not in own and not (prefixes and k.startswith(prefixes))],
        shapes=[(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                if k in own and torch.is_tensor(v) and torch.is_tensor(own[k]) and v.shape != own[k].shape],
    )
    if any(mismatch):
        parts = [f"{len(mismatch.missing)} missing: {_examples(mismatch.missing)}"] if mismatch.missing else []
        if mismatch.unexpected:
            parts.append(f"{len(mismatch.unexpected)} unexpected: {_examples(mismatch.unexpected)}")
        if mismatch.shapes:
            shown = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatch.shapes]
            parts.append(f"{len(shown)} shape mismatch: {'; '.join(shown[:5])}"
                         + (f" ... (+{len(shown) - 5} more)" if len(shown) > 5 else ""))
        parts += list(hints(mismatch)) if hints is not None else []
        where = f" ({context})" if context else ""
        raise CheckpointError(f"{source} does not match the model{where}: " + " | ".join(parts))
    result = module.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    return list(result.missing_keys)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

# .<name>.<8 random characters>.tmp; the random part also matches the mkstemp() names earlier
# versions left behind.
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """No space (or quota) left while :func:`atomic_write` wrote a file: the message names the file,
    the bytes written before the failure and the free space; the file's older version is intact.
    Reported as one line by the entry scripts (``llmasr.config.run_cli``)."""


def _bytes_under(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def atomic_write(path: PathLike, writer: Callable[[Path], Any], directory: bool = False) -> Path:
    """Create ``path`` atomically: ``writer(tmp)`` writes the file ``tmp`` (or fills the directory
    ``tmp``, ``directory=True``), which is then fsync'ed and renamed over ``path``. On any failure
    ``path`` is left as it was and nothing else remains.

    ``tmp`` has ``path``'s own name, inside the private directory ``.<name>.<random>.tmp`` beside
    ``path``: writers that go by the name see the real one (lhotse's ``.jsonl.gz``, sox's
    ``.flac``, the archive name ``torch.save`` records, so the bytes equal a direct save).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.mkdir(work, 0o777)  # the umask applies, as to everything the writer creates
    fd = os.open(work, os.O_RDONLY | os.O_CLOEXEC)
    tmp, old = work / path.name, work / f"{path.name}.old"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # "in progress" for prune_stale_temp_files
        if directory:
            os.mkdir(tmp, 0o777)
        writer(tmp)
        for f in [*sorted(tmp.rglob("*")), tmp] if directory else [tmp]:
            _fsync(f)
        if directory and path.is_dir():  # a directory cannot be renamed over a non-empty one
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException as e:
        if old.exists() and not path.exists():
            os.replace(old, path)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, DiskFullError):
            written = _bytes_under(work)
            free = shutil.disk_usage(path.parent).free
            raise DiskFullError(
                e.errno, f"no space left writing {path}: {written} bytes written before the failure (the file "
                f"needs more), {free} bytes free on its file system ({os.strerror(e.errno)}); older files are "
                "untouched") from e
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.close(fd)
    _fsync(path.parent)
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_json(path: PathLike, obj: Any, **dumps_options) -> Path:
    """``json.dumps(obj, **dumps_options)`` plus a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, **dumps_options) + "\n")


def prune_stale_temp_files(directory: PathLike) -> List[Path]:
    """Delete the temporaries :func:`atomic_write` left in ``directory`` when its process was
    killed (only names of that pattern, only when no live writer holds them). Returns them."""
    directory = Path(directory)
    removed: List[Path] = []
    if not directory.is_dir():
        return removed
    for f in sorted(directory.iterdir()):
        if not _TEMP_NAME.match(f.name) or f.is_symlink():
            continue
        try:
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # vanished meanwhile (its writer finished) or unreadable: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a writer is still at work (or locks are unsupported here): keep it
            os.close(fd)
            continue
        try:
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink()
            removed.append(f)
            logging.info(f"removed {f}, left behind by an interrupted write")
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
    return removed


__all__ = [
    "CheckpointError",
    "SAFE_GLOBALS",
    "TRUST_ENV",
    "load_torch_file",
    "unwrap_model",
    "StateDictMismatch",
    "load_state_dict_strict",
    "atomic_write",
    "atomic_torch_save",
    "atomic_write_text",
    "atomic_write_json",
    "prune_stale_temp_files",
]
