"""Stopping on SIGINT and SIGTERM, at any instant.

Ctrl-C at a terminal sends SIGINT; systemd, Kubernetes and Docker stop a
service with SIGTERM, wait a grace period, then SIGKILL. Inside
:func:`interruptible` the first of either raises :class:`Interrupted` in the
main thread, wherever it is (a model step, a wait for clients, an
evaluation). It is a BaseException, like KeyboardInterrupt, so no handler
meant for a failed step or a misbehaving client catches it: it travels up to
the command, whose ``finally`` blocks tell the peers and release the threads,
and the process exits with 128 + the signal's number (130, 143), the shell's
convention. Work that must not be cut in half runs inside :func:`deferred`
(a checkpoint's write): a signal that arrives there is raised when it ends.
A second signal exits at once, writing nothing more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the run stops; its last checkpoint stays."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by this signal (130, 143)."""
        return 128 + self.signum


class _State:
    depth = 0  # nested interruptible() blocks
    seen = 0  # the first signal's number, once one came
    deferring = 0  # nested deferred() blocks
    pending = 0  # a signal that came inside deferred(), raised at its end


def _handler(signum: int, _frame) -> None:
    if _State.seen:  # the second: at once, nothing more written
        name = signal.Signals(signum).name
        os.write(2, f"\nsplitft: second interrupt ({name}); exiting now\n".encode())
        os._exit(128 + signum)
    _State.seen = signum
    if _State.deferring:
        _State.pending = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` inside the block.

    Only installable in the main thread (elsewhere the block runs with the
    signals' handlers as they are); blocks may nest, the outermost restores
    the handlers it found.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _State.depth == 0:
        _State.seen = _State.pending = 0
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Let the block finish before a signal that arrives in it is raised
    (as :class:`Interrupted`, when the block ends)."""
    _State.deferring += 1
    try:
        yield
    finally:
        _State.deferring -= 1
    if not _State.deferring and _State.pending:
        signum, _State.pending = _State.pending, 0
        raise Interrupted(signum)


__all__ = ["Interrupted", "deferred", "interruptible"]
