"""Progress: bars on a terminal (or when asked), one summary line per phase in a log, or nothing.

``progress`` is ``False`` (silent), ``True`` (bars wherever stderr goes) or ``"auto"`` (bars on a
terminal; otherwise one line per finished phase, so a log file gets no ``\\r`` fragments).
"""

from __future__ import annotations

import contextlib
import sys
import time


def _tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bars_on(progress) -> bool:
    return progress is True or (progress == "auto" and _tty())


def lines_on(progress) -> bool:
    return progress == "auto" and not _tty()


class _Quiet:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str, progress):
    """A tqdm bar (or a no-op) for one phase; in ``"auto"`` mode off a terminal, one line at the end."""
    t = time.perf_counter()
    if bars_on(progress):
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr) as b:
            yield b
    else:
        yield _Quiet()
    if lines_on(progress):
        print(f"{desc}: {total} {unit}s in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def say(progress, message: str) -> None:
    """A one-line note (a phase with no bar) unless silent."""
    if progress:
        print(message, file=sys.stderr, flush=True)
