"""Launch ``mpimoe`` under ``mpiexec`` from the tests.

    proc = mpiexec(9, ['run', '--weights', w, ...], timeout=60)

A timeout kills every process of the job (mpiexec, its proxies and the
Python ranks), never leaving one behind: :func:`signal_job`.  MPICH's Hydra
starts each proxy and rank in a session of its own, so a signal to mpiexec's
process group reaches mpiexec alone (which forwards SIGTERM, SIGINT and SIGUSR1
to the ranks, as srun does).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ['mpiexec', 'mpiexec_start', 'signal_job', 'mpiexec_path', 'error_lines',
           'uninterrupted_run']


def mpiexec_path():
    """The mpiexec next to this Python (the venv's MPICH wheel), else on PATH."""
    here = Path(sys.executable).parent / 'mpiexec'
    found = str(here) if here.is_file() else shutil.which('mpiexec')
    if found is None:
        raise FileNotFoundError('mpiexec: not next to sys.executable nor on PATH')
    return found


def mpiexec_start(n, args, env=None, program=('-m', 'mpimoe')):
    """Start ``mpiexec -n n python -m mpi4py *program *args`` in a session of
    its own; Popen with text stdout/stderr pipes.  program: mpimoe, or a
    script's path (one item).

    ``run`` gets ``--backend numpy`` unless args name a backend: the CPU
    tests' FP32 contract is NumPy's, and on a GPU machine ``auto`` would put
    every rank on the one device (the GPU tests pass ``--backend cupy``).

    ``env`` adds to (or overrides) this process's environment; BLAS threads
    default to 1 because the ranks oversubscribe the cores.
    """
    args = [str(a) for a in args]
    if args[:1] == ['run'] and '--backend' not in args:
        args += ['--backend', 'numpy']
    cmd = [mpiexec_path(), '-n', str(n), sys.executable, '-m', 'mpi4py', *map(str, program),
           *args]
    full_env = {'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1', **os.environ,
                **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, start_new_session=True)


def signal_job(proc, signum):
    """Send ``signum`` to every process of the job ``proc`` (a Popen of
    :func:`mpiexec_start`): its ranks and proxies first, then mpiexec, so that
    SIGSTOP freezes the ranks before mpiexec and SIGKILL leaves none running."""
    import psutil
    try:
        job = psutil.Process(proc.pid)
        processes = [*job.children(recursive=True), job]
    except psutil.NoSuchProcess:
        return
    for p in processes:
        try:
            p.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def mpiexec(n, args, timeout, env=None, program=('-m', 'mpimoe')):
    """Run :func:`mpiexec_start` to its end; CompletedProcess with text
    stdout/stderr.  On ``timeout`` (seconds) every process of the job is
    killed and TimeoutExpired raised.
    """
    with mpiexec_start(n, args, env, program) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_job(proc, signal.SIGKILL)
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
