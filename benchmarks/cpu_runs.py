"""Whole ``mpimoe run`` jobs on the CPU: BLAS threads per rank, and micro-batches.

    python benchmarks/cpu_runs.py threads        [--ranks 9] [--repeats 3]
    python benchmarks/cpu_runs.py micro-batches  [--ranks 2] [--repeats 3]
    python benchmarks/cpu_runs.py batching       [--ranks 9] [--repeats 3]

Writes the ``small`` preset cut to 4 MoE layers of 8 experts (d_model 512)
and a JSONL input into a temporary directory (or ``--out DIR``), then runs
``mpiexec -n RANKS python -m mpi4py -m mpimoe run`` once per variant and
repetition, the variants interleaved (each repetition in a rotated order), so
that a machine shared with other work slows them alike.  Prints, per variant,
the medians over the repetitions and the ratio to the first variant.

threads: 32 sequences of 16-32 tokens + 16 new tokens on 9 ranks (per-layer),
``--threads C`` (C = this machine's cores: every rank as many BLAS threads as
cores, what a BLAS does unless told) against the default sizing.
micro-batches: 64 sequences of 64 tokens + 8 new tokens on 2 ranks (1
front-end + 1 expert rank, packed:8), one BLAS thread each, M = 1, 2, 4, 8.
batching: 96 sequences of 8-24 tokens, each with its own max_tokens drawn
uniformly from 1..32 (output lengths vary as they do where sequences end at
their end-of-sequence token), on 9 ranks with at most 8 sequences running
per front-end: ``--batching static`` (a front-end takes new sequences only
once all its running ones ended) against continuous batching (the default).

Columns: prefill and decode (generated) tokens/s over the front-ends' busy
time (a step mixes both), time per output token (median step that
generated tokens), the job's wall time as mpiexec saw it, start-up (that wall minus the
prefill and decode passes: imports, MPI, weights, report), and the CPU
seconds of all the job's processes (less sensitive than wall time to other
work on the machine), and the compute seconds of the front-end and of the
expert ranks (their mean).  The
environment's OMP_NUM_THREADS / OPENBLAS_NUM_THREADS are removed (they would
hide what a rank does by default).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

#: environment variables that would size the BLAS pools behind mpimoe's back
BLAS_ENV = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS')

MODEL = ['--preset', 'small', '--set', 'n_layers=4', '--set', 'n_dense_layers=0',
         '--set', 'n_experts=8']

#: per benchmark: (ranks, sequences, min len, max len, new tokens, run options)
SETUPS = {'threads': (9, 32, 16, 32, 16, ['--placement', 'per-layer']),
          'micro-batches': (2, 64, 64, 64, 8, ['--placement', 'packed:8', '--threads', '1']),
          'batching': (9, 96, 8, 24, 32, ['--placement', 'per-layer', '--max-seqs', '8'])}


def variants(bench):
    """(label, extra run options) of each variant; the first is the baseline."""
    if bench == 'threads':
        cores = len(os.sched_getaffinity(0))
        return [(f'--threads {cores} (all cores)', ['--threads', str(cores)]),
                ('sized (default)', [])]
    if bench == 'batching':
        return [('static', ['--batching', 'static']), ('continuous (default)', [])]
    return [(f'M = {m}', ['--micro-batches', str(m)]) for m in (1, 2, 4, 8)]


def varied_lengths(path, seqs, lo, hi, new, seed=0):
    """A JSONL input whose lines set their own max_tokens, uniform in 1..new."""
    import numpy as np
    rng = np.random.default_rng(seed)
    with open(path, 'w') as f:
        for i in range(seqs):
            tokens = rng.integers(0, 4096, int(rng.integers(lo, hi + 1))).tolist()
            f.write(json.dumps({'id': f's{i}', 'tokens': tokens,
                                'max_tokens': int(rng.integers(1, new + 1))}) + '\n')


def mpiexec():
    """The mpiexec next to this Python (a venv's MPICH wheel), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
    return here if os.path.isfile(here) else shutil.which('mpiexec') or 'mpiexec'


def _children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def mpimoe(args, env, ranks=None):
    """Run ``mpimoe *args`` (under mpiexec with ``ranks``); -> (wall seconds,
    CPU seconds of all its processes)."""
    cmd = [sys.executable, '-m', 'mpimoe', *args]
    if ranks:
        cmd = [mpiexec(), '-n', str(ranks), sys.executable, '-m', 'mpi4py', *cmd[1:]]
    t0, cpu0 = time.perf_counter(), _children_cpu_s()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr}')
    return time.perf_counter() - t0, _children_cpu_s() - cpu0


def measure(run_json, wall, cpu):
    """The figures of one job from its run.json, its wall and CPU seconds."""
    with open(run_json) as f:
        r = json.load(f)
    s = r['summary']
    compute = {role: [x['category_s'].get('compute', 0.0) for x in r['ranks']
                      if x['role'] == role] for role in ('front-end', 'expert')}
    return {'prefill': s['prefill_tokens_per_s'], 'decode': s['decode_tokens_per_s'],
            'tpot': s['tpot_p50_ms'], 'wall': wall,
            'startup': wall - s['busy_s'], 'cpu': cpu,
            'front': statistics.mean(compute['front-end']),
            'expert': statistics.mean(compute['expert'])}


COLUMNS = (('prefill', 'prefill tok/s', '.0f'), ('decode', 'decode tok/s', '.0f'),
           ('tpot', 'ms/token', '.0f'), ('wall', 'wall s', '.1f'),
           ('startup', 'start-up s', '.1f'), ('cpu', 'CPU s', '.1f'),
           ('front', 'front compute s', '.2f'), ('expert', 'expert compute s', '.2f'))


def print_table(bench, setup, results, repeats):
    ranks, seqs, lo, hi, new, opts = setup
    print(f'{bench}: {ranks} ranks ({" ".join(opts)}), {seqs} sequences of {lo}-{hi} tokens + '
          f'{new} new; medians of {repeats} interleaved runs, (x) = ratio to the first row')
    print(f'{"variant":24s}' + ''.join(f'{title:>17s}' for _, title, _ in COLUMNS))
    base = None
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k, _, _ in COLUMNS}
        base = base or med
        cells = [f'{med[k]:{fmt}} ({med[k] / base[k]:.2f}x)' for k, _, fmt in COLUMNS]
        print(f'{label:24s}' + ''.join(f'{c:>17s}' for c in cells))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('bench', choices=sorted(SETUPS))
    p.add_argument('--ranks', type=int, help='world size (default: 9 threads and batching, 2 micro-batches)')
    p.add_argument('--repeats', type=int, default=3, help='runs of each variant (default 3)')
    p.add_argument('--out', help='keep the files here (default: a temporary directory)')
    args = p.parse_args()
    ranks, *rest = SETUPS[args.bench]
    setup = (args.ranks or ranks, *rest)
    env = {k: v for k, v in os.environ.items() if k not in BLAS_ENV}
    with tempfile.TemporaryDirectory() as tmp:
        d = args.out or tmp
        os.makedirs(d, exist_ok=True)
        weights, inputs = os.path.join(d, 'm.h5'), os.path.join(d, f'{args.bench}.jsonl')
        if not os.path.exists(weights):
            mpimoe(['init-weights', *MODEL, '--out', weights], env)
        _, seqs, lo, hi, new, opts = setup
        if args.bench == 'batching':
            varied_lengths(inputs, seqs, lo, hi, new)
        else:
            mpimoe(['make-input', '--weights', weights, '--num-seqs', str(seqs), '--min-len',
                    str(lo), '--max-len', str(hi), '--out', inputs, '--overwrite'], env)
        todo = variants(args.bench)
        results = {label: [] for label, _ in todo}
        for rep in range(args.repeats):
            for label, extra in todo[rep % len(todo):] + todo[:rep % len(todo)]:
                run_json = os.path.join(d, 'run.json')
                wall, cpu = mpimoe(['run', '--weights', weights, '--input', inputs, '--output',
                               os.path.join(d, 'out.h5'), '--overwrite', '--metrics', run_json,
                               '--max-new-tokens', str(new), *opts, *extra], env, setup[0])
                results[label].append(measure(run_json, wall, cpu))
    print_table(args.bench, setup, results, args.repeats)


if __name__ == '__main__':
    main()
