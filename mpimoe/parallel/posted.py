"""A result on its way: what a posted collective hands back, so that its
caller can do other work (another micro-batch) before it waits.

No MPI here: the single-process model hands back :meth:`Posted.ready` values
through the same interface.
"""

__all__ = ['Posted']


class Posted:
    """finish(): completes the transfer and returns its result; called once,
    by :meth:`wait`."""

    __slots__ = ('_finish',)

    def __init__(self, finish):
        self._finish = finish

    @classmethod
    def ready(cls, value):
        """A result already at hand."""
        return cls(lambda: value)

    def wait(self):
        """The result, once the transfer is complete."""
        return self._finish()

    def then(self, fn):
        """A Posted of ``fn(result)``."""
        return Posted(lambda: fn(self._finish()))
