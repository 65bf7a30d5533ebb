"""Stop requests: SIGTERM or SIGUSR1 ask a job to stop cleanly.

Slurm sends SIGTERM before killing a job (and ``--signal=B:USR1@120`` sends
SIGUSR1 ahead of the time limit).  The handler only records the request; the
program checks it at the next chunk boundary, commits, and exits with
:class:`~mpimoe.errors.Stopped` (75) so that a rerun resumes.
"""

import signal

__all__ = ['StopRequest']


class StopRequest:
    """Records the first SIGTERM/SIGUSR1; true once one arrived.

    Installed for the lifetime of a ``with`` block; the previous handlers are
    restored at its end.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def __bool__(self):
        return self.signum is not None

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None
