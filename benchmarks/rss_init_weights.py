"""Peak RSS of ``mpimoe init-weights``: memory must not grow with the model size.

    python benchmarks/rss_init_weights.py --out /tmp/w.h5 -- --preset paper-16l \\
        --set n_layers=1 --set n_experts=2

Runs ``python -m mpimoe init-weights ARGS --out FILE --overwrite`` in a child
process, prints its peak RSS (``ru_maxrss`` of the child, as ``/usr/bin/time -v``
reports it), the file size and the wall time, then deletes FILE unless --keep.
"""

import argparse
import os
import resource
import subprocess
import sys
import time

__all__ = ['measure']


def measure(init_args, out):
    """Run init-weights; -> (peak RSS bytes, file bytes, wall seconds)."""
    cmd = [sys.executable, '-m', 'mpimoe', 'init-weights', *init_args, '--out', out,
           '--overwrite']
    t0 = time.monotonic()
    subprocess.run(cmd, check=True)
    wall = time.monotonic() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss    # KiB on Linux
    return peak_kib * 1024, os.path.getsize(out), wall


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', required=True, help='weight file to write (deleted afterwards)')
    p.add_argument('--keep', action='store_true', help='keep the file')
    p.add_argument('init_args', nargs=argparse.REMAINDER,
                   help='after --: arguments of mpimoe init-weights (--preset, --set)')
    args = p.parse_args()
    init_args = args.init_args[1:] if args.init_args[:1] == ['--'] else args.init_args
    try:
        rss, size, wall = measure(init_args, args.out)
    finally:
        if not args.keep and os.path.exists(args.out):
            os.remove(args.out)
    print(f'init-weights {" ".join(init_args)}: file {size / 1e9:.3f} GB, '
          f'peak RSS {rss / 2**20:.1f} MiB, wall {wall:.1f} s')


if __name__ == '__main__':
    main()
