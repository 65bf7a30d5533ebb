"""BLAS threads per rank (mpimoe.runtime.threads): the sizing rule, and what a run records."""

import json

import pytest

from mpirun import mpiexec
from mpimoe.runtime.threads import blas_threads

RUN_TIMEOUT = 120

TWO = frozenset({0, 1})


@pytest.mark.parametrize('explicit, slurm, mine, peers, expected', [
    # 9 ranks sharing the same 2 cores: 1 each (never 0)
    (None, None, TWO, [TWO] * 9, (1, '2 cores shared by 9 ranks')),
    # 2 ranks on 8 shared cores: 4 each
    (None, None, frozenset(range(8)), [frozenset(range(8))] * 2,
     (4, '8 cores shared by 2 ranks')),
    # a launcher that binds ranks to disjoint cores: each keeps its own set
    (None, None, frozenset({2, 3}), [frozenset({0, 1}), frozenset({2, 3})],
     (2, '2 cores of its own')),
    # overlapping sets count as sharing
    (None, None, frozenset({0, 1, 2, 3}), [frozenset({0, 1, 2, 3}), frozenset({3, 4})],
     (2, '4 cores shared by 2 ranks')),
    # a single process (reference, bench): all its cores
    (None, None, frozenset(range(6)), [], (6, '6 cores of its own')),
    # srun's cores per task win over the affinity
    (None, '3', TWO, [TWO] * 9, (3, 'SLURM_CPUS_PER_TASK=3')),
    # an unusable SLURM_CPUS_PER_TASK is ignored
    (None, 'x', TWO, [TWO] * 2, (1, '2 cores shared by 2 ranks')),
    (None, '0', TWO, [TWO], (2, '2 cores of its own')),
    # --threads wins over everything
    (5, '3', TWO, [TWO] * 9, (5, '--threads 5')),
])
def test_blas_threads(explicit, slurm, mine, peers, expected):
    assert blas_threads(explicit, slurm, mine, peers) == expected


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('extra, per_rank, log', [
    ([], None, 'BLAS threads per rank: '),
    (['--threads', '2'], [2, 2, 2], 'BLAS threads per rank: 2 (--threads 2)'),
])
def test_run_json_records_threads(tiny_weights, tiny_inputs, tmp_path, extra, per_rank, log):
    """3 ranks on this machine: run.json records every rank's choice, rank 0 logs it."""
    metrics = tmp_path / 'run.json'
    proc = mpiexec(3, ['run', '--weights', tiny_weights, '--input', tiny_inputs,
                       '--output', tmp_path / 'out.h5', '--metrics', metrics,
                       '--placement', 'packed:4', *extra],
                   timeout=RUN_TIMEOUT, env={'SLURM_CPUS_PER_TASK': ''})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(log) == 1, proc.stderr
    threads = json.loads(metrics.read_text())['threads']
    # the BLAS NumPy uses (OpenBLAS from PyPI's wheels, MKL or BLIS elsewhere)
    assert threads['libraries'] and set(threads['libraries']) <= {'openblas', 'mkl', 'blis'}
    if per_rank is None:    # sized from the cores: all 3 ranks share this machine's
        assert len(threads['per_rank']) == 3 and min(threads['per_rank']) >= 1
        assert all('cores' in r for r in threads['reasons']), threads
    else:
        assert threads['per_rank'] == per_rank
        assert threads['reasons'] == ['--threads 2']
