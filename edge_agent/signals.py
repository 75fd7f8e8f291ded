"""SIGTERM and SIGINT as a stop request the main thread can wait on, safely; SIGUSR1 as a
request for every thread's stack.

A signal handler runs on the main thread between two bytecodes, wherever it is: also inside
``threading.Event.wait``, holding the event's own lock. A handler that calls ``Event.set()``
then waits for that lock for ever: the chaos tests caught the agent hung after SIGTERM about
once in ten runs under load (faulthandler showed ``set`` inside ``wait`` on the main thread).
Here the handler only sets a flag; Python's wakeup file descriptor (written by the C-level
handler, no lock involved) wakes the ``select`` the main thread waits in.
"""

from __future__ import annotations

import faulthandler
import logging
import select
import signal
import socket
import sys

log = logging.getLogger(__name__)


def dump_stacks_on(signum: signal.Signals = signal.SIGUSR1) -> None:
    """On ``signum`` write every thread's stack to stderr (the journal): for a process that hangs.

    Dumped by a Python-level handler, on the main thread holding the GIL, where every other
    thread's stack stands still. ``faulthandler.register`` dumps from inside the C signal handler
    instead, reading the other threads' frames while the thread that holds the GIL pushes and
    pops them: under load it crashed the agent (SIGSEGV inside paho's frames) in 3 of 20 dumps.
    Call on the main thread; the main thread must not be stuck outside Python (ours waits in
    ``StopSignal.wait``, which any signal wakes).
    """
    signal.signal(signum, _dump_every_threads_stack)


def _dump_every_threads_stack(signum: int, frame: object) -> None:
    try:
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError) as exc:  # stderr without a file descriptor (a test)
        log.warning("cannot dump the threads' stacks: %s", exc)


class StopSignal:
    """Set by SIGTERM/SIGINT (or ``set()`` from any thread); ``wait`` like ``threading.Event``'s.

    Create it on the main thread (Python installs signal handlers and the wakeup fd only there).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self._requested = False
        self._wake_read, self._wake_write = socket.socketpair()
        for end in (self._wake_read, self._wake_write):
            end.setblocking(False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wake_write.fileno(), warn_on_full_buffer=False)
        self._previous_handlers = {signum: signal.signal(signum, self._on_signal) for signum in signals}

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Put the previous handlers and wakeup fd back (a process that goes on, e.g. a test run)."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        self._wake_read.close()
        self._wake_write.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._requested = True  # a plain attribute: no lock a signal could interrupt

    def set(self) -> None:
        self._requested = True
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already a wake-up waiting, or closed: the flag is what counts

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float | None = None) -> bool:
        """True once stop was requested; False after ``timeout`` seconds without a request."""
        if not self._requested:
            select.select([self._wake_read], [], [], timeout)  # a signal also wakes it
            self._drain()
        return self._requested

    def _drain(self) -> None:
        try:
            while self._wake_read.recv(512):
                pass
        except (BlockingIOError, OSError):
            pass
