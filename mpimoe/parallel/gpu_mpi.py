"""How device rows reach MPI (``--mpi-gpu``): the library's word, then one
exchange of device buffers before the run trusts it.

What an MPI library says of CUDA is not enough: Open MPI reports support on
builds whose non-blocking collectives do not take device buffers, and none
when CUDA comes through UCX.  So where device buffers are to be handed to
MPI, every rank first sends one small row to every rank with ``Ialltoallv``
from and into device memory and checks what arrived
(:func:`device_exchange_problem`); ``auto`` falls back to host staging when
that fails, an explicit ``device`` stops the job in one line.
"""

import numpy as np

from mpimoe.backends.backend import mpi_cuda_support, mpi_gpu_mode, to_numpy
from mpimoe.errors import ConfigError
from mpimoe.parallel.mpiutil import MPI, wait_all
from mpimoe.planning.text import rank_list

__all__ = ['ROW_WORDS', 'exchange_rows', 'device_exchange_problem', 'choose_mpi_gpu']

#: uint16 words in each rank's row to each rank
ROW_WORDS = 4


def exchange_rows(sender, receivers):
    """The row ``sender`` sends to each of ``receivers``: uint16 [len, ROW_WORDS],
    distinct per pair (sender, receiver), so a row delivered to the wrong
    rank or from the wrong offset shows."""
    r = np.asarray(receivers, np.int64)
    return np.stack([np.full_like(r, sender), r, np.full_like(r, 0xBEEF),
                     (sender * 40503 + r * 2654435761) >> 7], axis=1).astype(np.uint16)


def device_exchange_problem(comm, backend, deadline_s):
    """Why this MPI cannot exchange ``backend``'s device buffers (one line,
    the same on every rank), or None.  Collective over ``comm``.

    Every rank sends :func:`exchange_rows` with ``Ialltoallv`` from a device
    array into a device array and compares what it received with what each
    peer sent.  On NumPy the same exchange runs on host arrays (what the
    tests check on a CPU).
    """
    n, me = comm.size, comm.rank
    counts = np.full(n, ROW_WORDS, np.int64)
    displs = np.arange(n, dtype=np.int64) * ROW_WORDS
    send = backend.asarray(exchange_rows(me, range(n)))
    recv = backend.xp.zeros_like(send)
    backend.synchronize()                       # MPI reads the device buffer after the copy
    try:
        req = comm.Ialltoallv([send, (counts, displs), MPI.UINT16_T],
                              [recv, (counts, displs), MPI.UINT16_T])
        wait_all([req], deadline_s, lambda: 'the one-row exchange of device buffers')
        got = to_numpy(recv)
        expected = np.stack([exchange_rows(s, [me])[0] for s in range(n)])
        wrong = np.flatnonzero((got != expected).any(axis=1)).tolist()
        mine = (f'rows from ranks {rank_list(wrong)} arrived wrong on rank {me}'
                if wrong else None)
    except MPI.Exception as e:
        mine = f'rank {me}: {e.Get_error_string().strip()}'
    problems = [p for p in comm.allgather(mine) if p]
    if not problems:
        return None
    return (f'an Ialltoallv of device buffers failed its start-up check ({problems[0]}'
            f'{f"; {len(problems) - 1} more ranks alike" if len(problems) > 1 else ""})')


def choose_mpi_gpu(comm, backend, requested, deadline_s):
    """The ``--mpi-gpu`` mode of this job: (mode, why, warnings).

    mode: 'device', 'host' or None (NumPy); why: the decision in a few words,
    for the log; warnings: lines to log as warnings.  The same on every
    rank (the library's answer is every rank's, the check's outcome is
    gathered).  An explicit ``device`` whose check fails is a ConfigError
    (raised on every rank alike).
    """
    aware = mpi_cuda_support(MPI)
    mode, warning = mpi_gpu_mode(requested, backend.name, aware)
    warnings = [warning] if warning else []
    said = {True: 'reports CUDA support', False: 'reports no CUDA support',
            None: 'cannot say whether it supports CUDA'}[aware]
    if mode is None:
        return None, 'the numpy backend hands host arrays to MPI', warnings
    if mode == 'host':
        return 'host', ('as requested' if requested == 'host' else
                        f'auto: the MPI library {said}'), warnings
    problem = device_exchange_problem(comm, backend, deadline_s)
    if problem is None:
        return 'device', (f'{"as requested" if requested == "device" else "auto"}: the MPI '
                          f'library {said} and exchanged device buffers at start-up'), warnings
    if requested == 'device':
        raise ConfigError(f'--mpi-gpu device: {problem}; use --mpi-gpu host')
    warnings.append(f'--mpi-gpu auto: the MPI library {said}, but {problem}; '
                    'staging through pinned host buffers instead')
    return 'host', 'auto: device buffers failed the start-up check', warnings
