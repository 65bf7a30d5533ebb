"""Expert load max/mean per MoE layer without and with the gate bias, on a
workload whose router makes a few experts hot.

    python benchmarks/balance.py [--ranks 9] [--hot 0,1] [--add 2] [--seqs 48]

Writes synthetic weights of ``--preset`` into a temporary directory (or
``--out DIR``, which keeps every file), adds ``--add`` to the router columns of
the ``--hot`` experts in every MoE layer (:func:`skew_router`: those experts
win the gate for most tokens), writes a JSONL input, then runs
``mpimoe run`` twice under mpiexec: ``--balance off`` and ``--balance bias``,
both with ``--batch-tokens`` small enough for several rounds, so the bias
learnt in one round steers the prefill of the next.  Prints, from the two
run.json, the max/mean expert load per MoE layer over the whole run (1.00 is
an even load; with top-k of E experts it is at most E/k), the loads of the
first MoE layer and the final bias.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zlib

import h5py
import numpy as np

from mpimoe.backends.backend import from_words, storage_dtype, to_words
from mpimoe.planning.balance import max_over_mean
from mpimoe.checkpoint.weights import WeightFile


def skew_router(path, experts, add):
    """Add ``add`` to the router columns of ``experts`` in every MoE layer of the
    weight file ``path``, in place: the BF16 words and each dataset's crc32."""
    with WeightFile(path) as wf:
        cfg = wf.config
    with h5py.File(path, 'r+') as f:
        for i in cfg.moe_layers:
            ds = f[f'layers/{i}/router']                               # uint16 [d, E]
            w = from_words(ds[()], cfg.dtype).astype(np.float32)
            w[:, experts] += add
            ds[()] = to_words(w.astype(storage_dtype(cfg.dtype)))
            ds.attrs['crc32'] = zlib.crc32(np.ascontiguousarray(ds[()], '<u2').tobytes())


def run(ranks, args, env):
    """``mpiexec -n ranks python -m mpi4py -m mpimoe run *args``; exits on failure."""
    cmd = ['mpiexec', '-n', str(ranks), sys.executable, '-m', 'mpi4py', '-m', 'mpimoe', 'run',
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f'run failed ({proc.returncode}): {proc.stderr}')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ranks', type=int, default=9)
    p.add_argument('--placement', default='per-layer')
    p.add_argument('--preset', default='tiny')
    p.add_argument('--hot', default='0,1', help='experts made hot (default 0,1)')
    p.add_argument('--add', type=float, default=2.0,
                   help='added to their router columns (default 2)')
    p.add_argument('--seqs', type=int, default=48)
    p.add_argument('--max-new-tokens', type=int, default=8)
    p.add_argument('--batch-tokens', type=int, default=64)
    for flag in ('--balance-every', '--balance-step', '--balance-clip'):
        p.add_argument(flag, help="passed to `mpimoe run --balance bias` (default: run's)")
    p.add_argument('--out', help='keep the files here (default: a temporary directory)')
    args = p.parse_args()
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}
    mpimoe = [sys.executable, '-m', 'mpimoe']
    with tempfile.TemporaryDirectory() as tmp:
        d = args.out or tmp
        os.makedirs(d, exist_ok=True)
        weights, inputs = os.path.join(d, 'skewed.h5'), os.path.join(d, 'in.jsonl')
        subprocess.run([*mpimoe, 'init-weights', '--preset', args.preset, '--out', weights,
                        '--overwrite'], check=True, stdout=subprocess.DEVNULL)
        hot = [int(e) for e in args.hot.split(',')]
        skew_router(weights, hot, args.add)
        subprocess.run([*mpimoe, 'make-input', '--weights', weights, '--num-seqs', str(args.seqs),
                        '--min-len', '4', '--max-len', '24', '--out', inputs, '--overwrite'],
                       check=True, stdout=subprocess.DEVNULL)
        reports = {}
        for mode in ('off', 'bias'):
            metrics = os.path.join(d, f'run-{mode}.json')
            tuning = [] if mode == 'off' else [
                a for flag, v in (('--balance-every', args.balance_every),
                                  ('--balance-step', args.balance_step),
                                  ('--balance-clip', args.balance_clip)) if v for a in (flag, v)]
            run(args.ranks, ['--weights', weights, '--input', inputs, '--overwrite',
                             '--output', os.path.join(d, f'out-{mode}.h5'), '--metrics', metrics,
                             '--placement', args.placement, '--max-new-tokens',
                             args.max_new_tokens, '--batch-tokens', args.batch_tokens,
                             '--balance', mode, *tuning], env)
            with open(metrics) as f:
                reports[mode] = json.load(f)
    print_table(args, hot, reports)


def print_table(args, hot, reports):
    off, bias = reports['off'], reports['bias']
    cfg, b = off['config'], bias['balance']
    print(f'{args.preset}, router columns of experts {hot} + {args.add:g} in every MoE layer; '
          f'{args.seqs} sequences, {args.max_new_tokens} new tokens, batches of <= '
          f'{args.batch_tokens} prompt tokens; {args.ranks} ranks, {args.placement}')
    print(f'gate bias: every {b["every"]} pass(es), step {b["step"]:g}, clip {b["clip"]:g}; '
          f'{len(b["max_over_mean_history"])} updates')
    print(f'expert load max/mean per MoE layer (1.00 = even; top-{cfg["top_k"]} of '
          f'{cfg["n_experts"]} experts: at most {cfg["n_experts"] / cfg["top_k"]:.2f})')
    print(f'{"layer":>5}  {"--balance off":>13}  {"--balance bias":>14}')
    for m, layer in enumerate(off['expert_loads']['layers']):
        print(f'{layer:>5}  {off["expert_loads"]["max_over_mean"][m]:>13.2f}  '
              f'{bias["expert_loads"]["max_over_mean"][m]:>14.2f}')
    for name, rep in (('off', off), ('bias', bias)):
        loads = np.array(rep['expert_loads']['counts'])
        print(f'loads ({name}), layer {off["expert_loads"]["layers"][0]}: {loads[0].tolist()}; '
              f'max/mean of the sum over layers {max_over_mean(loads.sum(axis=0)):.2f}')
    print('final bias, layer by layer:')
    for layer, row in zip(off['expert_loads']['layers'], bias['balance']['bias']):
        print(f'{layer:>5}  ' + ' '.join(f'{b:+.2f}' for b in row))


if __name__ == '__main__':
    main()
