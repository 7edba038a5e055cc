"""How a study stops: Ctrl-C (SIGINT) and SIGTERM both raise KeyboardInterrupt in the main thread, which
ends the trial in progress as interrupted; around storage writes they wait for the write to finish.

SIGTERM does not go through SIGINT: a shell script's `cmd &` starts the command with SIGINT ignored (so
that a Ctrl-C at the terminal leaves background jobs alone), and a SIGTERM passed on as SIGINT would be
ignored with it, the study training on. A worker process also stops on SIGHUP, which Linux sends it when
the study's main process dies (bench.run).

A stop can be dropped on its way: Python prints and ignores an exception raised in a finalizer (a
`__del__`, a weakref callback: "Exception ignored in") or a ctypes callback, and a handler that runs while
one does raises there. Such a Ctrl-C was lost, the study training on to its end (seen once in CI: exit 0).
So each stop is also remembered, and raised again at the study's safe points (raise_if_stopped: between
epochs, IWAE batches and trials) and as the block that installed the handlers ends.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing.resource_tracker
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT). Each stop names its signal (the exit code, and what a worker is sent) and the
    reason its trial records, in one place."""

    signum = signal.SIGINT
    reason = "interrupted by the user (SIGINT)"


class Terminated(Interrupted):
    """SIGTERM (timeout, docker stop, a batch scheduler's end of job): the study stops as on Ctrl-C."""

    signum = signal.SIGTERM
    reason = "terminated (SIGTERM)"


class Orphaned(Interrupted):
    """SIGHUP in a worker: the study's main process died (killed, or its terminal closed)."""

    signum = signal.SIGHUP
    reason = "interrupted: the study's main process died (killed, or its terminal closed)"


# Each signal that stops a study, with what it raises
STOPS: dict[int, type[Interrupted]] = {stop.signum: stop for stop in (Interrupted, Terminated, Orphaned)}

_stopped: type[Interrupted] | None = None  # the first stop that came, until the handlers' block ends
_deferred: list[type[Interrupted]] = []  # those that came inside stops_deferred, raised after it
_depth = 0  # how many stops_deferred blocks the main thread is in (and stops_raise, as it puts handlers back)


def _stop(signum: int, frame) -> None:
    """The handler of each signal in STOPS: raises its stop, or, inside stops_deferred, defers it; either
    way remembers it. (A counter, not handlers swapped in and out: a signal that another thread takes while
    the main one masks it still runs its handler in the main thread, between any two of the swaps.)"""
    global _stopped
    stop = STOPS[signum]
    _stopped = _stopped or stop
    if _depth:
        _deferred.append(stop)
        return
    raise stop


@contextlib.contextmanager
def held_in_processes_started() -> Iterator[None]:
    """Processes started inside begin with the stops blocked (a signal mask is inherited across fork and
    exec) until they let them through (let_stops_through): a spawned worker imports torch and MLflow for
    seconds while still in the terminal's process group, and a Ctrl-C there printed a traceback from the
    middle of an import. A stop that comes meanwhile waits, and is raised once the worker is ready for it.
    (multiprocessing's resource tracker, which the first process started starts, unblocks SIGINT and SIGTERM
    as it starts: so it starts first.)"""
    multiprocessing.resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def let_stops_through() -> None:
    """In a process started inside held_in_processes_started, once its handlers are in place."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)


def hang_up_as_orphaned() -> None:
    """In a worker process: SIGHUP raises Orphaned."""
    signal.signal(signal.SIGHUP, _stop)


def signum(stop: KeyboardInterrupt) -> int:
    """The signal behind a stop (SIGINT for a KeyboardInterrupt that Python's own handler raised)."""
    return getattr(stop, "signum", signal.SIGINT)


def reason(stop: KeyboardInterrupt) -> str:
    """What the trial it cut short records."""
    return getattr(stop, "reason", Interrupted.reason)


def exit_code(stop: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the process, as a shell reports it: 130 SIGINT, 143 SIGTERM, 129 SIGHUP."""
    return 128 + signum(stop)


@contextlib.contextmanager
def stops_raise() -> Iterator[None]:
    """Inside: Ctrl-C raises KeyboardInterrupt and SIGTERM Terminated, and a stop dropped on its way is
    raised as the block ends. Leaves a handler someone else installed, or SIGINT ignored (as a shell
    script's `cmd &` starts it), as it is; does nothing outside the main thread (a notebook or IDE may run a
    study in another), where Python has no handlers."""
    global _stopped, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _stopped = None  # a stop that came while another study's handlers were put back is not this one's
    _deferred.clear()
    installed, unraisable_hook = {}, sys.unraisablehook
    try:
        sys.unraisablehook = functools.partial(_quiet_about_dropped_stops, unraisable_hook)
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(signum) is default:
                installed[signum] = default
                signal.signal(signum, _stop)
        yield
        raise_if_stopped()
    except Exception as error:
        if _stopped is None:
            raise
        raise stopped_by(error) from error
    finally:
        _depth += 1  # a stop while the handlers are put back waits, and is dropped: the study is ending
        for signum, default in installed.items():
            signal.signal(signum, default)
        sys.unraisablehook = unraisable_hook
        _depth -= 1
        _stopped = None
        _deferred.clear()


def stopped_by(error: BaseException) -> KeyboardInterrupt | None:
    """The stop behind an error, if one came: a KeyboardInterrupt raised inside some libraries comes out as
    another error (OmegaConf's config calls: an AttributeError or a ConfigKeyError, 1 in 8 times), which
    is then the stop, not a failure of the trial or of the command."""
    if isinstance(error, KeyboardInterrupt):
        return error
    return _stopped() if _stopped is not None else None


def _quiet_about_dropped_stops(hook: Callable[[Any], None], unraisable: Any) -> None:
    """sys.unraisablehook: the traceback Python would print for a stop it dropped is left out (the stop
    is raised again, and says what happened); anything else goes to `hook`."""
    if not (_stopped is not None and issubclass(unraisable.exc_type, KeyboardInterrupt)):
        hook(unraisable)


def ignore_further_stops() -> None:
    """In the main thread of a command that a stop is ending: a second Ctrl-C or SIGTERM would cut its last
    words and Python's exit (MLflow's exit handlers, the interpreter's shutdown) short, with a traceback,
    or with a SIGTERM's default action and no message at all."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


def raise_if_stopped() -> None:
    """At a safe point of the study: raises a stop that came before and was dropped on its way."""
    if _stopped is not None and not _depth:
        raise _stopped


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """A stop inside (Ctrl-C, SIGTERM, a worker's SIGHUP) takes effect, raising as it would have, once the
    block is done: around the worker's storage writes. Without this, one that came while a finished trial
    was being recorded left its run and trial RUNNING, which the next command took for a dead worker's,
    throwing the trained variant away; and one that came inside a write could leave its SQLite transaction
    open, holding a lock that the interruption's own writes, and other workers', would wait on until the
    store's timeout. Only where the signal raises, in the main thread: inside stops_raise (SIGINT where
    Python's own handler was installed, not where it is ignored), SIGHUP after hang_up_as_orphaned, and
    SIGINT with Python's own handler outside a study (the speed benchmarks, `train` called from Python),
    for which the block installs its own."""
    global _depth, _stopped
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    borrowed = _depth == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if borrowed:
        signal.signal(signal.SIGINT, _stop)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if borrowed:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            _stopped = None  # outside a study: nothing raises it again
        if not _depth and _deferred:  # the first that came, as it would have been raised: also over the block's error
            stop = _deferred[0]
            _deferred.clear()
            raise stop
