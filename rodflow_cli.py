"""The ``rodflow`` console script: a Ctrl-C stops it cleanly from its first moment.

Importing ``rodflow_jax`` imports JAX, diffrax and optax (about 2 s). A SIGINT in that window
used to surface as a ``KeyboardInterrupt`` or ``ImportError`` traceback from inside an extension
module, or was swallowed by a garbage-collection callback so that the run went on and wrote its
folder. This module is outside the package, so its handler is in place before any of that is
imported: nothing has been written yet, so it says so and exits (130 for SIGINT, 143 for
SIGTERM). Then the package's own watcher (:mod:`rodflow_jax.experiments._signals`) takes over.
"""

import os
import signal
import sys


def _while_importing(signum, frame):
    os.write(2, f"rodflow: interrupted by {signal.Signals(signum).name}; nothing was written\n".encode())
    os._exit(128 + signum)


def main(argv=None) -> int:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _while_importing)
    from rodflow_jax.experiments import _signals

    _signals.install()
    from rodflow_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
