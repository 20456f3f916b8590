"""SIGINT and SIGTERM stop a command within moments, wherever it is, with nothing left behind.

A compiled XLA call does not return to the interpreter until it finishes, so a Python signal
handler would run only then (a probe or a solve can take a minute). Instead the C-level handler
writes the signal number to a wakeup socket (:func:`signal.set_wakeup_fd`), and a watcher thread
blocked on that socket removes the temporary folders registered by the output writer (after any
swap in progress completes), prints one line and ends the process with the conventional code
(130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

_TEMP: set[Path] = set()
_LOCK = threading.Lock()
_INSTALLED = False
_SOCKETS: tuple = ()


def register(path: Path) -> None:
    with _LOCK:
        _TEMP.add(Path(path))


def unregister(path: Path) -> None:
    with _LOCK:
        _TEMP.discard(Path(path))


def _watch(sock: socket.socket, prog: str) -> None:
    from ._output import wait_for_swap

    while True:
        data = sock.recv(1)
        if not data:
            return
        signum = data[0]
        if signum not in (signal.SIGINT, signal.SIGTERM):
            continue
        wait_for_swap()
        with _LOCK:
            for p in list(_TEMP):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        name = signal.Signals(signum).name
        try:
            sys.stderr.write(f"{prog}: interrupted by {name}; nothing was written\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + signum)


def install(prog: str = "rodflow") -> None:
    """Route SIGINT and SIGTERM to the watcher (main thread only; idempotent)."""
    global _INSTALLED, _SOCKETS
    if _INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    a, b = socket.socketpair()
    _SOCKETS = (a, b)
    a.setblocking(False)
    signal.set_wakeup_fd(a.fileno(), warn_on_full_buffer=False)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: None)  # the watcher thread acts; the main thread carries on
    threading.Thread(target=_watch, args=(b, prog), daemon=True, name="rodflow-signals").start()
    _INSTALLED = True
