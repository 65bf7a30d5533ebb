"""Bounds on the difference of two evaluations, for tests that compare
backends, layouts and batchings: element-wise for one expert
(mpimoe.model.layers.expert_ffn, below), per row of logits and per greedy choice
for the whole model (LOGIT_RTOL, TIE_RTOL: argued with them), and the one
comparison of an output file against the reference's.

    bound = expert_bound(x16, w, 'mlp', 'bfloat16', rounded_pre=1)   # [n, d]
    assert np.all(np.abs(y_gpu - y_cpu) <= bound)
    assert_matches_reference(read_outputs(run), read_outputs(ref), weights, inputs)

For one expert, both evaluations take the same 16-bit inputs and weights and round the hidden
activations and the output to 16 bits; they may differ in

- the order of their FP32 sums: a dot product of length n is within
  gamma_n sum|x_i w_i| of the exact one (gamma_n = n 2^-24 / (1 - n 2^-24)), so
  two are within twice that;
- the rounding of the pre-activations (the GEMM products feeding the
  activation) to 16 bits: ``rounded_pre = 1`` when one of them rounds (the
  GPU contract against the CPU's FP32 one), 2 when both do (the GPU contract
  on two devices): each rounding moves a value by at most u |value|, u = 2^-8
  (bfloat16) or 2^-11 (float16);
- the FP32 evaluation of the activation (tanh or exp of two libraries): a few
  2^-24 of the magnitudes involved; 32 2^-24 is allowed.

A difference D of two values before a rounding that both apply leaves at most
D + 2u |value| after it (each rounding moves its value by u |value|).  The
activations are Lipschitz: |gelu'| <= 1.1290 (tanh form), |silu'| <= 1.0999.
Everything is evaluated in float64 from the exact products, so the bound is
rigorous to first order in u (second-order terms are below 2^-16 relative and
covered by rounding the constants up).
"""

import functools

import numpy as np

__all__ = ['EPS32', 'unit_roundoff', 'gamma', 'expert_bound', 'GELU_SLOPE', 'SILU_SLOPE',
           'LOGIT_RTOL', 'TIE_RTOL', 'GPU_TIE_RTOL', 'rel_l2_rows', 'assert_logits_close',
           'tie_bound', 'next_logits', 'teacher_forced', 'greedy_divergences',
           'assert_greedy_match', 'assert_matches_reference']

#: unit roundoff of FP32
EPS32 = 2.0 ** -24
#: max |d gelu / dx| (tanh form) and max |d silu / dx|, rounded up
GELU_SLOPE, SILU_SLOPE = 1.13, 1.1


# ---------------------------------------------------------------- whole-model outputs
#
# Two evaluations of the model on the same tokens (the reference and the engine,
# two batchings, two BLAS kernels or thread counts) do the same FP32 arithmetic in
# differently shaped GEMMs and round to 16 bits at the same places.  They differ by
#
# 1. the order of the FP32 sums: at most gamma_n relative per dot product, ~1e-6
#    absolute on the logits (the median row on tiny);
# 2. 16-bit roundings that those differences carry across a midpoint ("flips"):
#    each moves its value by one 16-bit ulp (<= 2u relative, u = 2^-8 for
#    bfloat16), a change far above the FP32 noise, so later roundings then flip
#    far more often (a cascade).  Their number is not bounded, but their effect
#    is: whichever way each rounding goes, an evaluation's logits differ from
#    those of the same arithmetic without the 16-bit roundings (U) by the
#    propagated rounding errors, each at most u |value|.  So two evaluations A
#    and B are within |A - U| + |B - U|: twice one evaluation's rounding error.
#    Measured (the reference against itself without expert_ffn's roundings,
#    teacher-forced on the same tokens; tiny and tiny mlp 200 sequences x 40
#    steps, small 48 x 16): |A - U| / |A| <= 0.50 u relative L2 per row, and
#    max_v (A - U)_v - min_v (A - U)_v, the most it moves the gap of any two
#    logits, <= 3.7 u rms(A) (99th percentiles, small; tiny: 0.35 u and
#    2.1 u).  Between two batchings (one batch against batches of 5 or 7)
#    rows differed by at most 0.32 u relative L2 and moved a gap by at most
#    1.8 u rms: a cascade in 1 row in 100 on tiny, in every row on small.
# 3. routing: top-k is chosen on FP32 router scores, not rounded; where the
#    k-th and (k+1)-th scores of a token are closer than the evaluations'
#    difference, the token goes to another expert and the logits of its
#    sequence move by O(0.1) (seen only between rounded and unrounded runs,
#    never between two batchings; these bounds do not cover it).
#
# A real bug (a wrong position, mask, cache row, expert or a companion's token)
# changes the logits by O(1) relative.

#: Bound on the relative L2 difference ``|a - b| / |b|`` of one row of logits
#: between two evaluations (above): twice one evaluation's rounding error is
#: about 1 u (seen: 0.32 u); 8 u = 2^-5 leaves a factor 8 above it.
LOGIT_RTOL = 2.0 ** -5

#: Bound on how far two evaluations move the gap ``l[a] - l[b]`` of any two
#: logits of a row, relative to the row's RMS: twice one evaluation's
#: rounding error (99th percentile 3.7 u; seen between two evaluations:
#: 1.8 u), rounded up to 8 u = 2^-5.  Greedy decoding may pick another token
#: only where the two top logits are this close: 7 to 12 rows in 100 on tiny
#: and small, so a bug's divergences, in most sequences, are not all there.
TIE_RTOL = 2.0 ** -5

# The GPU's contract (mpimoe.model.layers: 16-bit weights, the front-end's GEMM
# inputs rounded to 16 bits, the experts' products written in 16 bits) adds
# roundings of its own, so a GPU run against the FP32 reference is one
# evaluation's rounding error of that contract, not twice the FP32 one's.
# Measured on a CPU (NumPy running the GPU contract, teacher-forced on the
# reference's tokens, tiny, 200 sequences x 40 steps: `python
# benchmarks/numerics.py gpu-contract`): relative L2 per row median 0.60 u,
# 99th percentile 2.0 u (inside LOGIT_RTOL = 8 u; the experts-only contract
# before: 0.30 u and 0.62 u); the most it moves a gap of two logits, 99th
# percentile 11 u rms (experts-only: 3.7 u), above TIE_RTOL.  Greedy choices of
# a GPU run are therefore accepted within 32 u = 2^-3 of the row's RMS, three
# times the 99th percentile.  The maxima of both (45 u, 246 u) are routing
# flips (point 3 above), not covered, as for the FP32 contract.  On `small` (48
# sequences x 16 steps) routing flips reach the 99th percentile (14 u relative
# L2, 100 u spread; the experts-only contract alike: 17 u, 119 u; medians
# 0.64 u and 0.35 u): the GPU tests compare the whole model on tiny only.

#: TIE_RTOL for a GPU run against the FP32 reference (argued above)
GPU_TIE_RTOL = 2.0 ** -3


def unit_roundoff(dtype):
    """Half the spacing of the 16-bit format relative to a value: u."""
    return {'bfloat16': 2.0 ** -8, 'float16': 2.0 ** -11}[dtype]


def gamma(n):
    """Bound on the relative error of an FP32 sum of n terms (any order)."""
    return n * EPS32 / (1 - n * EPS32)


def _gelu(x):
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def expert_bound(x16, w, kind, dtype, rounded_pre):
    """Bound on |y_a - y_b| for two evaluations of expert_ffn(x16, w, kind, dtype).

    x16: [n, d] (16-bit values, any float dtype); w: dict of matrices (16-bit
    values); rounded_pre: how many of the two round the pre-activations
    (1 or 2).  Returns float64 [n, d].
    """
    u = unit_roundoff(dtype)
    x = np.asarray(x16, np.float64)
    W = {m: np.asarray(a, np.float64) for m, a in w.items()}
    d, h = W['down'].shape[1], W['down'].shape[0]

    def pre(m):
        """A pre-activation, exact, and the bound on its difference: [n, h] each."""
        p = x @ W[m]
        sums = 2 * gamma(d) * (np.abs(x) @ np.abs(W[m]))
        return p, rounded_pre * u * (np.abs(p) + sums) + sums

    if kind == 'swiglu':
        (g, dg), (v, dv) = pre('gate'), pre('up')
        a = _silu(g) * v
        da = SILU_SLOPE * dg * (np.abs(v) + dv) + np.abs(_silu(g)) * dv
        da += 32 * EPS32 * (np.abs(a) + np.abs(g * v))
    else:
        p, dp = pre('up')
        a = _gelu(p)
        da = GELU_SLOPE * dp + 32 * EPS32 * (np.abs(a) + np.abs(p))
    dhid = (1 + u) * da + 2 * u * np.abs(a)                          # after both round
    hid = np.abs(a) * (1 + u)
    z = a @ W['down']
    dz = dhid @ np.abs(W['down']) + 2 * gamma(h) * (hid @ np.abs(W['down']))
    return (1 + u) * dz + 2 * u * (np.abs(z) + dz)                   # after both round


def rel_l2_rows(actual, expected):
    """Relative L2 difference of each row: float arrays [..., V] -> float64 [...]."""
    diff = np.asarray(actual, np.float64) - expected
    return np.linalg.norm(diff, axis=-1) / np.linalg.norm(np.asarray(expected, np.float64),
                                                          axis=-1)


def assert_logits_close(actual, expected, what):
    """actual, expected: float [..., V]; every row within LOGIT_RTOL (relative
    L2).  Returns the largest relative difference, for the report."""
    rel = rel_l2_rows(actual, expected)
    worst = np.unravel_index(int(np.argmax(rel)), rel.shape)
    diff = np.abs(np.asarray(actual, np.float64) - expected)[worst].max()
    assert rel[worst] <= LOGIT_RTOL, (f'{what}: row {worst}: relative L2 difference '
                                      f'{rel[worst]:.3g} > LOGIT_RTOL {LOGIT_RTOL:.3g} '
                                      f'(max |difference| in that row {diff:.3g})')
    return float(rel[worst])


def tie_bound(row, tie_rtol=TIE_RTOL):
    """How far two evaluations may move the gap of two logits of ``row`` [V]:
    ``tie_rtol`` (TIE_RTOL, or GPU_TIE_RTOL) times the row's RMS."""
    return tie_rtol * float(np.sqrt(np.mean(np.asarray(row, np.float64) ** 2)))


def next_logits(model, prompt, tokens):
    """A ReferenceModel's logits [V] for the token after ``prompt`` + ``tokens``
    (int arrays), from one prefill of them."""
    return model.generate([np.concatenate([prompt, tokens])], 0)[1][0]


def teacher_forced(model, prompts, tokens):
    """A ReferenceModel's logits [n, B, V] (host) of ``prompts`` (B int arrays)
    then ``tokens`` int [B, n] fed one step at a time through its KV cache:
    step s predicts tokens[:, s]; every sequence sees the same tokens
    whatever its logits, so two evaluations compare step for step."""
    lengths = np.array([len(p) for p in prompts])
    cache, seqs = model.front.cache_for(lengths + tokens.shape[1])
    ones = np.ones(len(prompts), np.int64)
    out = [model.forward(np.concatenate(prompts).astype(np.int64), cache, seqs, lengths)]
    for s in range(tokens.shape[1] - 1):
        out.append(model.forward(tokens[:, s].astype(np.int64), cache, seqs, ones))
    return np.stack(out)


def greedy_divergences(got, ref, recompute, scores=None, tie_rtol=TIE_RTOL):
    """Where the tokens of another evaluation first leave the reference's.

    got, ref: one int array per sequence; recompute(i, tokens) -> float [V]:
    the reference model's logits after prompt i + ``tokens`` (:func:`next_logits`;
    called only at a divergence); scores(i, j, row) -> float [V]: the scores
    whose argmax chose token j of sequence i from its logits ``row``
    (mpimoe.runtime.sampler.choice_scores; default: greedy, the logits) and
    the factor by which they scale the logits (1/temperature).
    Returns a list of (sequence i, step j, got token, reference token, gap,
    bound): the first step j of each sequence whose tokens differ, the gap of
    the two tokens' scores recomputed on the prompt and the j common tokens
    (teacher-forced), and :func:`tie_bound` of that row (``tie_rtol``) times the scale.  A
    sequence that ends (end-of-sequence or stop token) where the other goes
    on differs in that token; one that is a strict prefix of the other
    without differing is a bug (a wrong stop), reported with gap inf.
    """
    found = []
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        g, r = np.asarray(g), np.asarray(r)
        n = min(len(g), len(r))
        steps = np.flatnonzero(g[:n] != r[:n])
        if steps.size:
            j = int(steps[0])
            row = recompute(i, r[:j])
            s, scale = (row, 1.0) if scores is None else scores(i, j, row)
            a, b = int(g[j]), int(r[j])
            found.append((i, j, a, b, abs(float(s[a]) - float(s[b])),
                          scale * tie_bound(row, tie_rtol)))
        elif len(g) != len(r):
            found.append((i, n, -1, -1, float('inf'), 0.0))
    return found


def assert_greedy_match(got, ref, recompute, names=None, scores=None, tie_rtol=TIE_RTOL):
    """Tokens of another evaluation against the reference's (arguments as
    :func:`greedy_divergences`; names: the sequences' names).

    Tokens must be equal up to a first divergence, which is accepted only
    where the two tokens' recomputed scores are within the bound: two
    evaluations move a gap of two logits by at most :func:`tie_bound`, and a
    sampled choice's scores (logits / temperature plus the same noise on
    both) by that over the temperature, so where one picked a over b and the
    other b over a, a third (the recomputed one) has them within it.  The
    rest of that sequence is not compared: each evaluation continues from
    its own token, so from there on they decode different texts.  Returns
    the accepted divergences: list of (sequence, step, gap, bound).
    """
    found = greedy_divergences(got, ref, recompute, scores, tie_rtol)
    bad = [f'sequence {i}' + (f' ({names[i]})' if names else '') +
           f', step {j}: token {a}, the reference {b}; recomputed score gap {gap:.3g} > '
           f'bound {bound:.3g}; tokens {list(map(int, got[i][:j + 1]))}, reference '
           f'{list(map(int, ref[i][:j + 1]))}' for i, j, a, b, gap, bound in found if gap > bound]
    assert not bad, (f'{len(bad)} of {len(got)} sequences diverge from the reference away '
                     f'from a near-tie (bound: {tie_rtol:.3g} x RMS of the row):\n' +
                     '\n'.join(bad))
    return [(i, j, gap, bound) for i, j, _, _, gap, bound in found]


@functools.lru_cache(maxsize=4)
def _reference_of(weights, inputs):
    """(ReferenceModel of weight file ``weights``, prompts of ``inputs``)."""
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.io.inputs import read_inputs
    from mpimoe.model.reference import load_reference
    with WeightFile(weights) as wf:
        model = load_reference(wf)
        tokenizer = wf.tokenizer()
    seqs = read_inputs(inputs, model.cfg.vocab_size, tokenizer)
    return model, [seqs.seq(i) for i in range(len(seqs))]


def assert_matches_reference(got, ref, weights, inputs, max_new=None, defaults=None,
                             tie_rtol=TIE_RTOL):
    """An output file of another evaluation (the engine, another layout)
    against the reference's: mpimoe.io.outputs.read_outputs dicts of ``inputs`` with
    ``weights`` (paths).

    The same ids in order; tokens as :func:`assert_greedy_match` (got holds
    at most ``max_new`` tokens per sequence, compared with the reference's
    first ``max_new``; default: all of them), sampled ones scored with each
    sequence's settings (``defaults``: the run's SamplingParams, each input
    line's keys over them; default greedy); finish reasons and texts (where
    got has them) equal where the tokens are; last_logits, where got has them,
    within LOGIT_RTOL of the reference's.  Returns the accepted divergences.
    tie_rtol: the near-tie bound (GPU_TIE_RTOL for a GPU run).
    The weights' own tokenizer (if any) encodes text inputs.
    """
    from mpimoe.runtime.sampler import choice_scores
    assert got['ids'] == ref['ids']
    n = max(map(len, ref['generated']), default=0) if max_new is None else max_new
    params = _params_of(str(weights), str(inputs), defaults) if defaults else None

    def recompute(i, tokens):
        model, prompts = _reference_of(str(weights), str(inputs))
        return next_logits(model, prompts[i], tokens)

    def scores(i, j, row):
        p = params[i]
        if p.temperature == 0:
            return row, 1.0
        return choice_scores(row, p, ref['ids'][i], j), 1.0 / p.temperature

    expected = [r[:n] for r in ref['generated']]
    accepted = assert_greedy_match(got['generated'], expected, recompute, ref['ids'],
                                   scores if params else None, tie_rtol)
    diverged = {i for i, *_ in accepted}
    if got['finish_reason'] is not None and max_new is None:
        wrong = [i for i, (a, b) in enumerate(zip(got['finish_reason'], ref['finish_reason']))
                 if a != b and i not in diverged]
        assert not wrong, f'finish_reason differs from the reference in sequences {wrong}'
    if got.get('text') is not None and max_new is None:
        wrong = [i for i, (a, b) in enumerate(zip(got['text'], ref['text']))
                 if a != b and i not in diverged]
        assert not wrong, f'text differs from the reference in sequences {wrong}'
    if got['last_logits'] is not None:
        assert_logits_close(got['last_logits'], ref['last_logits'], 'last_logits')
    return accepted


def _params_of(weights, inputs, defaults):
    """Each sequence's SamplingParams: the input lines' keys over ``defaults``."""
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.io.inputs import InputStream
    with WeightFile(weights) as wf:
        vocab, tokenizer = wf.config.vocab_size, wf.tokenizer()
    stream = InputStream(inputs, vocab, defaults=defaults, tokenizer=tokenizer)
    return [p for _, batch in stream.batches(None) for p in batch.params]
