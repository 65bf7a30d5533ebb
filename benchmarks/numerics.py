"""How far two evaluations of one model drift apart, for the bounds of
tests/contract.py (LOGIT_RTOL, TIE_RTOL) and README's *Numerics*.

    python benchmarks/numerics.py engine [--preset tiny] [--seqs 600] [--new 40] \
        [--ranks 5] [--placement packed:2] [--out DIR] [--run-options '...']
    python benchmarks/numerics.py batching [--preset tiny] [--seqs 200] [--new 40] \
        [--chunk 7]
    python benchmarks/numerics.py gpu-contract [--preset tiny] [--seqs 200] [--new 40] \
        [--set KEY=VALUE ...]

``engine`` writes synthetic weights and ``--seqs`` random prompts of 3..20
tokens, runs ``mpimoe reference`` (one process) and ``mpimoe run`` (under
mpiexec), both with ``--new`` tokens and the last logits, and prints how many
sequences' greedy tokens diverge, the gap of the two chosen tokens' logits at
each divergence (recomputed, tests/contract.py's greedy_divergences) against
the tie bound, and the largest logit differences.  With ``--out DIR`` the
files are kept, and a reference output already there is reused (same
preset, --seqs and --new only).

``gpu-contract`` runs the model with its 16-bit weights on NumPy (the GPU's
numerics contract, mpimoe.model.layers) against the FP32 reference, both
teacher-forced on the reference's greedy tokens in one batch, and prints the
same per-row statistics.

``batching`` runs the reference in one process three ways on the same tokens
(teacher-forced on its own greedy choice): one batch of every sequence (A),
batches of ``--chunk`` (B), and one batch without expert_ffn's 16-bit
roundings (U).  It prints per-row statistics of B - A (two evaluations) and
U - A (one evaluation's rounding error): relative L2, and the spread
max_v d_v - min_v d_v (the most the difference moves the gap of any two
logits) over the row's RMS, both also in units of u = 2^-8.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tests'))

from contract import (LOGIT_RTOL, TIE_RTOL, greedy_divergences, next_logits,  # noqa: E402
                      rel_l2_rows, teacher_forced)
from mpimoe.checkpoint.weights import WeightFile  # noqa: E402
from mpimoe.checkpoint.writer import write_synthetic  # noqa: E402
from mpimoe.model.config import model_config  # noqa: E402
from mpimoe.io.inputs import read_inputs, write_synthetic_inputs
from mpimoe.io.outputs import read_outputs  # noqa: E402
from mpimoe.runtime.options import JobOptions
from mpimoe.model.reference import load_reference, run_reference  # noqa: E402
from mpirun import mpiexec  # noqa: E402

U = 2.0 ** -8


def _setup(args, d):
    """(weights path, inputs path) of ``args`` in directory d, written once."""
    name = '-'.join([args.preset, *args.set]).replace('/', '_')
    weights, inputs = d / f'{name}.h5', d / f'in-{args.seqs}.jsonl'
    cfg = model_config(args.preset, args.set)
    if not weights.exists():
        write_synthetic(cfg, str(weights), seed=0)
    if not inputs.exists():
        write_synthetic_inputs(inputs, cfg.vocab_size,
                               num_seqs=args.seqs, min_len=3, max_len=20, seed=11)
    return str(weights), str(inputs)


def engine(args, d):
    weights, inputs = _setup(args, d)
    t0 = time.monotonic()
    if not (d / 'ref.h5').exists():
        run_reference(JobOptions(weights=weights, input=inputs, output=str(d / 'ref.h5'),
                                     max_new_tokens=args.new, save_logits=True),
                          log=lambda *a: None)
    t1 = time.monotonic()
    proc = mpiexec(args.ranks, ['run', '--weights', weights, '--input', inputs, '--output',
                                d / 'run.h5', '--max-new-tokens', args.new, '--save-logits',
                                '--placement', args.placement, '--overwrite', *args.more],
                   timeout=3600)
    assert proc.returncode == 0, proc.stderr
    print(f'reference {t1 - t0:.0f} s, engine on {args.ranks} ranks ({args.placement} '
          f'{" ".join(args.more)}) {time.monotonic() - t1:.0f} s')
    ref, got = read_outputs(d / 'ref.h5'), read_outputs(d / 'run.h5')
    assert got['ids'] == ref['ids']
    with WeightFile(weights) as wf:
        model = load_reference(wf)
    seqs = read_inputs(inputs, model.cfg.vocab_size)
    found = greedy_divergences(got['generated'], ref['generated'],
                               lambda i, t: next_logits(model, seqs.seq(i), t))
    print(f'{args.seqs} sequences x {args.new} tokens: {len(found)} diverge')
    for i, j, a, b, gap, bound in found:
        print(f'  sequence {i} step {j}: tokens {a} / {b} (reference), gap {gap:.3g}, '
              f'bound {bound:.3g}: {"near-tie" if gap <= bound else "NOT A NEAR-TIE"}')
    rel = rel_l2_rows(got['last_logits'], ref['last_logits'])
    diff = np.abs(got['last_logits'] - ref['last_logits'].astype(np.float64))
    print(f'last_logits: max |difference| {diff.max():.3g}, relative L2 per row: median '
          f'{np.median(rel):.3g}, max {rel.max():.3g} = {rel.max() / U:.2f} u '
          f'(LOGIT_RTOL {LOGIT_RTOL:.3g})')


def _describe(what, other, a):
    """Print per-row statistics of other - a (float [..., V])."""
    diff = other.astype(np.float64) - a
    rms = np.sqrt(np.mean(a.astype(np.float64) ** 2, axis=-1))
    for name, v in (('relative L2', rel_l2_rows(other, a)),
                    ('spread / rms', (diff.max(-1) - diff.min(-1)) / rms)):
        q = np.quantile(v, [0.5, 0.99, 1.0])
        print(f'  {what:22s} {name:13s} median {q[0]:.3g}  p99 {q[1]:.3g} ({q[1] / U:.2f} u)  '
              f'max {q[2]:.3g} ({q[2] / U:.2f} u)')


def batching(args, d):
    import mpimoe.model.layers
    import mpimoe.moe.local
    weights, inputs = _setup(args, d)
    with WeightFile(weights) as wf:
        model = load_reference(wf)
    seqs = read_inputs(inputs, model.cfg.vocab_size)
    prompts = [seqs.seq(i) for i in range(len(seqs))]
    tokens = np.stack(model.generate(prompts, args.new)[0])       # [B, new]: no EOS here
    a = teacher_forced(model, prompts, tokens)
    b = np.concatenate([teacher_forced(model, prompts[i:i + args.chunk], tokens[i:i + args.chunk])
                        for i in range(0, len(prompts), args.chunk)], axis=1)
    # U: expert_ffn and moe_local without their 16-bit roundings
    mpimoe.model.layers.round16 = mpimoe.moe.local.round16 = lambda x, dtype: x
    unrounded = teacher_forced(model, prompts, tokens)
    print(f'{args.preset}, {args.seqs} sequences x {args.new} steps ({a.shape[0] * a.shape[1]} '
          f'rows); TIE_RTOL {TIE_RTOL:.3g} = {TIE_RTOL / U:.0f} u, LOGIT_RTOL {LOGIT_RTOL:.3g}')
    _describe(f'batches of {args.chunk} - A', b, a)
    _describe('unrounded - A', unrounded, a)
    top = np.sort(a, axis=-1)[..., -2:]
    rms = np.sqrt(np.mean(a.astype(np.float64) ** 2, axis=-1))
    near = np.mean(top[..., 1] - top[..., 0] <= TIE_RTOL * rms)
    print(f'  rows whose two top logits are within TIE_RTOL x rms: {near:.3f}')


def gpu_contract(args, d):
    """The GPU contract (16-bit weights: front-end GEMM inputs rounded to 16
    bits, expert products written in 16 bits), modelled by NumPy, against the
    FP32 reference, teacher-forced on the reference's greedy tokens."""
    weights, inputs = _setup(args, d)
    with WeightFile(weights) as wf:
        model, g, cfg = load_reference(wf), load_reference(wf, dict), wf.config
    seqs = read_inputs(inputs, cfg.vocab_size)
    prompts = [seqs.seq(i) for i in range(len(seqs))]
    tokens = np.stack(model.generate(prompts, args.new)[0])
    # one batch each
    a, gpu = teacher_forced(model, prompts, tokens), teacher_forced(g, prompts, tokens)
    print(f'{args.preset}, {args.seqs} sequences x {args.new} steps ({a.shape[0] * a.shape[1]} '
          f'rows); TIE_RTOL {TIE_RTOL:.3g} = {TIE_RTOL / U:.0f} u, LOGIT_RTOL {LOGIT_RTOL:.3g}')
    _describe('GPU contract - A', gpu, a)
    flips = np.mean(np.argmax(gpu, -1) != np.argmax(a, -1))
    print(f'  rows whose greedy token differs: {flips:.4f}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('mode', choices=['engine', 'batching', 'gpu-contract'])
    p.add_argument('--preset', default='tiny')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override a field of the preset, as `mpimoe init-weights --set`')
    p.add_argument('--seqs', type=int, default=None)
    p.add_argument('--new', type=int, default=40)
    p.add_argument('--ranks', type=int, default=5)
    p.add_argument('--placement', default='packed:2')
    p.add_argument('--chunk', type=int, default=7)
    p.add_argument('--out', help='keep the files in this directory')
    p.add_argument('--run-options', default='', help='more `mpimoe run` options, one string')
    args = p.parse_args(argv)
    args.more = args.run_options.split()
    args.seqs = args.seqs or (600 if args.mode == 'engine' else 200)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(args.out or tmp)
        os.makedirs(d, exist_ok=True)
        {'engine': engine, 'batching': batching, 'gpu-contract': gpu_contract}[args.mode](args, d)


if __name__ == '__main__':
    main()
