"""BLAS threads per rank, sized from the cores the rank really has.

A BLAS library starts as many threads as the process sees cores; nine ranks
on two cores then run eighteen threads that thrash.  Each rank instead takes,
in this order: ``--threads N``; ``SLURM_CPUS_PER_TASK`` (srun gave each task
its cores); else the cores of its CPU affinity divided among the ranks of its
node whose affinity sets overlap it (a launcher that binds ranks to disjoint
cores leaves each rank its whole set).  threadpoolctl applies the number to
the BLAS and OpenMP pools already loaded (NumPy's), for the whole process.
"""

import os

import numpy  # noqa: F401 -- loads NumPy's BLAS: threadpoolctl limits the libraries loaded
from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ['blas_threads', 'rank_threads', 'process_threads', 'apply_threads']


def blas_threads(explicit=None, slurm_cpus=None, mine=(), peers=()):
    """The BLAS threads of one rank and why: (n >= 1, reason).

    explicit: ``--threads`` or None; slurm_cpus: ``SLURM_CPUS_PER_TASK`` as
    set (str) or None; mine: the CPUs of this rank's affinity; peers: the
    affinity sets of every rank on this node, this one included (empty for a
    single process).
    """
    if explicit is not None:
        return explicit, f'--threads {explicit}'
    if slurm_cpus and slurm_cpus.strip().isdigit() and int(slurm_cpus) >= 1:
        return int(slurm_cpus), f'SLURM_CPUS_PER_TASK={int(slurm_cpus)}'
    mine = set(mine)
    sharing = max(1, sum(1 for p in peers if mine & set(p)))
    n = max(1, len(mine) // sharing)
    if sharing == 1:
        return n, f'{len(mine)} cores of its own'
    return n, f'{len(mine)} cores shared by {sharing} ranks'


def _affinity():
    """This process's CPUs (all of them where the OS has no affinity call)."""
    if hasattr(os, 'sched_getaffinity'):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def rank_threads(comm, explicit=None):
    """:func:`blas_threads` of this rank of ``comm`` (collective: the ranks
    of each node exchange their affinity sets)."""
    from mpimoe.parallel.mpiutil import MPI
    mine = _affinity()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        peers = node.allgather(mine)
    finally:
        node.Free()
    return blas_threads(explicit, os.environ.get('SLURM_CPUS_PER_TASK'), mine, peers)


def process_threads(explicit=None):
    """:func:`blas_threads` of a process that runs alone (reference, bench)."""
    return blas_threads(explicit, os.environ.get('SLURM_CPUS_PER_TASK'), _affinity())


def apply_threads(n):
    """Limit the BLAS and OpenMP pools of this process to ``n`` threads;
    -> the BLAS libraries found, e.g. ['openblas'] (NumPy must be imported)."""
    threadpool_limits(limits=n, user_api='blas')
    threadpool_limits(limits=n, user_api='openmp')
    return sorted({p['internal_api'] for p in threadpool_info() if p['user_api'] == 'blas'})
