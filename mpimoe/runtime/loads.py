"""Rank 0's record of the expert loads of a run, in memory that does not grow
with its length: the total, and the loads per window of steps for run.json's
balance history, the windows merged pairwise (their width doubled) whenever
2 x MAX_WINDOWS of them are kept."""

import numpy as np

__all__ = ['LoadHistory', 'MAX_WINDOWS']

#: windows kept after a merge (at most twice as many before it)
MAX_WINDOWS = 1024


class LoadHistory:
    """width: steps per window at the start (--balance-every)."""

    def __init__(self, width):
        self.width = width
        self.steps = 0
        self.total = None           # int64 [Lm, E]
        self.windows = []           # int64 [Lm, E] each, ``width`` steps
        self._open, self._filled = None, 0

    def add(self, counts):
        """Add one step's loads, int64 [Lm, E]."""
        self.steps += 1
        self.total = counts.copy() if self.total is None else self.total + counts
        self._open = counts.copy() if self._open is None else self._open + counts
        self._filled += 1
        if self._filled == self.width:
            self.windows.append(self._open)
            self._open, self._filled = None, 0
            if len(self.windows) == 2 * MAX_WINDOWS:
                self.windows = [a + b for a, b in zip(self.windows[::2], self.windows[1::2])]
                self.width *= 2

    def history(self, shape):
        """The windows, the last maybe shorter: int64 [W, Lm, E] (shape: [Lm, E])."""
        windows = self.windows + ([self._open] if self._open is not None else [])
        return np.array(windows, dtype=np.int64).reshape(-1, *shape)
