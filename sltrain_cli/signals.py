"""Stopping a run on a signal without losing anything: SIGINT (Ctrl-C), SIGTERM (schedulers) and SIGUSR1.

    with StopSignal() as stop:          # installed before any work, kept until the command is done
        prepare()                        # "abort" phase: a signal raises Interrupted at once (nothing to save)
        stop.defer()                     # the loop: a signal only sets stop.requested; the loop saves and stops
        ...

A second signal while one is pending raises Interrupted at once. Handlers are installed in the main thread only
and restored when the block ends. The exit code of a stopped run is 128 + the signal's number (130 / 143 / 138).
The other outside event a run must survive: the reader of its stdout going away (``survive_closed_stdout``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is 128 + its number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class StopSignal:
    """Records SIGINT / SIGTERM / SIGUSR1. In the abort phase (the start) a signal raises Interrupted; after
    ``defer()`` it only sets ``requested`` until a second one arrives."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum: Optional[int] = None
        self.deferring = False
        self._old: dict = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def defer(self) -> None:
        """From now on a (first) signal only asks to stop at the next safe point; one already received raises."""
        self.raise_if_requested()
        self.deferring = True

    def abort_now(self) -> None:
        """From now on a signal raises Interrupted at once (work that can simply be dropped)."""
        self.raise_if_requested()
        self.deferring = False

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def _handle(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        if not (first and self.deferring):  # the abort phase, or a second signal: stop now, save nothing more
            raise Interrupted(self.signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGINT).name


def survive_closed_stdout() -> None:
    """`sltrain pretrain ... | head -1`: once the reader has gone, further output is dropped instead of raising
    BrokenPipeError into the run (a closed pipe must not decide a run's status)."""
    if sys.stdout is not None and not isinstance(sys.stdout, _TolerantStream):
        sys.stdout = _TolerantStream(sys.stdout)


class _TolerantStream:
    """A text stream whose writes after the reader closed the pipe go to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())  # the interpreter's final flush goes nowhere either
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)
