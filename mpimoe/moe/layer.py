"""One MoE layer: **route, permute, dispatch, expert, combine, unpermute**,
the same object in the reference and on a front-end.

The layer routes on its own (mpimoe.moe.router) and leaves the moving of
rows to a *dispatcher*: :class:`~mpimoe.moe.local.LocalDispatcher` (all
experts in this process: the reference) or
:class:`~mpimoe.parallel.dispatcher.MPIDispatcher` (the expert ranks over
MPI).  A dispatcher has three methods::

    keys(layer, chosen) -> (key int [T, k], n_keys)   # where each token copy goes
    dispatch(handle, h, key, n_keys) -> order int [T*k] # permute, start the transfer
    combine(handle) -> y [T*k, d] float32               # the experts' rows, permuted order

:meth:`MoELayer.dispatch` returns a :class:`MoEHandle`, which the caller
passes back to :meth:`MoELayer.combine` when it wants the result: a
front-end does other micro-batches' work in between.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from mpimoe.backends.backend import to_numpy
from mpimoe.moe.experts import unpermute
from mpimoe.moe.router import expert_counts, route

__all__ = ['MoEHandle', 'MoELayer', 'NoTimers']


class NoTimers:
    """Stand-in for mpimoe.runtime.metrics.Timers where nothing is timed."""

    def span(self, *args, **kwargs):
        return nullcontext()


@dataclass
class MoEHandle:
    """One micro-batch's trip through one MoE layer, from dispatch to combine.

    layer: the layer's index in the model; mb: the micro-batch (its slot);
    n_rows: token copies sent (T*k; 0 for an empty micro-batch); order: int
    [T*k], the copy index ``t*k + j`` of each permuted row; weights: float32
    [T, k] combine weights (None when empty).
    """
    layer: int
    mb: int
    n_rows: int = 0
    order: object = None
    weights: object = None


class MoELayer:
    """The MoE FFN of layer ``layer``.

    router: float32 [d, E] (on the backend); dispatcher: see the module
    docstring; score_bias: the checkpoint's FP32 [E] ``router_bias`` or None;
    ``bias``: optional float32 [E] balancing bias, set by the caller.  Both
    shift the choice, never the weights (mpimoe.moe.router).
    :meth:`take_counts` gives the token copies routed to each expert since
    its last call.
    """

    def __init__(self, layer, router, cfg, dispatcher, timers=None, score_bias=None):
        self.layer, self.router, self.cfg = layer, router, cfg
        self.dispatcher = dispatcher
        self.timers = timers or NoTimers()
        self.score_bias = score_bias
        self.bias = None
        self._counts = None     # int64 [E] on the router's module, since take_counts

    def dispatch(self, h, mb):
        """Stages route, permute, dispatch of micro-batch ``mb``: h float32
        [T, d] (the normed FFN input) -> MoEHandle."""
        cfg, span = self.cfg, self.timers.span
        with span('route', 'compute', layer=self.layer, mb=mb):
            chosen, weights = route(h, self.router, cfg.top_k, self._choice_bias(),
                                    cfg.router)                                 # [T, k]
            counts = expert_counts(chosen, cfg.n_experts)      # stays on the device
            self._counts = counts if self._counts is None else self._counts + counts
            key, n_keys = self.dispatcher.keys(self.layer, chosen)
        handle = MoEHandle(self.layer, mb, int(chosen.size), weights=weights)
        handle.order = self.dispatcher.dispatch(handle, h, key, n_keys)
        return handle

    def take_counts(self):
        """Token copies routed to each expert since the last call: int64 [E]
        on the host (one copy from the device per call: a step, not a layer)."""
        counts, self._counts = self._counts, None
        return np.zeros(self.cfg.n_experts, np.int64) if counts is None else to_numpy(counts)

    def _choice_bias(self):
        """The bias added to the scores for the choice: float32 [E] or None."""
        if self.bias is None or self.score_bias is None:
            return self.score_bias if self.bias is None else self.bias
        return self.score_bias + self.bias

    def dispatch_empty(self, mb):
        """Dispatch for an empty micro-batch: the transfers every rank of the
        layer expects, with no rows."""
        handle = MoEHandle(self.layer, mb)
        self.dispatcher.dispatch(handle, None, None, 0)
        return handle

    def combine(self, handle, x):
        """Stages combine and unpermute: x float32 [T, d] + the layer's output
        for the micro-batch of ``handle``."""
        y = self.dispatcher.combine(handle)
        if not handle.n_rows:
            return x
        with self.timers.span('unpermute', 'pack', layer=self.layer, mb=handle.mb):
            out = unpermute(y, handle.order, handle.weights)
            out += x
            return out
