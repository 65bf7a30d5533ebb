"""`mpimoe run` (the distributed engine, real MPI) equals `mpimoe reference`.

Every case runs the engine under mpiexec on a tiny model and compares its
output file with the single-process reference of the same weights and inputs
(tests/contract.py's assert_matches_reference): the same ids in input order,
greedy tokens equal except where a near-tie of the two top logits lets either
evaluation pick either token, last_logits within LOGIT_RTOL (relative L2).

Why not exact.  Both paths do FP32 arithmetic on the same BF16 weights and
round to BF16 at the same points (the rows entering an expert, its hidden
activations, its output: mpimoe.model.layers.expert_ffn), and they sum the top-k expert
outputs in the same slot order (mpimoe.moe.experts.unpermute).  What differs is the shape
of the GEMMs -- how many rows one call multiplies (a round's batch, a
micro-batch, one expert's block) -- and BLAS then sums the dot products in
another order, differently on every CPU kernel.  That moves an FP32 result by
a few ulps, and where it carries a BF16 rounding across its midpoint it moves
that value by a BF16 ulp; tests/contract.py argues the bounds.  A bug moves
the logits by O(1).
"""

import json
import shutil
import zlib

import h5py
import numpy as np
import pytest

from contract import assert_matches_reference
from mpirun import mpiexec
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.io.inputs import read_inputs
from mpimoe.io.outputs import read_outputs

#: the reference generates this many tokens; a run may ask for fewer
REF_NEW_TOKENS = 6
#: seconds one tiny mpiexec run may take on an oversubscribed 2-core machine
RUN_TIMEOUT = 90

#: weight files by name: (preset, --set overrides)
WEIGHTS = {
    'swiglu': ('tiny', ()),
    'mlp': ('tiny', ('expert_kind=mlp',)),
    'top3': ('tiny', ('top_k=3',)),
}

#: (name, weights, world size, extra options, max new tokens)
CASES = [
    ('per-layer-M1', 'swiglu', 9, ['--micro-batches', '1'], 6),
    ('per-layer-M2', 'swiglu', 9, ['--micro-batches', '2'], 6),
    # tiny_inputs in batches of <= 24 tokens: 7 batches of 1-5 sequences, so
    # most passes have empty micro-batches
    ('per-layer-M4-small-batches', 'swiglu', 9,
     ['--micro-batches', '4', '--batch-tokens', '24'], 6),
    # several rounds with idle front-ends in the last: 7 batches on 2
    # front-ends, 4 batches (<= 40 tokens) on 3
    ('F2-rounds', 'swiglu', 10, ['--frontends', '2', '--batch-tokens', '24'], 6),
    ('F3-rounds', 'swiglu', 11, ['--frontends', '3', '--batch-tokens', '40'], 6),
    ('packed2', 'swiglu', 5, ['--placement', 'packed:2'], 6),
    ('packed4', 'swiglu', 3, ['--placement', 'packed:4'], 6),
    ('dedicated', 'swiglu', 25, ['--placement', 'dedicated'], 6),
    ('mlp', 'mlp', 9, [], 6),
    ('top3-packed2', 'top3', 5, ['--placement', 'packed:2', '--batch-tokens', '40'], 6),
    ('prefill-only', 'swiglu', 9, ['--batch-tokens', '40'], 0),
]


@pytest.fixture(scope='module')
def skewed_weights(tiny_weights, tmp_path_factory):
    """tiny with every router's columns of experts 4..7 set to zero.

    Those experts then score exactly 0 for every token and tie; route() breaks
    ties by the lower expert id, so experts 6 and 7 are never in a top 2 and
    expert 5 only when all of experts 0..3 score below 0.
    """
    path = tmp_path_factory.mktemp('skewed') / 'skewed.h5'
    shutil.copyfile(tiny_weights, path)
    with WeightFile(str(path)) as wf:
        layers = wf.config.moe_layers
    with h5py.File(path, 'r+') as f:
        for i in layers:
            ds = f[f'layers/{i}/router']                 # uint16 [d, E], BF16 words
            ds[:, 4:] = 0                                # BF16 +0.0
            ds.attrs['crc32'] = zlib.crc32(np.ascontiguousarray(ds[()], '<u2').tobytes())
    return str(path)


@pytest.fixture(scope='module')
def files(make_weights, skewed_weights, tiny_reference):
    """``files(name) -> (weights, reference outputs)``; the reference is run once
    per weight file, with REF_NEW_TOKENS new tokens and the logits saved."""
    def get(name):
        weights = skewed_weights if name == 'skewed' else make_weights(*WEIGHTS[name])
        return weights, tiny_reference(weights, REF_NEW_TOKENS)
    return get


def _run(weights, inputs, out_dir, n, extra, max_new):
    """Run the engine; (outputs dict, run.json dict)."""
    out, metrics = out_dir / 'out.h5', out_dir / 'run.json'
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', max_new, '--save-logits', '--metrics', metrics,
                       *extra], timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out), json.loads(metrics.read_text())


def _expected_copies(inputs, weights, max_new):
    """Token copies each MoE layer routes: (prompt + decode tokens) * top_k."""
    with WeightFile(weights) as wf:
        cfg = wf.config
    prompts = read_inputs(inputs, cfg.vocab_size)
    decode = len(prompts) * max(max_new - 1, 0)
    return (int(prompts.lengths.sum()) + decode) * cfg.top_k


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('name, kind, n, extra, max_new', CASES, ids=[c[0] for c in CASES])
def test_engine_equals_reference(files, tiny_inputs, tmp_path, name, kind, n, extra, max_new):
    weights, ref = files(kind)
    got, report = _run(weights, tiny_inputs, tmp_path, n, extra, max_new)
    assert_matches_reference(got, ref, weights, tiny_inputs, max_new)
    loads = np.array(report['expert_loads']['counts'])              # [Lm, E]
    assert loads.sum(axis=1).tolist() == \
        [_expected_copies(tiny_inputs, weights, max_new)] * len(loads)
    assert report['placement']['world_size'] == n


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_idle_experts(files, tiny_inputs, tmp_path):
    """Experts that receive no rows in a step (zero counts in the all-to-alls)
    still leave the output equal to the reference."""
    weights, ref = files('skewed')
    got, report = _run(weights, tiny_inputs, tmp_path, 9, ['--batch-tokens', '40'], 4)
    loads = np.array(report['expert_loads']['counts'])              # [Lm, E]
    assert (loads[:, 6:] == 0).all() and (loads[:, :5] > 0).all(), loads.tolist()
    assert_matches_reference(got, ref, weights, tiny_inputs, 4)


@pytest.mark.timeout(2 * RUN_TIMEOUT)
def test_run_json(files, tiny_inputs, tmp_path):
    """run.json: throughput, latency, loads, bytes, per-rank times, versions, placement."""
    weights, _ = files('swiglu')
    _, report = _run(weights, tiny_inputs, tmp_path, 10,
                     ['--frontends', '2', '--batch-tokens', '40'], 3)
    s = report['summary']
    assert s['prefill_tokens_per_s'] > 0 and s['decode_tokens_per_s'] > 0
    assert s['time_per_output_token_ms'] > 0 and s['wall_s'] > 0
    # MFU against rank 0's timed GEMM rate on every rank (the CPU backend)
    assert s['mfu_devices'] == 10
    assert s['mfu'] == pytest.approx(s['achieved_tflops'] / (s['peak_tflops_per_rank'] * 10))
    loads = np.array(report['expert_loads']['counts'])              # [Lm, E]
    assert report['expert_loads']['layers'] == [1, 2, 3]
    assert loads.shape == (3, 8)
    assert loads.sum(axis=1).tolist() == [_expected_copies(tiny_inputs, weights, 3)] * 3
    # every copy travels out and back as d_model 16-bit words
    row_bytes = 2 * report['config']['d_model']
    assert report['bytes_per_layer'] == (2 * row_bytes * loads.sum(axis=1)).tolist()
    ranks = report['ranks']
    assert [r['rank'] for r in ranks] == list(range(10))
    assert [r['role'] for r in ranks] == ['front-end'] * 2 + ['expert'] * 8
    for r in ranks:
        assert all(r['category_s'][c] >= 0 for c in ('compute', 'wait', 'pack')), r
    assert {'mpi', 'mpi4py', 'numpy', 'python'} <= set(report['versions'])
    assert report['mpimoe_version']
    p = report['placement']
    assert (p['mode'], p['world_size'], p['frontends'], p['expert_ranks']) == \
        ('per-layer', 10, 2, 8)
    assert len(p['hash']) == 16
