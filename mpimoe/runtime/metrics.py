"""Timers by category (compute, wait, pack), stage labels for errors, and the
optional timeline trace.

Every stage of the engine runs inside :meth:`Timers.span`, which adds its
duration to its category and, if the stage raises, labels the exception with
the stage so the abort message can name it.  With tracing on it also records
the span for a Chrome/Perfetto trace (``--trace DIR``); off, it records
nothing.

On a GPU the host only queues a compute stage's kernels, so its host time is
the time to enqueue them: there a ``compute`` span records a CUDA event
before and after it on the current stream and counts the device time
between them, read once the events are done: as later
spans close, and all at :meth:`Timers.summary`.  Other categories (waits,
packing, I/O) stay host time.  In the trace a device-timed span starts
where the host queued it and lasts its device time, so it may overlap the
host spans that follow it.
"""

import time
from collections import defaultdict, deque
from contextlib import contextmanager

from mpimoe.io.files import write_json

__all__ = ['Timers', 'write_trace']


class Timers:
    """Seconds per category and per stage name of one rank.

    trace: record every span as (stage, category, start s, duration s, where).
    """

    def __init__(self, trace=False, cuda=None):
        """cuda: the ``cupy.cuda`` module to time compute spans with CUDA
        events (a GPU backend), or None (host time for every span)."""
        self.by_category = defaultdict(float)
        self.by_stage = defaultdict(float)
        self.events = [] if trace else None
        self.origin = time.perf_counter()
        self.cuda = cuda
        self._pending = deque()   # compute spans in flight: (stage, start, stop, t0, where)

    @contextmanager
    def span(self, stage, category, **where):
        """Time the block as ``stage`` (e.g. 'expert') in ``category``
        ('compute', 'wait', 'pack'); ``where`` (layer=, mb=) labels errors
        and trace events."""
        t0 = time.perf_counter()
        device = self.cuda is not None and category == 'compute'
        if device:
            start = self.cuda.Event()
            start.record()
        try:
            yield
        except BaseException as e:
            if not getattr(e, 'mpimoe_stage', None):
                e.mpimoe_stage = ' '.join([f'stage {stage}'] +
                                          [f'{k} {v}' for k, v in where.items()])
            raise
        finally:
            if device:
                stop = self.cuda.Event()
                stop.record()
                self._pending.append((stage, start, stop, t0, where))
                self._collect(block=False)
            else:
                self._count(stage, category, t0, time.perf_counter() - t0, where)

    def _count(self, stage, category, t0, dt, where):
        self.by_category[category] += dt
        self.by_stage[stage] += dt
        if self.events is not None:
            self.events.append((stage, category, t0 - self.origin, dt, where))

    def _collect(self, block):
        """Count the device time of the compute spans whose events are done
        (in order; ``block``: wait for all of them)."""
        while self._pending and (block or self._pending[0][2].done):
            stage, start, stop, t0, where = self._pending.popleft()
            stop.synchronize()
            self._count(stage, 'compute', t0,
                        self.cuda.get_elapsed_time(start, stop) / 1e3, where)

    def add(self, stage, category, seconds):
        """Account ``seconds`` measured elsewhere (e.g. a wait inside a poll);
        category None: to ``stage`` only, for time that a span around it
        already counts in its category."""
        if category is not None:
            self.by_category[category] += seconds
        self.by_stage[stage] += seconds

    def summary(self):
        self._collect(block=True)
        return {'category_s': dict(self.by_category), 'stage_s': dict(self.by_stage)}

    def chrome_events(self, pid, label):
        """This rank's spans as Chrome trace events (process ``pid`` named ``label``)."""
        self._collect(block=True)
        out = [{'ph': 'M', 'name': 'process_name', 'pid': pid, 'args': {'name': label}},
               {'ph': 'M', 'name': 'process_sort_index', 'pid': pid,
                'args': {'sort_index': pid}}]
        for stage, category, t0, dt, where in self.events or ():
            out.append({'ph': 'X', 'name': stage, 'cat': category, 'pid': pid, 'tid': 0,
                        'ts': round(t0 * 1e6, 3), 'dur': round(dt * 1e6, 3),
                        'args': {k: int(v) if isinstance(v, int) else str(v)
                                 for k, v in where.items()}})
        return out


def write_trace(path, events):
    """Write Chrome trace events (a list of dicts) to ``path`` (open it in
    https://ui.perfetto.dev or chrome://tracing)."""
    write_json(path, {'traceEvents': events, 'displayTimeUnit': 'ms'}, indent=None)
