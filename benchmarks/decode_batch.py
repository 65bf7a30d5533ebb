"""One decode step of the reference model at several batch sizes: how the
cost per sequence falls as the batch grows (attention batched over sequences,
mpimoe.model.attention; block KV cache, mpimoe.model.kvcache).

    python benchmarks/decode_batch.py [--preset small] [--batches 4,16,64] \
        [--prompt 16,64] [--repeats 7] [--threads 1]

Writes the preset's synthetic weights into a temporary directory and loads
them as a ReferenceModel (NumPy, one process, ``--threads`` BLAS threads).
For each batch size B it prefills B random prompts (lengths drawn from
``--prompt``, so the contexts differ and the decode group is padded).  Then
``--repeats`` rounds each time, for every B in turn (interleaved, so that
other work on the machine slows them alike), the attention of every layer at
the next position (the cache not advanced) and one decode step (forward of
B sequences x 1 token; it advances them).  Prints the medians over the
rounds: ms per step, ms per sequence, and the ratio of the per-sequence time
to that at the first batch size.  Printed, not asserted.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpimoe.checkpoint.weights import WeightFile  # noqa: E402
from mpimoe.checkpoint.writer import write_synthetic  # noqa: E402
from mpimoe.model.config import model_config  # noqa: E402
from mpimoe.bench.gpu import prefilled  # noqa: E402
from mpimoe.model.layers import rms_norm  # noqa: E402
from mpimoe.model.reference import load_reference  # noqa: E402
from mpimoe.runtime.threads import apply_threads  # noqa: E402


def _ints(text):
    return [int(t) for t in text.split(',')]


def timed_step(model, cache, seqs, rng):
    """Seconds of the attention of all layers at the next position, then of
    one decode step of ``seqs``: (step, attention)."""
    cfg, fe = model.cfg, model.front
    ones = np.ones(len(seqs), np.int64)
    x = rms_norm(fe.embed(rng.integers(0, cfg.vocab_size, len(seqs))),
                 fe.layer[0]['attn_norm'], cfg.norm_eps)
    t0 = time.perf_counter()
    where = fe.place(cache, seqs, ones)
    for i in range(cfg.n_layers):
        fe.attention_out(i, x, cache, where).wait()
    t1 = time.perf_counter()
    model.forward(rng.integers(0, cfg.vocab_size, len(seqs)), cache, seqs, ones)
    return time.perf_counter() - t1, t1 - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--preset', default='small')
    ap.add_argument('--batches', type=_ints, default=[4, 16, 64])
    ap.add_argument('--prompt', type=_ints, default=[16, 64],
                    help='prompt lengths: MIN,MAX (uniform)')
    ap.add_argument('--repeats', type=int, default=7, help='decode steps timed (>= 5)')
    ap.add_argument('--threads', type=int, default=1, help='BLAS threads')
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error('--repeats: at least 5')
    apply_threads(args.threads)
    cfg = model_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'weights.h5')
        write_synthetic(cfg, path, seed=0)
        with WeightFile(path) as wf:
            model = load_reference(wf)
    rng = np.random.default_rng(0)
    print(f'{args.preset}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads '
          f'({cfg.n_kv_heads} KV) of {cfg.head_dim}; prompts of {args.prompt[0]}..'
          f'{args.prompt[-1]} tokens; {args.threads} BLAS thread(s); median of '
          f'{args.repeats} decode steps')
    with np.errstate(over='ignore', invalid='ignore'):
        runs = {B: prefilled(model, B, args.prompt, args.repeats, rng) for B in args.batches}
        times = {B: [] for B in args.batches}
        for _ in range(args.repeats):
            for B, (cache, seqs) in runs.items():
                times[B].append(timed_step(model, cache, seqs, rng))
    print(f'{"B":>4s} {"step ms":>9s} {"ms/seq":>8s} {"ratio":>6s}   '
          f'{"attn ms":>9s} {"ms/seq":>8s} {"ratio":>6s}')
    base = None
    for B, ts in times.items():
        step, attn = (statistics.median(t) for t in zip(*ts))
        per = (step / B, attn / B)
        base = base or per
        print(f'{B:4d} {1e3 * step:9.2f} {1e3 * per[0]:8.3f} {per[0] / base[0]:6.2f}   '
              f'{1e3 * attn:9.2f} {1e3 * per[1]:8.3f} {per[1] / base[1]:6.2f}')


if __name__ == '__main__':
    main()
