"""Every MPI concern in one place: ending the whole job on an error, the
node-local rank, node layout, communicators, and waits with a deadline.

Importing this module initialises MPI (mpi4py does on import of ``MPI``).
"""

import os
import signal
import sys
import time
import traceback

import numpy as np
from mpi4py import MPI

from mpimoe.backends.binding import LocalRank, launcher_local_rank
from mpimoe.errors import EXIT_INTERNAL, MpimoeError

__all__ = ['MPI', 'run_guarded', 'local_rank', 'node_ids', 'group_comm', 'wait_all',
           'WaitTimeout']


#: seconds a failing rank waits after printing its error, before Abort
ABORT_GRACE_S = 0.2


class WaitTimeout(MpimoeError):
    """A wait passed its deadline: a peer is hung or dead."""
    exit_code = EXIT_INTERNAL


def run_guarded(comm, fn, *args, **kwargs):
    """Run ``fn`` on this rank; any exception ends the whole job.

    An error every rank detects alike (``exc.collective`` true: bad options, a
    world size that does not fit, a clean stop) is printed by rank 0 only and
    every rank finalizes MPI and exits with its code.  Any other error is
    printed with this rank's number (and the stage it was in) and
    ``comm.Abort`` ends every rank, so a failing rank never leaves the others
    blocked in a collective.  Once the job is ending, SIGINT is ignored.
    Returns fn's result (an exit code) on success.
    """
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # noqa: B902 -- every exception must end the job
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        where = f'rank {comm.rank}'
        stage = getattr(e, 'mpimoe_stage', None)
        if stage:
            where += f', {stage}'
        if isinstance(e, MpimoeError):
            code = e.exit_code
            if getattr(e, 'collective', False):
                if comm.rank == 0:
                    print(f'mpimoe: error: {e}', file=sys.stderr, flush=True)
                # no rank exits before rank 0 has printed; then an orderly exit
                # with the code, not Abort (whose code Open MPI's mpiexec keeps,
                # but with a banner; `-m mpi4py` aborts only while MPI is up)
                comm.Barrier()
                MPI.Finalize()
                sys.exit(code)
            message = f'mpimoe: error ({where}): {e}'
        elif isinstance(e, KeyboardInterrupt):
            code = 130
            message = f'mpimoe: interrupted ({where})'
        elif isinstance(e, SystemExit):
            raise
        else:
            code = EXIT_INTERNAL
            message = (f'{traceback.format_exc()}'
                       f'mpimoe: internal error ({where}): {type(e).__name__}: {e}')
        # one write, then a pause: Abort kills this rank at once, and the
        # process manager drops what it has not yet read from the pipe
        sys.stderr.write(message + '\n')
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        comm.Abort(code)


def local_rank(comm):
    """This rank's :class:`~mpimoe.backends.binding.LocalRank`: the
    launcher's (mpimoe.backends.binding.launcher_local_rank), else its index
    in the shared-memory split of ``comm``.  Collective: every rank splits,
    so ranks that read different environments cannot leave one waiting."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        split = node.rank
    finally:
        node.Free()
    return launcher_local_rank(os.environ) or LocalRank(split, 'shared-memory split')


def node_ids(comm):
    """Node index of every rank, from the shared-memory split: int32 [size].

    Nodes are numbered in the order of their lowest rank.
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    leader = node.bcast(comm.rank, root=0)
    node.Free()
    leaders = np.array(comm.allgather(leader))
    _, ids = np.unique(leaders, return_inverse=True)
    return ids.astype(np.int32)


def group_comm(comm, ranks):
    """A communicator over ``ranks`` of ``comm`` (sorted), created collectively
    by those ranks only (MPI_Comm_create_group); None on other ranks."""
    if comm.rank not in ranks:
        return None
    group = comm.Get_group().Incl(list(ranks))
    try:
        return comm.Create_group(group)
    finally:
        group.Free()


def wait_all(requests, deadline_s, what, poll=None):
    """Complete ``requests`` (a list of MPI requests) or raise WaitTimeout.

    Polls with Testall (MPI progresses non-blocking collectives only inside
    MPI calls), calling ``poll()`` between tests if given, and sleeps with
    growing back-off so that an idle rank does not steal a core from the ranks
    sharing it.  ``what()`` describes what is awaited, for the timeout message.
    Returns the seconds spent waiting.
    """
    t0 = time.perf_counter()
    nap = 0.0
    while not MPI.Request.Testall(requests):
        if poll is not None:
            poll()
        now = time.perf_counter()
        if now - t0 > deadline_s:
            raise WaitTimeout(f'no progress for {deadline_s:g} s waiting for {what()}; '
                              'a peer rank is hung or dead (raise --deadline if legitimately slow)')
        if nap:
            time.sleep(nap)
        nap = min(1e-3, nap * 2 or 2e-5)
    return time.perf_counter() - t0
