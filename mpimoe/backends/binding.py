"""Which GPU a rank takes, chosen before MPI is initialised where it can be.

An MPI library built with CUDA (MPICH, Open MPI) creates a CUDA context in
``MPI_Init`` on the device current at that moment: a rank that makes its GPU
current only afterwards leaves one more context on GPU 0 for every rank of
the node.  So ``mpimoe run`` and ``mpimoe bench gpu`` read the node-local
rank from the launcher's environment and make the GPU current before
mpi4py's ``MPI`` is imported (:func:`bind_early`); where no launcher says,
the rank binds after ``MPI_Init`` from the shared-memory split
(mpimoe.parallel.mpiutil.local_rank).

Nothing here imports mpi4py's ``MPI`` (that would initialise MPI), and the
choices are pure functions of the environment, tested on a CPU.
"""

import os
from dataclasses import dataclass

from mpimoe.errors import ConfigError
from mpimoe.planning.text import rank_list

__all__ = ['LOCAL_RANK_VARS', 'LocalRank', 'launcher_local_rank', 'launcher_rank', 'bind_device',
           'bind_early', 'sharing_problem']

#: the node-local rank of each launcher, in the order they are trusted: an
#: MPI launcher's own first, Slurm's only for tasks srun started
LOCAL_RANK_VARS = ('OMPI_COMM_WORLD_LOCAL_RANK',    # Open MPI's mpirun
                   'MPI_LOCALRANKID',               # MPICH's and Intel MPI's Hydra
                   'PALS_LOCAL_RANKID',             # Cray PALS (aprun/mpiexec)
                   'SLURM_LOCALID')                 # srun

#: the global rank a process manager gives each process (PMI-1/2, PMIx)
_GLOBAL_RANK_VARS = ('PMI_RANK', 'PMIX_RANK')


@dataclass(frozen=True)
class LocalRank:
    """A rank's index among the ranks of its node, and where it was read."""
    index: int
    source: str
    """The environment variable, or 'shared-memory split'."""


def launcher_local_rank(environ):
    """The node-local rank the launcher gives this process, or None.

    environ: a mapping like ``os.environ``.  ``SLURM_LOCALID`` counts only
    for a task srun started: an ``mpiexec`` inside a Slurm allocation
    starts every rank with the batch shell's ``SLURM_LOCALID=0``, so Slurm's
    value is taken only when the process manager's global rank (PMI_RANK,
    PMIX_RANK), where set, is ``SLURM_PROCID``.
    """
    for var in LOCAL_RANK_VARS:
        value = environ.get(var, '')
        if not value.isdigit():
            continue
        if var == 'SLURM_LOCALID' and not _started_by_srun(environ):
            continue
        return LocalRank(int(value), var)
    return None


def launcher_rank(environ):
    """The global rank the launcher gives this process (int), or None outside
    one: the process manager's (PMI_RANK, PMIX_RANK), Open MPI's, or srun's."""
    for var in (*_GLOBAL_RANK_VARS, 'OMPI_COMM_WORLD_RANK'):
        if environ.get(var, '').isdigit():
            return int(environ[var])
    return int(environ['SLURM_PROCID']) if _in_srun_step(environ) else None


def _in_srun_step(environ):
    """Whether this process is a task of an srun step (SLURM_PROCID is its rank)."""
    return 'SLURM_STEP_ID' in environ and environ.get('SLURM_PROCID', '').isdigit()


def _started_by_srun(environ):
    if not _in_srun_step(environ):
        return False
    procid = environ['SLURM_PROCID']
    return all(environ[v] == procid for v in _GLOBAL_RANK_VARS if v in environ)


def bind_device(local_rank, n_devices):
    """The GPU of a rank: its node-local rank modulo the visible devices
    (ranks beyond the device count share GPUs round-robin)."""
    if n_devices < 1:
        raise ConfigError('no CUDA device is visible to bind this rank to')
    if local_rank < 0:
        raise ValueError(f'node-local rank {local_rank} < 0')
    return local_rank % n_devices


def bind_early(requested, environ=os.environ):
    """Before MPI is initialised: make this process's GPU current when the
    backend may be CuPy (``--backend`` ``requested`` not 'numpy'), CuPy and a
    device are usable and the launcher names the node-local rank.  Returns
    the device index, or None when nothing was bound (the engine binds after
    ``MPI_Init`` and reports any problem then, on every rank alike)."""
    from mpimoe.backends.backend import cuda_problem, probe_cuda
    if requested == 'numpy':
        return None
    local = launcher_local_rank(environ)
    if local is None:
        return None
    probe = probe_cuda()
    if cuda_problem(probe) is not None:
        return None
    import cupy
    device = bind_device(local.index, probe.n_devices)
    try:
        cupy.cuda.Device(device).use()
    except cupy.cuda.runtime.CUDARuntimeError:
        return None                 # the engine's binding, after MPI_Init, reports it
    return device


def sharing_problem(ranks):
    """A warning when ranks of a node share a GPU while others of its GPUs
    stay idle (their node-local ranks were wrong), else None.

    ranks: per rank (host, LocalRank, device, visible devices), in rank order.
    """
    by_host = {}
    for rank, (host, local, device, visible) in enumerate(ranks):
        by_host.setdefault(host, []).append((rank, local, device, visible))
    for host, entries in by_host.items():
        used = {device for _, _, device, _ in entries}
        visible = min(v for _, _, _, v in entries)
        if len(used) < min(len(entries), visible):
            sources = sorted({local.source for _, local, _, _ in entries})
            listed = rank_list([rank for rank, _, _, _ in entries])
            return (f'{len(entries)} ranks on {host} (ranks {listed}) use {len(used)} of '
                    f'its {visible} GPUs: their node-local ranks '
                    f'(from {", ".join(sources)}) repeat; launch with srun, or with the '
                    'mpiexec of the MPI library mpi4py uses')
    return None
