"""Launch ``mpimoe`` under ``mpiexec`` from the tests.

    proc = mpiexec(9, ['run', '--weights', w, ...], timeout=60)

The job runs in a session of its own so that a timeout kills every rank
(mpiexec, its proxies and the Python processes), never leaving one behind.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ['mpiexec', 'mpiexec_start', 'mpiexec_path', 'error_lines', 'uninterrupted_run']


def mpiexec_path():
    """The mpiexec next to this Python (the venv's MPICH wheel), else on PATH."""
    here = Path(sys.executable).parent / 'mpiexec'
    found = str(here) if here.is_file() else shutil.which('mpiexec')
    if found is None:
        raise FileNotFoundError('mpiexec: not next to sys.executable nor on PATH')
    return found


def mpiexec_start(n, args, env=None):
    """Start ``mpiexec -n n python -m mpi4py -m mpimoe *args`` in a process
    group of its own (``os.killpg(proc.pid, ...)`` reaches every rank); Popen
    with text stdout/stderr pipes.

    ``env`` adds to (or overrides) this process's environment; BLAS threads
    default to 1 because the ranks oversubscribe the cores.
    """
    cmd = [mpiexec_path(), '-n', str(n), sys.executable, '-m', 'mpi4py', '-m', 'mpimoe',
           *map(str, args)]
    full_env = {'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', **os.environ,
                **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)


def mpiexec(n, args, timeout, env=None):
    """Run :func:`mpiexec_start` to its end; CompletedProcess with text
    stdout/stderr.  On ``timeout`` (seconds) every process of the job is
    killed and TimeoutExpired raised.
    """
    with mpiexec_start(n, args, env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_lines(stderr):
    """The `mpimoe: ...` lines of a job's stderr but progress lines (`mpimoe: 0/2
    sequences, starting`); MPICH adds its own Abort lines, not counted."""
    return [line for line in stderr.splitlines() if line.startswith('mpimoe:')
            and not re.match(r'mpimoe: \d+/\d+ sequences', line)]


def uninterrupted_run(d, weights, args, num_seqs, max_len, seed, ranks=5):
    """(inputs, whole): a synthetic JSONL input of ``num_seqs`` sequences of
    2..``max_len`` tokens in directory ``d`` and the output ``whole`` of
    ``mpimoe run`` over it to its end (the file a stopped or killed run must equal)."""
    from mpimoe.io.inputs import write_synthetic_inputs
    inputs, whole = d / 'in.jsonl', d / 'whole.h5'
    write_synthetic_inputs(inputs, 256, num_seqs=num_seqs, min_len=2, max_len=max_len, seed=seed)
    proc = mpiexec(ranks, ['run', '--weights', weights, '--input', inputs, '--output', whole,
                           *args], timeout=240)
    assert proc.returncode == 0, proc.stderr
    return inputs, whole
