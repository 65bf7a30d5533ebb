"""The collectives of a tensor-parallel front-end group (``--tp T``): T ranks
on one node that hold one copy of the non-expert weights between them
(mpimoe.model.tp_frontend).

Every collective is non-blocking and waited for under the run's deadline
(mpimoe.parallel.mpiutil.wait_all), so a dead peer ends the job instead of
hanging it; the wait counts as stage ``tp``, inside the compute stage that
needs the result (no category of its own, so as not to count it twice).
:meth:`TensorGroup.post_allreduce` hands back the sum on its way (a
mpimoe.parallel.posted.Posted), so that the forward pass runs another
micro-batch before it waits (mpimoe.model.forward).  Rows are FP32.  On
CuPy, ``--mpi-gpu device`` hands MPI the device arrays (after synchronising
the stream that wrote them); ``host`` copies them to the host and back.
"""

import numpy as np

from mpimoe.backends.backend import to_numpy
from mpimoe.parallel.mpiutil import MPI, wait_all
from mpimoe.parallel.posted import Posted

__all__ = ['TensorGroup', 'share']


def share(n, rank, size):
    """Rows [lo, hi) of ``n`` that rank ``rank`` of ``size`` owns: contiguous,
    the first ``n % size`` ranks one more."""
    return n * rank // size, n * (rank + 1) // size


class TensorGroup:
    """comm: the group's communicator (ranks in group order); backend:
    mpimoe.backends.backend.Backend; mode: the --mpi-gpu mode (None on NumPy);
    deadline_s: the run's --deadline; timers: mpimoe.runtime.metrics.Timers."""

    def __init__(self, comm, backend, mode, deadline_s, timers):
        self.comm, self.backend, self.mode, self.deadline_s = comm, backend, mode, deadline_s
        self.timers = timers
        self.rank, self.size = comm.rank, comm.size
        # posted collectives not yet waited for: (request, send buffer), the
        # buffer kept alive here (and the receive buffer by the Posted): the
        # request of mpi4py 4.1's Iallreduce holds neither, and on a GPU the
        # memory pool would hand a freed one to the next kernel
        self._posted = []

    def _host(self, x):
        """What MPI reads: ``x`` itself (NumPy, or device buffers), else a host copy."""
        if self.mode == 'device':
            self.backend.synchronize()
            return x
        return np.ascontiguousarray(to_numpy(x))

    def _empty(self, shape):
        """A receive buffer where MPI writes: on the device with ``device``."""
        xp = self.backend.xp if self.mode == 'device' else np
        return xp.empty(shape, np.float32)

    def _back(self, received):
        """A received buffer as an array of the backend."""
        return received if self.mode == 'device' else self.backend.asarray(received)

    def _wait(self, req, what):
        self.timers.add('tp', None, wait_all([req], self.deadline_s,
                                             lambda: f'the tensor-parallel group ({what})'))

    def post_allreduce(self, x):
        """The sum over the group of x float32 [n, d], posted: a Posted of
        [n, d].  Every rank of the group posts the same collectives in the
        same order."""
        send = self._host(self.backend.xp.ascontiguousarray(x, dtype=np.float32))
        recv = self._empty(send.shape)
        req = self.comm.Iallreduce(send, recv, op=MPI.SUM)
        self._posted.append((req, send))

        def finish():
            self._wait(req, 'Allreduce')
            self._posted = [p for p in self._posted if p[0] is not req]
            return self._back(recv)
        return Posted(finish)

    def poll(self):
        """Progress the posted collectives without blocking (MPI moves them
        only inside MPI calls)."""
        if self._posted:
            MPI.Request.Testall([req for req, _ in self._posted])

    def allreduce(self, x):
        """The sum over the group of x float32 [n, d] -> [n, d]."""
        return self.post_allreduce(x).wait()

    def allgather_rows(self, x, n):
        """Every rank's rows, in rank order: x float32 [rows of this rank's
        :func:`share` of n, d] -> [n, d]."""
        d = x.shape[1]
        counts = np.diff([share(n, r, self.size)[0] for r in range(self.size)] + [n])
        send = self._host(self.backend.xp.ascontiguousarray(x, dtype=np.float32))
        recv = self._empty((n, d))
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]) * d
        self._wait(self.comm.Iallgatherv(send, [recv, (counts * d, displs), MPI.FLOAT]),
                   'Allgatherv of rows')
        return self._back(recv)

    def allgather_cols(self, x):
        """Every rank's columns side by side: x float32 [n, w] -> [n, size * w]."""
        send = self._host(self.backend.xp.ascontiguousarray(x, dtype=np.float32))
        shape = (self.size,) + tuple(send.shape)
        recv = self._empty(shape)
        self._wait(self.comm.Iallgather(send, recv), 'Allgather of columns')
        out = self._back(recv)                                       # [size, n, w]
        return out.transpose(1, 0, 2).reshape(x.shape[0], self.size * x.shape[1])

    def bcast(self, obj):
        """The group leader's ``obj`` (pickled) on every rank of the group."""
        return self.comm.bcast(obj, root=0)
