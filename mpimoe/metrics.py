"""Timers by category (compute, wait, pack) and stage labels for errors.

Every stage of the engine runs inside :meth:`Timers.span`, which adds its
duration to its category and, if the stage raises, labels the exception with
the stage so the abort message can name it.
"""

import time
from collections import defaultdict
from contextlib import contextmanager

__all__ = ['Timers']


class Timers:
    """Seconds per category and per stage name of one rank."""

    def __init__(self):
        self.by_category = defaultdict(float)
        self.by_stage = defaultdict(float)

    @contextmanager
    def span(self, stage, category, **where):
        """Time the block as ``stage`` (e.g. 'expert') in ``category``
        ('compute', 'wait', 'pack'); ``where`` (layer=, mb=) labels errors."""
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

    def add(self, stage, category, seconds):
        """Account ``seconds`` measured elsewhere (e.g. a wait inside a poll)."""
        self.by_category[category] += seconds
        self.by_stage[stage] += seconds

    def summary(self):
        return {'category_s': dict(self.by_category), 'stage_s': dict(self.by_stage)}
