"""Rank 0's progress display: sequences done, tokens/s, ETA.

On a terminal a bar redrawn in place; in a batch log (not a terminal) a plain
line every ``every`` seconds, so a log file stays readable.
"""

import sys
import time

__all__ = ['Progress']


class Progress:
    """Progress over ``total`` sequences, ``done`` of them already (resumed)."""

    def __init__(self, total, done=0, stream=None, every=30.0):
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.tokens = 0
        self.t0 = self.last = time.perf_counter()

    def update(self, seqs, tokens):
        """``seqs`` more sequences done, ``tokens`` more tokens processed."""
        self.done += seqs
        self.tokens += tokens
        now = time.perf_counter()
        if self.tty or now - self.last >= self.every or self.done == self.total:
            self.last = now
            self._show(now)

    def line(self, now=None):
        """'1234/5000 sequences (24.7%), 5321 tokens/s, ETA 0:02:13'."""
        elapsed = max((now or time.perf_counter()) - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float('inf')
        eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 8.64e6 else '?'
        return (f'{self.done}/{self.total} sequences ({100 * self.done / self.total:.1f}%), '
                f'{self.tokens / elapsed:.0f} tokens/s, ETA {eta_text}')

    def _show(self, now):
        if self.tty:
            width = 30
            filled = int(width * self.done / self.total)
            self.stream.write(f'\r[{"#" * filled}{"." * (width - filled)}] {self.line(now)}')
            if self.done == self.total:
                self.stream.write('\n')
        else:
            self.stream.write(f'mpimoe: {self.line(now)}\n')
        self.stream.flush()
