"""SIGTERM as an interrupt: ``ray job stop``, a batch scheduler's preemption and a Kubernetes eviction all
send SIGTERM before SIGKILL. Raised in the main thread like Ctrl-C, it lets a run commit the rows it has
finished and end in one line, rather than die with Ray's stack dump. SIGHUP (the terminal or ssh session
of a run closed) is handled the same way, unless it is ignored (``nohup``), which is kept."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Terminated", "raise_on_sigterm", "sigterm_raises"]


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM, or SIGHUP); handled wherever an interrupt is."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # what a shell reports for a process the signal ended


def _raise(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _hangup_handled() -> bool:
    """Whether SIGHUP may be taken: ``nohup`` (or a caller) ignoring it, so that the run outlives its
    terminal, must stay so."""
    return hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, _raise)


def raise_on_sigterm() -> None:
    """Make SIGTERM (and SIGHUP, unless ignored) raise ``Terminated`` in the main thread. ``ray.init``
    installs its own handler (and its core worker a crash reporter), so a driver calls this again once
    Ray is up."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)
        if _hangup_handled():
            signal.signal(signal.SIGHUP, _raise)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """``raise_on_sigterm`` for the duration of a command; the handler before it is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handled = [signal.SIGTERM, *([signal.SIGHUP] if _hangup_handled() else [])]
    before = {s: signal.getsignal(s) for s in handled}
    raise_on_sigterm()
    try:
        yield
    finally:
        for s, handler in before.items():
            if handler is not None:  # None: a handler Python did not install, which it cannot put back
                signal.signal(s, handler)
