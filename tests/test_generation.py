"""Real generation against the reference: end-of-sequence, per-request
settings, seeded sampling whatever the layout, the KV block pool reused.

Every engine run is compared with ``mpimoe reference`` on the same file by
tests/contract.py: tokens equal but at a first divergence where the two
choices' recomputed scores are within the bound two evaluations can move
them (greedy: the logits; sampled: logits / temperature plus the same
Gumbel noise, so the bound over the temperature).
"""

import json

import numpy as np
import pytest

from contract import assert_greedy_match, assert_matches_reference, next_logits
from mpirun import mpiexec
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.io.inputs import read_inputs
from mpimoe.io.outputs import read_outputs
from mpimoe.model.reference import load_reference
from mpimoe.runtime.request import SamplingParams

RUN_TIMEOUT = 120
NEW = 8
SAMPLED = ['--temperature', '0.8', '--seed', '7']


def _reference(weights, inputs, out, extra=()):
    proc = mpiexec(1, ['reference', '--weights', weights, '--input', inputs, '--output', out,
                       *map(str, extra)], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out)


def _engine(n, weights, inputs, out, extra=()):
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       *map(str, extra)], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out)


@pytest.fixture(scope='module')
def eos_weights(tiny_weights, tiny_inputs, make_weights):
    """(weights with an eos_token_id that ends some sequences after 1 to 3
    greedy tokens, that id, the greedy tokens without it).

    The weights' tensors do not depend on eos_token_id (seeded the same), so
    the greedy tokens of the file without it show which id to choose: the one
    first generated at steps 0..2 by the most sequences, but not by all."""
    with WeightFile(tiny_weights) as wf:
        model = load_reference(wf)
    seqs = read_inputs(tiny_inputs, 256)
    free, _ = model.generate([seqs.seq(i) for i in range(len(seqs))], NEW)
    early = {}
    for toks in free:
        for t in set(toks[:3].tolist()):
            early[t] = early.get(t, 0) + 1
    eos = max((t for t, c in early.items() if c < len(free)), key=lambda t: (early[t], -t))
    return make_weights('tiny', [f'eos_token_id={eos}']), eos, free


@pytest.mark.timeout(4 * RUN_TIMEOUT)
def test_greedy_stops_at_eos_like_the_reference(eos_weights, tiny_weights, tiny_inputs,
                                                tmp_path):
    """With EOS some sequences end after 1-3 tokens (the EOS kept, reason
    stop), the others run to max_tokens (length); the reference's tokens
    are the EOS-free ones cut after the first EOS, and the engine (two
    front-ends, micro-batched) matches the reference."""
    weights, eos, free = eos_weights
    ref = _reference(weights, tiny_inputs, tmp_path / 'ref.h5', ['--max-new-tokens', NEW])
    cut = [f[:int(np.flatnonzero(f == eos)[0]) + 1] if eos in f else f for f in free]
    with WeightFile(weights) as wf:
        model = load_reference(wf)
    seqs = read_inputs(tiny_inputs, 256)
    assert_greedy_match(ref['generated'], cut,
                        lambda i, t: next_logits(model, seqs.seq(i), t), ref['ids'])
    reasons = ref['finish_reason']
    short = [i for i, g in enumerate(ref['generated']) if len(g) <= 3]
    assert len(short) >= 2 and reasons.count('length') >= 2, (reasons, eos)
    for g, why in zip(ref['generated'], reasons):
        assert (why == 'stop') == (g[-1] == eos) and (why == 'stop' or len(g) == NEW)
    assert list(ref['completion_tokens']) == [len(g) for g in ref['generated']]
    assert list(ref['prompt_tokens']) == list(seqs.lengths)
    got = _engine(10, weights, tiny_inputs, tmp_path / 'run.h5',
                  ['--max-new-tokens', NEW, '--frontends', 2, '--max-batch-tokens', 40])
    assert_matches_reference(got, ref, weights, tiny_inputs)


def _mixed_inputs(path, n=14):
    """JSONL lines with their own max_tokens (0..6), one with ignore_eos and
    stop tokens, the rest the run's defaults."""
    rng = np.random.default_rng(3)
    lines = []
    for i in range(n):
        line = {'id': f'm{i}', 'tokens': rng.integers(0, 256, int(rng.integers(2, 18))).tolist()}
        if i % 3:
            line['max_tokens'] = int(i % 7)
        if i == 5:
            line.update(ignore_eos=True, stop_token_ids=[1, 2])
        lines.append(json.dumps(line))
    path.write_text('\n'.join(lines) + '\n')
    return path


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_per_request_max_tokens_mixed_in_one_file(tiny_weights, tmp_path):
    inputs = _mixed_inputs(tmp_path / 'mixed.jsonl')
    ref = _reference(tiny_weights, inputs, tmp_path / 'ref.h5', ['--max-new-tokens', 4])
    want = [json.loads(line).get('max_tokens', 4) for line in inputs.read_text().splitlines()]
    stopped = [i for i, why in enumerate(ref['finish_reason']) if why == 'stop']
    assert [len(g) for i, g in enumerate(ref['generated']) if i not in stopped] == \
        [w for i, w in enumerate(want) if i not in stopped]
    got = _engine(9, tiny_weights, inputs, tmp_path / 'run.h5',
                  ['--max-new-tokens', 4, '--max-seqs', 3])
    assert_matches_reference(got, ref, tiny_weights, inputs)


@pytest.fixture(scope='module')
def sampled_reference(tiny_weights, tiny_inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp('sampled') / 'ref.h5'
    return _reference(tiny_weights, tiny_inputs, out, ['--max-new-tokens', 6, *SAMPLED])


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('n, extra', [(9, []), (10, ['--frontends', 2]),
                                      (5, ['--placement', 'packed:2', '--micro-batches', 3])],
                         ids=['per-layer', 'two-front-ends', 'packed'])
def test_sampling_does_not_depend_on_the_layout(sampled_reference, tiny_weights, tiny_inputs,
                                                tmp_path, n, extra):
    """Temperature 0.8: the same tokens on 1 process and on every layout
    (a sequence's noise depends on its seed, id and step only)."""
    got = _engine(n, tiny_weights, tiny_inputs, tmp_path / 'run.h5',
                  ['--max-new-tokens', 6, *SAMPLED, '--max-batch-tokens', 48, *extra])
    accepted = assert_matches_reference(got, sampled_reference, tiny_weights, tiny_inputs,
                                        defaults=SamplingParams(6, temperature=0.8, seed=7))
    assert len(accepted) <= 2, accepted


def test_sampled_tokens_are_not_the_greedy_ones(sampled_reference, tiny_weights, tiny_inputs):
    """The sampling tests would prove nothing if temperature 0.8 decoded greedily."""
    with WeightFile(tiny_weights) as wf:
        model = load_reference(wf)
    seqs = read_inputs(tiny_inputs, 256)
    greedy, _ = model.generate([seqs.seq(i) for i in range(len(seqs))], 6)
    differ = sum(not np.array_equal(a, b) for a, b in zip(greedy, sampled_reference['generated']))
    assert differ >= len(greedy) // 2, differ


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_kv_block_pool_is_reused(tiny_weights, tiny_inputs, tmp_path):
    """A pool of 4 blocks (64 tokens) for 12 sequences: they take turns, each
    giving its blocks back as it ends, and still equal the reference."""
    ref = _reference(tiny_weights, tiny_inputs, tmp_path / 'ref.h5', ['--max-new-tokens', NEW])
    small = ['--max-new-tokens', NEW, '--kv-tokens', 64, '--max-batch-tokens', 32]
    alone = _reference(tiny_weights, tiny_inputs, tmp_path / 'small.h5', small)
    assert_matches_reference(alone, ref, tiny_weights, tiny_inputs)
    got = _engine(9, tiny_weights, tiny_inputs, tmp_path / 'run.h5', small)
    assert_matches_reference(got, ref, tiny_weights, tiny_inputs)


def test_a_sequence_larger_than_the_kv_cache_is_refused_before_compute(tiny_weights,
                                                                       tiny_inputs, tmp_path):
    out = tmp_path / 'o.h5'
    proc = mpiexec(1, ['reference', '--weights', tiny_weights, '--input', tiny_inputs,
                       '--output', out, '--max-new-tokens', 60, '--kv-tokens', 48,
                       '--max-batch-tokens', 32], timeout=RUN_TIMEOUT)
    assert proc.returncode == 65, proc.stderr
    assert '--kv-tokens' in proc.stderr and not out.exists(), proc.stderr
