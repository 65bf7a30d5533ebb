"""How a pass is split into micro-batches (mpimoe.model.forward.micro_batches)."""

import numpy as np
import pytest

from mpimoe.model.forward import micro_batches as _micro_batches


def _check_cover(ranges, m, b):
    """Exactly m consecutive ranges covering [0, b)."""
    assert len(ranges) == m
    assert ranges[0][0] == 0 and ranges[-1][1] == b
    assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))


@pytest.mark.parametrize('ntok, m, min_tokens, expected', [
    # 4 prompts of 64 tokens: 4 groups of 1 sequence
    ([64] * 4, 4, 1, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    # a decode pass of 64 sequences, 1 token each, at least 32 tokens a group:
    # 2 groups, the other 2 micro-batches empty at the end
    ([1] * 64, 4, 32, [(0, 32), (32, 64), (64, 64), (64, 64)]),
    # fewer tokens than the minimum: everything in the first micro-batch
    ([1] * 12, 8, 64, [(0, 12)] + [(12, 12)] * 7),
    # an empty pass (an idle front-end): m empty micro-batches
    ([], 3, 16, [(0, 0)] * 3),
    # one sequence: it cannot be split
    ([100], 3, 1, [(0, 1), (1, 1), (1, 1)]),
])
def test_micro_batches(ntok, m, min_tokens, expected):
    ranges = _micro_batches(np.array(ntok, dtype=np.int64), m, min_tokens)
    assert ranges == expected
    _check_cover(ranges, m, len(ntok))


def test_groups_hold_at_least_min_tokens():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ntok = rng.integers(1, 40, size=rng.integers(1, 50))
        m, least = int(rng.integers(1, 9)), int(rng.integers(1, 200))
        ranges = _micro_batches(ntok, m, least)
        _check_cover(ranges, m, len(ntok))
        used = [(a, b) for a, b in ranges if b > a]
        # never more groups than m and the minimum allow; the empty ones last
        assert 1 <= len(used) <= max(1, min(m, int(ntok.sum()) // least))
        assert ranges[:len(used)] == used


@pytest.mark.parametrize('m, problem', [(0, 'must be >= 1'), (65, 'must be <= 64')])
def test_micro_batches_out_of_range_is_one_line(m, problem):
    """Thousands of micro-batches, each posting its (empty) collectives at every
    MoE layer of every step, made a run crawl past SIGTERM: refused at start."""
    from mpimoe.errors import ConfigError
    from mpimoe.runtime.options import RunOptions
    RunOptions(weights='w.h5', input='in.jsonl', output='o.h5', micro_batches=64).validate()
    with pytest.raises(ConfigError, match=f'^--micro-batches {m}: {problem}$'):
        RunOptions(weights='w.h5', input='in.jsonl', output='o.h5', micro_batches=m).validate()
