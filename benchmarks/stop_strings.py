"""The cost of stop strings on a front-end: what a generated token costs to
watch (mpimoe.text.stops.StopMatcher, incremental decoding) against the
naive way of decoding the whole generated text at every step, and what the
final text of a sequence costs (one decode, cut before the stop).

    python benchmarks/stop_strings.py [--tokenizer weights/tiny-tokenizer] \
        [--tokens 1024] [--seqs 64] [--repeats 5]

Random token ids of the tokenizer's vocabulary (stop strings that never
occur, so every token is watched); the naive baseline runs on 4 sequences.
Prints the medians over ``--repeats`` rounds (the baseline's rounds
interleaved with them) and the ratio naive / incremental.  Printed, not
asserted.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpimoe.text.stops import StopMatcher, cut_text  # noqa: E402
from mpimoe.text.tokenizer import TextTokenizer, read_tokenizer_files  # noqa: E402

STOPS = ('zzzz-never', 'qqq')


def _watched(tok, seqs):
    t0 = time.perf_counter()
    for s in seqs:
        m = StopMatcher(tok, STOPS)
        for t in s:
            m.push(t)
    return (time.perf_counter() - t0) / sum(map(len, seqs))


def _naive(tok, seqs):
    t0 = time.perf_counter()
    for s in seqs:
        for k in range(1, len(s) + 1):
            text = tok.decode(s[:k])
            any(x in text for x in STOPS)
    return (time.perf_counter() - t0) / sum(map(len, seqs))


def _final(tok, seqs):
    t0 = time.perf_counter()
    for s in seqs:
        cut_text(tok, s, STOPS)
    return (time.perf_counter() - t0) / len(seqs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--tokenizer', default=str(Path(__file__).resolve().parents[1] / 'weights'
                                               / 'tiny-tokenizer'),
                    help='tokenizer.json or its directory (default weights/tiny-tokenizer)')
    ap.add_argument('--tokens', type=int, default=1024, help='generated tokens per sequence')
    ap.add_argument('--seqs', type=int, default=64, help='sequences (default 64)')
    ap.add_argument('--repeats', type=int, default=5, help='rounds (default 5)')
    args = ap.parse_args()
    tok = TextTokenizer(read_tokenizer_files(args.tokenizer), args.tokenizer)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, tok.vocab_size, args.tokens).tolist() for _ in range(args.seqs)]
    rounds = [(_watched(tok, seqs), _naive(tok, seqs[:4]), _final(tok, seqs))
              for _ in range(args.repeats)]
    watched, naive, final = (statistics.median(r) for r in zip(*rounds))
    print(f'tokenizer {args.tokenizer} ({tok.vocab_size} ids), {args.seqs} sequences of '
          f'{args.tokens} generated tokens, medians of {args.repeats} rounds')
    print(f'  watching for stop strings (incremental)   {watched * 1e6:8.2f} us per token')
    print(f'  decoding the whole text at each step      {naive * 1e6:8.2f} us per token'
          f'   ratio {naive / watched:.0f}x')
    print(f'  final text (decode + cut)                 {final * 1e6:8.1f} us per sequence')


if __name__ == '__main__':
    main()
