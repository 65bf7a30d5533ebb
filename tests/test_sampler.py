"""The sampler (mpimoe/runtime/sampler.py): greedy is argmax; a sampled token
depends only on (seed, id, step); sampled frequencies are softmax(logits / T)
restricted to what top_k / top_p keep.

Frequency bounds: over N steps (independent streams: one Philox counter
each) token i's count is Binomial(N, p_i); 5 standard deviations,
sqrt(N p_i (1 - p_i)), bound it for all but ~6e-7 of seeds per token (the
tests are deterministic: a seed either passes or not, and these do).
"""

import numpy as np
import pytest

from mpimoe.runtime.request import SamplingParams
from mpimoe.runtime.sampler import choice_scores, noise, sample

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _counts(params, n, logits=LOGITS, seq_id='doc'):
    """Token counts int [V] of ``n`` steps of one sequence."""
    picks = [np.argmax(choice_scores(logits, params, seq_id, s)) for s in range(n)]
    return np.bincount(picks, minlength=len(logits))


def _assert_binomial(counts, p):
    """Every count within 5 standard deviations of its Binomial(N, p_i) mean."""
    n = counts.sum()
    sigma = np.sqrt(n * p * (1 - p))
    assert (np.abs(counts - n * p) <= 5 * sigma + 1e-9).all(), (counts, n * p, sigma)


def test_greedy_is_argmax_lowest_id_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 50)).astype(np.float32)
    logits[2, [7, 30]] = 10.0                       # a tie: the lower id wins
    greedy = [SamplingParams(temperature=0.0, top_k=3, seed=s) for s in range(6)]
    got = sample(logits, greedy, [f'x{i}' for i in range(6)], np.arange(6))
    assert got.dtype == np.int32 and got.tolist() == np.argmax(logits, axis=1).tolist()
    assert got[2] == 7


def test_noise_is_standard_gumbel_and_reproducible():
    """Mean Euler's gamma, variance pi^2/6; 200000 draws: the mean's standard
    error is sqrt(1.645 / 2e5) = 0.0029, bounded at 5 of them."""
    g = noise(3, 'doc', 11, 200_000)
    assert g.dtype == np.float64 and np.isfinite(g).all()
    assert abs(g.mean() - np.euler_gamma) < 5 * np.sqrt(np.pi ** 2 / 6 / g.size)
    assert abs(g.var() - np.pi ** 2 / 6) < 0.05
    assert np.array_equal(g[:8], noise(3, 'doc', 11, 8))        # a prefix: the same stream
    others = [noise(4, 'doc', 11, 8), noise(3, 'doc2', 11, 8), noise(3, 'doc', 12, 8),
              noise(3, 'doc', 10, 8)]
    assert not any(np.array_equal(g[:8], o) for o in others)


def test_a_token_does_not_depend_on_its_batch():
    """Same (seed, id, step): the same token, whatever the other rows and
    their order (sampled rows mixed with greedy ones)."""
    rng = np.random.default_rng(1)
    b, v = 12, 40
    logits = rng.standard_normal((b, v)).astype(np.float32)
    params = [SamplingParams(temperature=[0.0, 0.8, 1.3][i % 3], top_k=[0, 5][i % 2],
                             top_p=[1.0, 0.9][i % 4 // 2], seed=i // 3) for i in range(b)]
    ids, steps = [f'seq-{i}' for i in range(b)], rng.integers(0, 100, b)
    whole = sample(logits, params, ids, steps)
    perm = rng.permutation(b)[:7]
    part = sample(logits[perm], [params[i] for i in perm], [ids[i] for i in perm], steps[perm])
    assert part.tolist() == whole[perm].tolist()
    alone = [sample(logits[i:i + 1], [params[i]], [ids[i]], steps[i:i + 1])[0] for i in range(b)]
    assert alone == whole.tolist()


def test_steps_ids_and_seeds_give_different_tokens():
    flat = np.zeros(64, dtype=np.float32)           # uniform: every token equally likely
    p = SamplingParams(temperature=1.0, seed=5)
    by_step = [np.argmax(choice_scores(flat, p, 'a', s)) for s in range(20)]
    by_id = [np.argmax(choice_scores(flat, p, f'a{i}', 0)) for i in range(20)]
    by_seed = [np.argmax(choice_scores(flat, SamplingParams(temperature=1.0, seed=s), 'a', 0))
               for s in range(20)]
    # 20 uniform draws of 64 all equal: probability 64^-19
    assert all(len(set(tokens)) > 1 for tokens in (by_step, by_id, by_seed))


@pytest.mark.parametrize('temperature', [1.0, 0.6, 2.5])
def test_frequencies_are_the_softmax(temperature):
    counts = _counts(SamplingParams(temperature=temperature, seed=1), 20_000)
    _assert_binomial(counts, _softmax(LOGITS.astype(np.float64) / temperature))


def test_top_k_samples_the_k_largest_only():
    """Renormalised over the 3 largest; a tie at the boundary goes to the lower id."""
    counts = _counts(SamplingParams(temperature=1.0, top_k=3, seed=2), 10_000)
    assert counts[3:].sum() == 0
    _assert_binomial(counts[:3], _softmax(LOGITS[:3].astype(np.float64)))
    tied = np.array([0.0, 1.0, 1.0, 1.0, -1.0], dtype=np.float32)
    picked = _counts(SamplingParams(temperature=1.0, top_k=2, seed=3), 400, tied)
    assert picked[[0, 3, 4]].sum() == 0 and picked[1] > 0 and picked[2] > 0


def test_top_p_samples_the_nucleus_only():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two
    (0.8 >= 0.75), 0.45 the first (0.5 >= 0.45); with top_k 1 only the first."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    counts = _counts(SamplingParams(temperature=1.0, top_p=0.75, seed=4), 10_000, logits)
    assert counts[2:].sum() == 0
    _assert_binomial(counts[:2], np.array([0.5, 0.3]) / 0.8)
    for params in (SamplingParams(temperature=1.0, top_p=0.45, seed=4),
                   SamplingParams(temperature=1.0, top_p=0.75, top_k=1, seed=4)):
        assert _counts(params, 200, logits).tolist() == [200, 0, 0, 0]


def test_top_p_after_top_k_is_renormalised():
    """top_k 3 leaves 0.5, 0.3, 0.15 (sum 0.95): renormalised 0.526, 0.316, 0.158,
    so top_p 0.52 keeps the first alone (0.526 >= 0.52); without the
    renormalisation (0.5 < 0.52), or with top_p before top_k, it would keep two."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    counts = _counts(SamplingParams(temperature=1.0, top_k=3, top_p=0.52, seed=6), 2000, logits)
    assert counts.tolist() == [2000, 0, 0, 0]


def test_a_very_small_temperature_is_argmax():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((16, 1000)).astype(np.float32)
    params = [SamplingParams(temperature=1e-6, seed=i) for i in range(16)]
    got = sample(logits, params, [str(i) for i in range(16)], np.zeros(16, np.int64))
    assert got.tolist() == np.argmax(logits, axis=1).tolist()
