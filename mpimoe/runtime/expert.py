"""An expert rank: holds its experts and computes whatever rows arrive,
layer after layer, one step at a time, until rank 0 says DONE.

For each hosted layer it posts, per micro-batch slot, the receive of the row
counts, then of the rows; computes each micro-batch's rows as soon as they are
in and sends the results back in the order the rows came.  While it computes,
it polls the other slots' transfers (MPI moves them only inside MPI calls):
on a CPU between pieces of POLL_ROWS rows, on a GPU while the kernels
queued for the micro-batch run (mpimoe.backends.backend.Backend.wait_polling),
in one GEMM per expert.
"""

import numpy as np

from mpimoe.backends.backend import from_words, storage_dtype, to_words
from mpimoe.moe.experts import run_experts
from mpimoe.runtime.role import MORE, Role

__all__ = ['ExpertRank', 'POLL_ROWS', 'regroup_order']

#: rows an expert computes between two polls of the transfers in flight
POLL_ROWS = 1024


def regroup_order(counts, xp=np):
    """The order that groups rows arriving grouped by (peer, local expert) by
    (local expert, peer), each block's rows in arrival order: counts int
    [size, K] (host) -> int64 [n] of array module ``xp``, row ``i`` of the
    result the arriving row it takes (a stable sort by expert, without sorting).

    The host works on the size x K blocks only; the n rows' order is built
    where the rows are (on a GPU: one binary search per row, no [n] upload):
    row i of the new order, in block b, takes arriving row i + shift[b].
    """
    counts = np.asarray(counts, np.int64)
    start = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)   # [size, K]
    by_expert = counts.T.ravel()                                       # blocks in new order
    ends = np.cumsum(by_expert)                                        # their new ends
    shift = start.T.ravel() - (ends - by_expert)                       # [size*K]
    rows = xp.arange(int(ends[-1]), dtype=np.int64)
    block = xp.searchsorted(xp.asarray(ends), rows, side='right')
    return rows + xp.asarray(shift)[block]


class ExpertRank(Role):
    """hosted: layer index in the model -> this rank's expert weight dicts
    ([d, h] / [h, d], mpimoe.backends.backend.Backend.weights) in slot order."""

    is_frontend = False

    def __init__(self, world, cfg, plan, opts, layers, timers, hosted, backend=None, mode=None):
        super().__init__(world, cfg, plan, opts, layers, timers, backend, mode)
        self.hosted = hosted
        self.compute = self.faulty('expert', run_experts)
        # rows computed per hosted expert: layer -> int64 [experts of the layer here]
        self.rows = {layer: np.zeros(len(ws), dtype=np.int64) for layer, ws in hosted.items()}

    def run(self, stop):
        """Serve steps until rank 0 says DONE, or raise where it says STOP
        (``stop`` is rank 0's business)."""
        self.stop = stop
        # the last step's results have reached the front-ends before each
        # control message: nothing is in flight when a stop ends the job
        while self.next_step() == MORE:
            for layer in self.hosted:
                self.serve_layer(layer)
            self.drain()

    def serve_layer(self, layer):
        """Stages dispatch (receive), expert, combine (send) of one layer, all micro-batches."""
        lc, cfg, experts = self.layers[layer], self.cfg, self.hosted[layer]
        for s in self.slots:
            with self.timers.span('combine', 'wait', layer=layer):
                s.wait()
            s.expert_post_counts(lc)
        for m, slot in enumerate(self.slots):
            with self.timers.span('dispatch', 'wait', layer=layer, mb=m):
                words, counts = slot.expert_received(self._poll)
            if not len(words):    # an empty micro-batch only answers its collectives
                slot.expert_send(0)
                continue
            with self.timers.span('unpack', 'pack', layer=layer, mb=m):
                regroup = self._regroup(counts)
                x16 = from_words(words, cfg.dtype)
                if regroup is not None:
                    x16 = x16[regroup]
                if not self.backend.is_gpu:   # the FP32 contract (mpimoe.model.layers.expert_ffn)
                    x16 = x16.astype(np.float32)
            with self.timers.span('expert', 'compute', layer=layer, mb=m):
                per_expert = counts.sum(axis=0)[:len(experts)]                # [experts here]
                self.rows[layer] += per_expert
                y = self.compute(x16, per_expert, experts, cfg.expert_kind, cfg.dtype,
                                 poll=self._poll, chunk=None if self.backend.is_gpu else POLL_ROWS)
                self.backend.wait_polling(self._poll)
            with self.timers.span('combine', 'pack', layer=layer, mb=m):
                out = slot.out.view(len(words))
                out[slice(None) if regroup is None else regroup] = \
                    to_words(y.astype(storage_dtype(cfg.dtype), copy=False))
                slot.expert_send(len(words), self._poll)

    def _regroup(self, counts):
        """Rows arrive grouped by (sending peer, local expert); the order that
        groups them by expert: int64 [n] on the backend, or None when they already
        are (one expert here, or one peer sent rows).  counts: int [size, K]."""
        size, k = counts.shape
        if k == 1 or np.count_nonzero(counts.sum(axis=1)) <= 1:
            return None
        return regroup_order(counts, self.backend.xp)

    def _poll(self):
        """Post row receives whose counts arrived (in micro-batch order), test sends."""
        for s in self.slots:
            if not s.expert_post_rows():
                break
        for s in self.slots:
            s.test()

    def report(self):
        out = super().report()
        out['role'] = 'expert'
        out['experts'] = [list(p) for p in self.plan.rank_experts(self.world.rank)]
        out['rows'] = [int(v) for layer in sorted(self.rows) for v in self.rows[layer]]
        return out
