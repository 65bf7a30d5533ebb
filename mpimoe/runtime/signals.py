"""Stop requests: SIGTERM or SIGUSR1 ask a job to stop cleanly; SIGINT
(Ctrl-C) interrupts it.

Slurm sends SIGTERM before killing a job (and ``--signal=B:USR1@120`` sends
SIGUSR1 ahead of the time limit).  The handler only records the request; the
program checks it at the next step boundary (before a forward pass), abandons
the batch in flight, keeps every committed chunk and exits with
:class:`~mpimoe.errors.Stopped` (75) so that a rerun resumes, or with
:class:`~mpimoe.errors.Interrupted` (130) on SIGINT.  A second SIGINT, more
than :attr:`StopRequest.FORCE_AFTER_S` after the first, raises
KeyboardInterrupt at once.
"""

import signal
import time

from mpimoe.errors import Interrupted, Stopped

__all__ = ['StopRequest', 'stop_error']


class StopRequest:
    """Records the first SIGTERM/SIGUSR1 (a stop) or SIGINT (an interrupt,
    which overrides a stop); true once one arrived.

    Installed for the lifetime of a ``with`` block; the previous handlers are
    restored at its end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    #: seconds after a first SIGINT from which a second one ends the process
    #: at once (mpiexec forwards a terminal's Ctrl-C to ranks that got it too)
    FORCE_AFTER_S = 1.0

    def __init__(self):
        self.signum = None
        self._interrupted_at = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        now = time.monotonic()
        if signum != signal.SIGINT:
            self.signum = self.signum or signum
        elif self._interrupted_at is None:
            self.signum, self._interrupted_at = signum, now
        elif now - self._interrupted_at > self.FORCE_AFTER_S:
            raise KeyboardInterrupt

    def __bool__(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None


def stop_error(signum, detail):
    """The error that ends a job stopped by signal ``signum``: Interrupted
    (SIGINT, exit 130) or Stopped (75), its message followed by ``detail``
    (what is committed, what to do)."""
    if signum == signal.SIGINT:
        return Interrupted(f'interrupted by SIGINT: {detail}')
    return Stopped(f'stopped cleanly on {signal.Signals(signum).name}: {detail}')
