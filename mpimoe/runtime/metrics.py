"""Timers by category (compute, wait, pack), stage labels for errors, and the
optional timeline trace.

Every stage of the engine runs inside :meth:`Timers.span`, which adds its
duration to its category and, if the stage raises, labels the exception with
the stage so the abort message can name it.  With tracing on it also records
the span for a Chrome/Perfetto trace (``--trace DIR``); off, it records
nothing.
"""

import time
from collections import defaultdict
from contextlib import contextmanager

from mpimoe.io.files import write_json

__all__ = ['Timers', 'write_trace']


class Timers:
    """Seconds per category and per stage name of one rank.

    trace: record every span as (stage, category, start s, duration s, where).
    """

    def __init__(self, trace=False):
        self.by_category = defaultdict(float)
        self.by_stage = defaultdict(float)
        self.events = [] if trace else None
        self.origin = time.perf_counter()

    @contextmanager
    def span(self, stage, category, **where):
        """Time the block as ``stage`` (e.g. 'expert') in ``category``
        ('compute', 'wait', 'pack'); ``where`` (layer=, mb=) labels errors
        and trace events."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as e:
            if not getattr(e, 'mpimoe_stage', None):
                e.mpimoe_stage = ' '.join([f'stage {stage}'] +
                                          [f'{k} {v}' for k, v in where.items()])
            raise
        finally:
            dt = time.perf_counter() - t0
            self.by_category[category] += dt
            self.by_stage[stage] += dt
            if self.events is not None:
                self.events.append((stage, category, t0 - self.origin, dt, where))

    def add(self, stage, category, seconds):
        """Account ``seconds`` measured elsewhere (e.g. a wait inside a poll)."""
        self.by_category[category] += seconds
        self.by_stage[stage] += seconds

    def summary(self):
        return {'category_s': dict(self.by_category), 'stage_s': dict(self.by_stage)}

    def chrome_events(self, pid, label):
        """This rank's spans as Chrome trace events (process ``pid`` named ``label``)."""
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
