"""Rank 0's progress display: sequences done, tokens/s, ETA.

On a terminal, a bar redrawn in place at every committed chunk.  In a batch
log (stderr is not a terminal, as always under ``mpiexec`` or ``srun``),
plain lines:

- one at once when the run starts, so a log shows the job is alive before
  the first chunk is committed ("0/120 sequences, starting" or "40/120
  sequences, resuming after 40 committed");
- one per committed chunk, but at most one per ``every`` seconds, so that a
  run of thousands of small chunks does not flood the log; the first chunk
  and the last (all sequences done) always get their line.

A chunk slower than ``every`` seconds therefore gets a line of its own; faster
ones are summarised by the next line due.  ``mpimoe run --progress-every``
sets ``every`` (default :data:`EVERY_S`).
"""

import sys
import time

__all__ = ['Progress', 'EVERY_S']

#: default minimum seconds between two progress lines in a log
EVERY_S = 5.0


class Progress:
    """Progress over ``total`` sequences, ``done`` of them already (resumed).

    ``stream``: where to write (default stderr); ``clock``: seconds, monotonic
    (default time.perf_counter).
    """

    def __init__(self, total, done=0, stream=None, every=EVERY_S, clock=time.perf_counter):
        self.total, self.done, self.start_done = total, done, done
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.clock = clock
        self.tokens = 0
        self.chunks = 0
        self.t0 = self.last = clock()
        self._start()

    def update(self, seqs, tokens):
        """One chunk committed: ``seqs`` more sequences done, ``tokens`` more
        tokens processed."""
        self.done += seqs
        self.tokens += tokens
        self.chunks += 1
        now = self.clock()
        if (self.tty or self.chunks == 1 or self.done == self.total
                or now - self.last >= self.every):
            self.last = now
            self._show(now)

    def line(self, now=None):
        """'1234/5000 sequences (24.7%), 5321 tokens/s, ETA 0:02:13'."""
        elapsed = max((self.clock() if now is None else now) - self.t0, 1e-9)
        rate = (self.done - self.start_done) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float('inf')
        eta_text = time.strftime('%H:%M:%S', time.gmtime(eta)) if eta < 8.64e6 else '?'
        return (f'{self.done}/{self.total} sequences ({100 * self.done / self.total:.1f}%), '
                f'{self.tokens / elapsed:.0f} tokens/s, ETA {eta_text}')

    def _start(self):
        """The first line (a log) or the empty bar (a terminal)."""
        if self.tty:
            self._show(self.t0)
            return
        how = f'resuming after {self.done} committed' if self.done else 'starting'
        self.stream.write(f'mpimoe: {self.done}/{self.total} sequences, {how}\n')
        self.stream.flush()

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
