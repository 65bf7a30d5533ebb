"""Stages 3 and 5 of an MoE layer, the only ones that communicate:
**dispatch** (front-ends -> expert ranks) and **combine** (back).

Each MoE layer has three communicators over its ranks (front-ends + the ranks
hosting that layer's experts): ``counts`` (Ialltoall of per-expert row counts),
``dispatch`` and ``combine`` (Ialltoallv of rows).  Keeping them apart means the
non-blocking collectives of one kind are issued in the same order on every
rank (micro-batch order) whatever order their requests complete in.

Rows travel as 16-bit words, one contiguous MPI datatype per row of ``d``
words.  A :class:`Slot` owns the buffers of one micro-batch (reused across
layers and steps, grown only when a step needs more) and the requests in
flight on them.  On a GPU the buffers are device rows: MPI gets them directly
(``--mpi-gpu device``, once the stream that wrote them is done) or through
pinned host copies (``host``: mpimoe.backends.backend.HostStaging).
"""

import numpy as np

from mpimoe.backends.backend import Backend, HostStaging, Rows
from mpimoe.parallel.mpiutil import MPI, group_comm, wait_all
from mpimoe.planning.text import rank_list

__all__ = ['LayerComms', 'Slot']


class LayerComms:
    """The communicators of one MoE layer on this rank (None if not a member).

    ranks: sorted world ranks of the layer; k_slots (K): experts per rank in
    this layer (the permute key of a row is ``position_in_comm * K + slot``,
    mpimoe.planning.plan.Plan.dispatch_keys).
    """

    def __init__(self, world, ranks, k_slots):
        self.ranks = np.asarray(ranks)
        self.k = k_slots
        self.counts = group_comm(world, self.ranks.tolist())
        self.member = self.counts is not None
        if self.member:
            self.dispatch = self.counts.Dup()
            self.combine = self.counts.Dup()
            self.size = self.counts.size

    def free(self):
        if self.member:
            for c in (self.counts, self.dispatch, self.combine):
                c.Free()


class Slot:
    """Buffers and requests of one micro-batch slot.

    ``out`` holds the rows this rank sends (front-end: dispatched rows;
    expert: results), ``inp`` the rows it receives, both arrays of
    ``backend`` (default NumPy).  mode: None (host arrays), 'device' (MPI
    takes the device rows) or 'host' (MPI takes pinned copies, ``staging``).
    """

    def __init__(self, d, rowtype, deadline_s, backend=None, mode=None):
        self.backend = backend or Backend('numpy')
        self.out = Rows(d, self.backend.xp.empty)
        self.inp = Rows(d, self.backend.xp.empty)
        self.staging = HostStaging(d, self.backend) if mode == 'host' else None
        self.none = np.empty((0, d), dtype=np.uint16)     # the side of a transfer with no rows
        self.rowtype = rowtype
        self.deadline_s = deadline_s
        self.reqs = []            # requests whose buffers are in use
        self.count_req = None     # expert side: counts not yet turned into rows
        self.peer_counts = None   # expert side: int32 [size, K] rows per (peer, local expert)
        self.what = ''

    # -- front-end side -------------------------------------------------------

    def frontend_start(self, lc, send_counts, n_rows, poll=None):
        """Dispatch ``out[:n_rows]`` and post the receive of its results.

        send_counts: int32 [lc.size, K] rows per (destination, local expert),
        the rows in ``out`` grouped in that order; poll(): called while the
        GPU finishes writing the rows (other slots' transfers progress).
        """
        self.wait()
        per_peer = send_counts.sum(axis=1).astype(np.int32)
        zeros = np.zeros(lc.size, dtype=np.int32)
        displ = _displacements(per_peer)
        out = self._send_view(n_rows, poll)
        self.reqs = [
            lc.counts.Ialltoall(np.ascontiguousarray(send_counts, dtype=np.int32),
                                np.empty_like(send_counts, dtype=np.int32)),
            lc.dispatch.Ialltoallv([out, (per_peer, displ), self.rowtype],
                                   [self.none, (zeros, zeros), self.rowtype]),
            lc.combine.Ialltoallv([self.none, (zeros, zeros), self.rowtype],
                                  [self._recv_view(n_rows), (per_peer, displ), self.rowtype]),
        ]
        self.what = f'rows back from layer ranks {_nonzero(lc.ranks, per_peer)}'

    # -- expert side ----------------------------------------------------------

    def expert_post_counts(self, lc):
        """Post the receive of the row counts of this micro-batch."""
        self.wait()
        self.lc = lc
        self.peer_counts = np.zeros((lc.size, lc.k), dtype=np.int32)
        self.count_req = lc.counts.Ialltoall(np.zeros((lc.size, lc.k), dtype=np.int32),
                                             self.peer_counts)
        self.what = f'row counts from layer ranks {rank_list(lc.ranks.tolist())}'

    def expert_post_rows(self):
        """Once the counts are in, post the receive of the rows; True when posted."""
        if self.count_req is None:
            return True
        if not self.count_req.Test():
            return False
        self.count_req = None
        lc = self.lc
        per_peer = self.peer_counts.sum(axis=1).astype(np.int32)
        zeros = np.zeros(lc.size, dtype=np.int32)
        self.reqs = [lc.dispatch.Ialltoallv([self.none, (zeros, zeros), self.rowtype],
                                            [self._recv_view(int(per_peer.sum())),
                                             (per_peer, _displacements(per_peer)), self.rowtype])]
        self.what = f'dispatched rows from ranks {_nonzero(lc.ranks, per_peer)}'
        return True

    def expert_received(self, poll):
        """Wait for the dispatched rows: (rows uint16 [n, d] of the backend,
        counts int32 [size, K] on the host).

        ``poll()`` is called while waiting (it advances the other slots).
        """
        wait_all([self.count_req] if self.count_req else [], self.deadline_s,
                 lambda: f'{self.what} of this micro-batch', poll)
        self.expert_post_rows()
        self.wait(poll)
        return self.received(int(self.peer_counts.sum())), self.peer_counts

    def expert_send(self, n_rows, poll=None):
        """Send ``out[:n_rows]`` back, in the order the rows arrived (poll: as
        in :meth:`frontend_start`)."""
        lc = self.lc
        per_peer = self.peer_counts.sum(axis=1).astype(np.int32)
        zeros = np.zeros(lc.size, dtype=np.int32)
        self.reqs = [lc.combine.Ialltoallv([self._send_view(n_rows, poll),
                                           (per_peer, _displacements(per_peer)), self.rowtype],
                                          [self.none, (zeros, zeros), self.rowtype])]
        self.what = f'results to ranks {_nonzero(lc.ranks, per_peer)}'

    # -- both -----------------------------------------------------------------

    def received(self, n_rows):
        """The ``n_rows`` rows the completed receive brought, as rows of the
        backend: ``inp[:n_rows]`` (host mode: uploaded from the staging first)."""
        rows = self.inp.view(n_rows)
        if self.staging is not None:
            self.staging.upload(rows)
        return rows

    def _send_view(self, n_rows, poll=None):
        """``out[:n_rows]`` as MPI may read it now: the rows themselves once the
        stream that wrote them is done, or (host mode) their pinned copy;
        ``poll()`` is called while waiting for either."""
        rows = self.out.view(n_rows)
        if self.staging is None:
            self.backend.wait_polling(poll)
            return rows
        host = self.staging.download(rows)
        self.staging.wait(poll)
        return host

    def _recv_view(self, n_rows):
        """Where MPI may write ``n_rows`` rows: ``inp`` or (host mode) the
        pinned staging, once its last upload is done; :meth:`received` then
        gives them as rows of the backend."""
        if self.staging is None:
            return self.inp.view(n_rows)
        self.staging.wait()
        return self.staging.inp.view(n_rows)

    def test(self):
        """Drive progress without blocking; True when nothing is in flight."""
        return MPI.Request.Testall(self.reqs) if self.reqs else True

    def wait(self, poll=None):
        """Complete the requests in flight (deadline: WaitTimeout); seconds waited."""
        if not self.reqs:
            return 0.0
        waited = wait_all(self.reqs, self.deadline_s, lambda: self.what, poll)
        self.reqs = []
        return waited


def _displacements(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)


def _nonzero(ranks, counts):
    """'{rank: rows}' of the peers with a non-zero count, for error messages."""
    pairs = [f'{r}: {c}' for r, c in zip(ranks.tolist(), np.asarray(counts).tolist()) if c]
    return '{' + ', '.join(pairs[:16]) + (', ...' if len(pairs) > 16 else '') + '}'
