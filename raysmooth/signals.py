"""SIGTERM as an interrupt: ``ray job stop``, a batch scheduler's preemption and a Kubernetes eviction all
send SIGTERM before SIGKILL. Raised in the main thread like Ctrl-C, it lets a run commit the rows it has
finished and end in one line, rather than die with Ray's stack dump."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "raise_on_sigterm", "sigterm_raises"]


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM); handled wherever an interrupt is."""


def _raise(signum: int, frame: object) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """Make SIGTERM raise ``Terminated`` in the main thread. ``ray.init`` installs its own handler (and
    its core worker a crash reporter), so a driver calls this again once Ray is up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """``raise_on_sigterm`` for the duration of a command; the handler before it is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    raise_on_sigterm()
    try:
        yield
    finally:
        if before is not None:  # None: a handler Python did not install, which it cannot put back
            signal.signal(signal.SIGTERM, before)
