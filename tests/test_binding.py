"""Which GPU each rank takes (mpimoe.backends.binding) and the start-up
exchange that decides whether MPI gets device buffers (mpimoe.parallel.gpu_mpi).

The launcher variables are driven through the pure function's environment;
the real MPICH launcher (Hydra) then runs the same code under mpiexec, with
the environment of a Slurm batch shell around it (every rank inheriting
SLURM_LOCALID=0, the case that once put every rank on GPU 0).  The
exchange runs over real MPI on NumPy arrays here and on device arrays in
tests/test_gpu.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mpimoe.backends.binding import LocalRank, launcher_local_rank, launcher_rank, sharing_problem
from mpimoe.parallel.gpu_mpi import exchange_rows
from mpirun import mpiexec_path

SRUN_TASK = {'SLURM_JOB_ID': '77', 'SLURM_STEP_ID': '0', 'SLURM_PROCID': '11',
             'SLURM_LOCALID': '3'}
BATCH_SHELL = {'SLURM_JOB_ID': '77', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0',
               'SLURM_NODEID': '0'}


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'OMPI_COMM_WORLD_LOCAL_RANK': '3', 'OMPI_COMM_WORLD_RANK': '19'},
     LocalRank(3, 'OMPI_COMM_WORLD_LOCAL_RANK')),
    ({'MPI_LOCALRANKID': '2', 'PMI_RANK': '6'}, LocalRank(2, 'MPI_LOCALRANKID')),
    ({'PALS_LOCAL_RANKID': '5', 'PALS_RANKID': '13'}, LocalRank(5, 'PALS_LOCAL_RANKID')),
    # srun started the task: its PMI or PMIx rank is Slurm's
    (SRUN_TASK, LocalRank(3, 'SLURM_LOCALID')),
    ({**SRUN_TASK, 'PMI_RANK': '11'}, LocalRank(3, 'SLURM_LOCALID')),
    ({**SRUN_TASK, 'PMIX_RANK': '11'}, LocalRank(3, 'SLURM_LOCALID')),
    # mpiexec (Hydra) in a Slurm allocation: its own variable wins over the
    # inherited SLURM_LOCALID=0
    ({**BATCH_SHELL, 'MPI_LOCALRANKID': '2', 'PMI_RANK': '2'}, LocalRank(2, 'MPI_LOCALRANKID')),
    ({**SRUN_TASK, 'OMPI_COMM_WORLD_LOCAL_RANK': '1'},
     LocalRank(1, 'OMPI_COMM_WORLD_LOCAL_RANK')),
    # a launcher that names no local rank: Slurm's inherited values are not
    # taken (the batch shell is no step; a step's rank is not the PMI rank)
    ({**BATCH_SHELL, 'PMI_RANK': '5'}, None),
    (BATCH_SHELL, None),
    ({**SRUN_TASK, 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'PMI_RANK': '5'}, None),
    ({**SRUN_TASK, 'PMIX_RANK': '12'}, None),
    # not a number: ignored
    ({'MPI_LOCALRANKID': '', 'OMPI_COMM_WORLD_LOCAL_RANK': 'x'}, None),
])
def test_launcher_local_rank(environ, expected):
    assert launcher_local_rank(environ) == expected


def _ranks(host, devices, visible, source='MPI_LOCALRANKID'):
    return [(host, LocalRank(i, source), d, visible) for i, d in enumerate(devices)]


@pytest.mark.parametrize('ranks', [
    _ranks('n0', [0, 1, 2, 3], 4),
    _ranks('n0', [0, 1, 2, 3, 0, 1, 2, 3], 4),                 # 2 ranks per GPU: all used
    _ranks('n0', [0, 0, 0], 1),                                # one GPU, shared by design
    _ranks('n0', [0, 1], 4),                                   # fewer ranks than GPUs
    _ranks('n0', [0, 1], 2) + _ranks('n1', [0, 1], 2),
])
def test_no_warning_when_every_rank_a_gpu_can_have_is_its_own(ranks):
    assert sharing_problem(ranks) is None


def test_ranks_sharing_a_gpu_while_others_idle_are_named():
    ranks = _ranks('n0', [0, 1], 2) + _ranks('n1', [0, 0, 0, 0], 4, 'SLURM_LOCALID')
    assert sharing_problem(ranks) == (
        '4 ranks on n1 (ranks [2, 3, 4, 5]) use 1 of its 4 GPUs: their node-local ranks '
        '(from SLURM_LOCALID) repeat; launch with srun, or with the mpiexec of the MPI library '
        'mpi4py uses')


def test_exchange_rows_are_distinct_for_every_pair():
    n = 300
    rows = np.concatenate([exchange_rows(s, range(n)) for s in range(n)])
    assert rows.shape == (n * n, 4) and rows.dtype == np.uint16
    assert len(np.unique(rows, axis=0)) == n * n


_SCRIPT = r'''
import json, os, sys
from mpimoe.backends.backend import Backend
from mpimoe.backends.binding import LocalRank, launcher_local_rank
from mpimoe.parallel.gpu_mpi import choose_mpi_gpu, device_exchange_problem
from mpimoe.parallel.mpiutil import MPI, local_rank
world = MPI.COMM_WORLD
node = world.Split_type(MPI.COMM_TYPE_SHARED)
numpy = Backend('numpy')
mine = {
    'rank': world.rank, 'split': node.rank,
    'launcher': list(vars(launcher_local_rank(os.environ) or LocalRank(-1, '')).values()),
    'local_rank': list(vars(local_rank(world)).values()),
    'exchange': device_exchange_problem(world, numpy, 30.0),
    'choice': list(choose_mpi_gpu(world, numpy, 'device', 30.0)),
}
everyone = world.gather(mine, root=0)
if world.rank == 0:
    print(json.dumps(everyone), flush=True)
'''


@pytest.mark.timeout(120)
def test_mpich_launcher_names_the_local_rank_inside_a_slurm_batch_shell():
    """Under MPICH's mpiexec, in the environment of a Slurm batch shell,
    every rank reads its node-local rank from MPI_LOCALRANKID: the same as
    the shared-memory split, one per rank (before, SLURM_LOCALID=0 was read
    first and every rank took GPU 0).  The exchange of rows over real MPI
    arrives intact (NumPy arrays), and the NumPy backend gets no --mpi-gpu
    mode."""
    env = {**os.environ, **BATCH_SHELL, 'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}
    proc = subprocess.run([mpiexec_path(), '-n', '4', sys.executable, '-m', 'mpi4py', '-c',
                           _SCRIPT], capture_output=True, text=True, env=env, timeout=100)
    assert proc.returncode == 0, proc.stderr
    lines = json.loads(proc.stdout)
    assert [r['rank'] for r in lines] == [0, 1, 2, 3]
    for r in lines:
        assert r['launcher'] == [r['split'], 'MPI_LOCALRANKID']
        assert r['local_rank'] == r['launcher']
        assert r['exchange'] is None
        assert r['choice'] == [None, 'the numpy backend hands host arrays to MPI', []]
    assert sorted(r['split'] for r in lines) == [0, 1, 2, 3]


@pytest.mark.parametrize('environ, rank', [
    ({}, None),
    ({'PMI_RANK': '3'}, 3),                                       # MPICH's Hydra
    ({'PMIX_RANK': '0'}, 0),
    ({'OMPI_COMM_WORLD_RANK': '5'}, 5),                           # Open MPI's mpirun
    ({'SLURM_PROCID': '7', 'SLURM_STEP_ID': '0'}, 7),             # a task srun started
    ({'SLURM_PROCID': '0'}, None),                                # the batch shell itself
])
def test_launcher_rank(environ, rank):
    assert launcher_rank(environ) == rank
