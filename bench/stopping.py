"""How a study stops: Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt in the main thread, which
ends the trial in progress as interrupted; around storage writes they wait for the write to finish.

SIGTERM does not go through SIGINT: a shell script's `cmd &` starts the command with SIGINT ignored (so
that a Ctrl-C at the terminal leaves background jobs alone), and a SIGTERM passed on as SIGINT would be
ignored with it, the study training on. A worker process also stops on SIGHUP, which Linux sends it when
the study's main process dies (bench.run).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, docker stop, a batch scheduler's end of job): the study stops as on Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


class Orphaned(KeyboardInterrupt):
    """SIGHUP in a worker: the study's main process died (killed, or its terminal closed)."""


def _orphaned(signum, frame) -> None:
    raise Orphaned


def hang_up_as_orphaned() -> None:
    """In a worker process: SIGHUP raises Orphaned."""
    signal.signal(signal.SIGHUP, _orphaned)


def reason(stop: KeyboardInterrupt) -> str:
    """What the trial it cut short records."""
    if isinstance(stop, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(stop, Orphaned):
        return "interrupted: the study's main process died (killed, or its terminal closed)"
    return "interrupted by the user (SIGINT)"


def exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the process, as a shell reports it: 130 SIGINT, 143 SIGTERM, 129 SIGHUP."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else
                  signal.SIGHUP if isinstance(stop, Orphaned) else signal.SIGINT)


# Each signal that stops a study, with the handler that raises for it (hang-ups: where signals have them)
STOPS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate,
         **({signal.SIGHUP: _orphaned} if hasattr(signal, "SIGHUP") else {})}


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM raises Terminated inside. Leaves a handler someone else installed as it is, and does nothing
    outside the main thread (a notebook or IDE may run a study in another), where Python has no handlers."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """A stop inside (Ctrl-C, SIGTERM, a worker's SIGHUP) takes effect, raising as it would have, once the
    block is done: around the worker's storage writes. Without this, one that came while a finished trial
    was being recorded left its run and trial RUNNING, which the next command took for a dead worker's,
    throwing the trained variant away; and one that came inside a write could leave its SQLite transaction
    open, holding a lock that the interruption's own writes, and other workers', would wait on until the
    store's timeout. Only where the signal raises: in the main thread, SIGINT with Python's own handler (not where
    it is ignored), SIGTERM inside sigterm_as_ctrl_c, SIGHUP after hang_up_as_orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    with _held():
        stops = {signum: handler for signum, handler in STOPS.items() if signal.getsignal(signum) is handler}
        for signum in stops:
            signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        with _held():
            for signum, handler in stops.items():
                signal.signal(signum, handler)
        if caught:  # the first that came, as it would have been raised: also over an error of the block's
            stops[caught[0]](caught[0], None)


@contextlib.contextmanager
def _held() -> Iterator[None]:
    """The signals that stop a study wait while the handlers are swapped: one that came between two swaps
    would run a handler that raises, and leave the others swapped for good. (Where the OS has no signal
    masks, as on Windows, they do not wait.)"""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOPS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
