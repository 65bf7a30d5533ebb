"""Rank 0's expert-load record stays bounded however long the run
(mpimoe.runtime.loads): windows merge pairwise, totals stay exact."""

import numpy as np

from mpimoe.planning.balance import max_over_mean
from mpimoe.runtime.loads import MAX_WINDOWS, LoadHistory


def test_windows_merge_and_the_totals_stay_exact():
    rng = np.random.default_rng(0)
    steps = rng.integers(0, 9, (5 * MAX_WINDOWS + 3, 2, 4))               # [S, Lm, E]
    h = LoadHistory(width=1)
    for s in steps:
        h.add(s)
    assert np.array_equal(h.total, steps.sum(axis=0)) and h.steps == len(steps)
    w = h.width
    assert w == 4 and MAX_WINDOWS <= len(h.windows) < 2 * MAX_WINDOWS    # merged twice
    got = h.history((2, 4))
    # window i holds steps [i*w, (i+1)*w), the last the remainder
    want = np.add.reduceat(steps, np.arange(0, len(steps), w), axis=0)
    assert np.array_equal(got, want)
    assert max_over_mean(got).shape == (len(want), 2)


def test_a_run_shorter_than_a_window():
    h = LoadHistory(width=4)
    h.add(np.ones((1, 3), np.int64))
    assert h.history((1, 3)).tolist() == [[[1, 1, 1]]] and h.width == 4
