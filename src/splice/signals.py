"""Termination signals handled like Ctrl-C, so every clean-up that runs on KeyboardInterrupt
(the writer removing its temporary folder, a study flushing its trial) runs on them too.

The CLI wraps each command in ``terminate_as_interrupt()``; a library caller decides for
its own process (a library call must not take over the host's signal handlers).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives inside ``terminate_as_interrupt``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum, frame):  # noqa: ARG001 - signal handler signature
    raise Terminated(signum)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside this block, SIGTERM and SIGHUP raise ``Terminated`` (a KeyboardInterrupt); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in SIGNALS:
        try:
            previous[s] = signal.signal(s, _raise)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
