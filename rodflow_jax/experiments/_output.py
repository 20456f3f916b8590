"""The output policy, the same for every command and for ``save``: nothing a user has is lost.

* :func:`check_output` runs *before any compute*: an existing file at the path is never touched,
  an existing non-empty folder is refused unless ``overwrite``, and a path that cannot be
  written (a parent that is a file, a read-only directory, an empty name) is reported, each as
  one :class:`~rodflow_jax.InputError`.
* :func:`output_dir` writes into a hidden sibling ``.NAME.tmp-PID-*`` and only then swaps it in:
  with ``overwrite`` the new folder replaces the old one in one atomic exchange
  (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else two renames), and the old one is
  removed only after the swap. A run killed while writing leaves the old folder intact; its
  temporary sibling is removed by the signal handler, or (after SIGKILL) by the next run.
* Folders get the usual mode (``0o777`` less the umask), not ``mkdtemp``'s ``0o700``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from .._errors import InputError
from . import _signals

_SWAP = threading.Lock()  # held while a folder is being swapped in; the signal handler waits for it


def _clean(x):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(_clean(obj), indent=2) + "\n")


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _overwrite_hint(flag: str) -> str:
    """How to ask for a replacement: the CLI's flag, or the Python argument (``flag`` names the
    argument when the caller is the Python API, e.g. ``out_dir``)."""
    return "pass --overwrite" if flag.startswith("--") else "pass overwrite=True"


def _as_path(out, flag: str, what: str) -> Path:
    """``out`` as an absolute path; one :class:`InputError` for an empty name or a non-path."""
    if out is None or (isinstance(out, str) and out.strip() == ""):
        raise InputError(f"{flag} needs a {what} name")
    if not isinstance(out, (str, os.PathLike)):
        raise InputError(f"{flag} must be a {what} path (a str or a pathlib.Path), got {type(out).__name__} {out!r}")
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out))))


def check_output(out, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """The absolute output folder, or one :class:`InputError` saying why it cannot be used."""
    path = _as_path(out, flag, "folder")
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {out} is an existing file; it is never replaced: choose a folder name")
    if path.is_dir() and any(path.iterdir()):
        if path == Path.cwd() or path in Path.cwd().parents:
            raise InputError(f"{flag} {out} is the current folder (or holds it) and is not empty: name a new folder")
        if not overwrite:
            raise InputError(f"{flag} {out} exists and is not empty; {_overwrite_hint(flag)} to replace it")
    _check_writable(out, path, flag)
    return path


def _check_writable(out, path: Path, flag: str) -> None:
    """The first existing ancestor must be a folder we can create entries in (tried, not guessed:
    permission bits do not tell root about a read-only file system)."""
    anchor = _first_existing(path.parent)
    if not anchor.is_dir():
        raise InputError(f"{flag} {out}: {anchor} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rodflow-write-test-", dir=anchor))
    except OSError as e:
        raise InputError(f"{flag} {out}: cannot write in {anchor} ({e.strerror or e})") from None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0


def _stale(parent: Path, name: str) -> None:
    """Remove temporary siblings left by a killed run (their process is gone)."""
    for p in parent.glob(f".{name}.tmp-*"):
        try:
            pid = int(p.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


@contextlib.contextmanager
def output_dir(out, *, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary folder; on success it becomes ``out`` (see the module docstring).
    ``flag`` names ``out`` in messages: the CLI's flag, or the Python argument."""
    path = check_output(out, overwrite=overwrite, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=_umask_mode())
        _stale(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        os.chmod(tmp, _umask_mode())
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
    _signals.register(tmp)
    try:
        yield tmp
        pause = os.environ.get("RODFLOW_TEST_PAUSE_BEFORE_SWAP")  # fault-injection tests only
        if pause:
            import time

            time.sleep(float(pause))
        with _SWAP:
            _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _signals.unregister(tmp)


def _swap_in(tmp: Path, path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        if path == Path.cwd():  # an empty current folder: move the files into it
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
            tmp.rmdir()
            return
        path.rmdir()
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = path.with_name(f".{path.name}.tmp-{os.getpid()}-old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def wait_for_swap() -> None:
    """Block until no folder is being swapped in (the signal handler calls this)."""
    with _SWAP:
        pass


def check_output_file(out, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """The absolute output *file* path, by the same rules: an existing file only with
    ``overwrite``, never a folder, and a parent that can be written."""
    path = _as_path(out, flag, "file")
    if path.is_dir():
        raise InputError(f"{flag} {out} is a folder; name a file")
    if path.exists() and not overwrite:
        raise InputError(f"{flag} {out} exists; {_overwrite_hint(flag)} to replace it")
    _check_writable(out, path, flag)
    return path


def write_json_atomic(out, obj, *, overwrite: bool = False) -> Path:
    """Write one JSON file completely or not at all (a temporary sibling renamed over it)."""
    path = check_output_file(out, overwrite=overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=_umask_mode())
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e.strerror or e}") from None
    tmp = Path(tmp)
    _signals.register(tmp)
    try:
        write_json(tmp, obj)
        os.chmod(tmp, 0o666 & _umask_mode())
        with _SWAP:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _signals.unregister(tmp)
    return path
