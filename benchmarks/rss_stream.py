"""Peak RSS per rank of `mpimoe run` for an input and one 10x larger.

    python benchmarks/rss_stream.py [--ranks 5] [--seqs 1000] [--preset tiny]

Writes synthetic weights and two JSONL inputs (N and 10 N sequences) into a
temporary directory, runs the engine on each under mpiexec, samples every
rank's resident set size (psutil) every 20 ms and prints the peak per rank
and the ratio of the two runs.  Rank 0 streams the input a round at a time,
so the ratio should stay close to 1.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil


def peak_rss(cmd, env):
    """Run ``cmd``; -> (seconds, {pid: peak RSS bytes} of its python descendants)."""
    peaks = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for child in root.children(recursive=True):
                if 'mpimoe' in child.cmdline():
                    peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode:
        sys.exit(f'run failed ({proc.returncode}): {proc.stderr.read().decode()}')
    return time.perf_counter() - t0, peaks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ranks', type=int, default=5)
    p.add_argument('--seqs', type=int, default=1000, help='sequences of the small input')
    p.add_argument('--preset', default='tiny')
    p.add_argument('--placement', default='packed:2')
    args = p.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}
    mpimoe = [sys.executable, '-m', 'mpimoe']
    with tempfile.TemporaryDirectory() as d:
        weights = os.path.join(d, 'w.h5')
        subprocess.run([*mpimoe, 'init-weights', '--preset', args.preset, '--out', weights],
                       check=True, stdout=subprocess.DEVNULL)
        rows = []
        for scale in (1, 10):
            inputs = os.path.join(d, f'in{scale}.jsonl')
            subprocess.run([*mpimoe, 'make-input', '--weights', weights, '--num-seqs',
                            str(args.seqs * scale), '--min-len', '32', '--max-len', '96',
                            '--out', inputs], check=True, stdout=subprocess.DEVNULL)
            cmd = ['mpiexec', '-n', str(args.ranks), sys.executable, '-m', 'mpi4py', '-m',
                   'mpimoe', 'run', '--weights', weights, '--input', inputs, '--output',
                   os.path.join(d, f'out{scale}.h5'), '--placement', args.placement,
                   '--batch-tokens', '2048', '--max-new-tokens', '1']
            seconds, peaks = peak_rss(cmd, env)
            ranked = [peaks[pid] for pid in sorted(peaks)]
            rows.append((scale, os.path.getsize(inputs), seconds, ranked))
        print(f'{"input":>8} {"bytes":>12} {"seconds":>8}  peak RSS per rank (MiB), rank 0 first')
        for scale, size, seconds, ranked in rows:
            print(f'{scale:>7}x {size:>12,} {seconds:>8.1f}  '
                  + ' '.join(f'{r / 2**20:6.1f}' for r in ranked))
        ratio = [b / a for a, b in zip(rows[0][3], rows[1][3])]
        print('10x / 1x per rank: ' + ' '.join(f'{r:.3f}' for r in ratio)
              + f'  (max {max(ratio):.3f})')


if __name__ == '__main__':
    main()
