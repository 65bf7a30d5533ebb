"""The dispatcher of a front-end: token copies to the expert ranks and back
over MPI (the interface is in mpimoe.moe.layer).

Micro-batch ``m`` uses slot ``m`` (mpimoe.parallel.slots.Slot): its rows
are permuted straight into the slot's send buffer as 16-bit words, grouped
by (destination rank, local expert); its counts and rows go out by
non-blocking collectives on the layer's communicators, and the combine
waits for the rows coming back.  Between the two the caller computes other
micro-batches, calling :meth:`MPIDispatcher.poll` to progress the transfers.
"""

import numpy as np

from mpimoe.backends.backend import from_words, storage_dtype, to_words
from mpimoe.moe.experts import permute
from mpimoe.moe.layer import NoTimers
from mpimoe.moe.router import spread_copies

__all__ = ['MPIDispatcher']


class MPIDispatcher:
    """slots: one Slot per micro-batch; layers: layer index -> LayerComms;
    copy_keys: layer index -> (permute keys int [E, copies], copies int [E])
    on the backend (mpimoe.planning.placement.Plan.dispatch_keys); rank: this
    rank in the world (spreads its tokens over replicas of an expert).
    ``bytes_sent`` int64 [n_moe_layers] adds up the bytes dispatched and
    combined per MoE layer."""

    def __init__(self, cfg, slots, layers, copy_keys, rank, timers=None):
        self.cfg, self.slots, self.layers = cfg, slots, layers
        self.copy_keys, self.rank = copy_keys, rank
        self.timers = timers or NoTimers()
        self.bytes_sent = np.zeros(cfg.n_moe_layers, dtype=np.int64)
        # per layer: the counts of an empty micro-batch (only read by MPI)
        self.no_rows = {i: np.zeros((lc.size, lc.k), np.int32) for i, lc in layers.items()
                        if lc.member}

    def keys(self, layer, chosen):
        """Each token copy's (destination, local expert) key: int [T, k], and
        the number of keys (the layer's ranks x experts per rank)."""
        keys, copies = self.copy_keys[layer]
        lc = self.layers[layer]
        return keys[chosen, spread_copies(chosen, copies, self.rank)], lc.size * lc.k

    def dispatch(self, handle, h, key, n_keys):
        """Permute h [T, d] into the slot's send buffer and start the transfer
        (no rows when ``handle.n_rows`` is 0); returns the order [T*k]."""
        cfg, lc, slot = self.cfg, self.layers[handle.layer], self.slots[handle.mb]
        n, where = handle.n_rows, dict(layer=handle.layer, mb=handle.mb)
        order, counts = None, self.no_rows[handle.layer]
        with self.timers.span('permute', 'pack', **where):
            slot.wait()
            if n:
                words = to_words(h.astype(storage_dtype(cfg.dtype)))            # [T, d] uint16
                _, order, per_key = permute(words, key, n_keys, out=slot.out.view(n))
        if n:
            # the one copy to the host per layer and micro-batch (MPI needs the
            # counts); on a GPU it waits for the kernels queued so far: a wait
            with self.timers.span('counts', 'wait', **where):
                counts = slot.backend.to_host(per_key, self.poll).reshape(lc.size, lc.k) \
                    .astype(np.int32)
        with self.timers.span('dispatch', 'pack', **where):
            slot.frontend_start(lc, counts, n, self.poll)
        self.bytes_sent[handle.layer - cfg.n_dense_layers] += 2 * n * cfg.d_model * cfg.itemsize
        return order

    def combine(self, handle):
        """Wait for the rows of ``handle``'s micro-batch: float32 [T*k, d]
        (None when it sent none)."""
        slot = self.slots[handle.mb]
        with self.timers.span('combine', 'wait', layer=handle.layer, mb=handle.mb):
            slot.wait(self.poll)
        if not handle.n_rows:
            return None
        return from_words(slot.received(handle.n_rows), self.cfg.dtype)

    def poll(self):
        """Progress every slot's transfers without blocking."""
        for s in self.slots:
            s.test()
