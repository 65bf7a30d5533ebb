"""`mpimoe run --tp T` (tensor-parallel front-end groups) against the
single-process reference, under mpiexec.

A group of T ranks splits the heads, the dense and shared MLPs and the
vocabulary (mpimoe.model.tp_frontend): the same FP32 arithmetic as one
front-end with the sums over heads and hidden columns cut into T partial
sums, which the Allreduce adds in another order.  That is a change of FP32
summation order, as between two batchings, so tests/contract.py's bounds
(LOGIT_RTOL per row, greedy divergence only after a near-tie) hold as they
do in tests/test_engine.py; a wrong slice or a token routed twice moves the
logits by O(1).
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest

from contract import assert_matches_reference
from mpirun import error_lines, mpiexec, mpiexec_start, signal_job
from mpimoe.io.inputs import read_inputs
from mpimoe.io.outputs import read_outputs
from mpimoe.model.reference import run_reference
from mpimoe.runtime.options import JobOptions

RUN_TIMEOUT = 120
MAX_NEW = 5

MLA = ['attention.kind=mla', 'attention.kv_lora_rank=16', 'attention.qk_nope_head_dim=8',
       'attention.qk_rope_head_dim=8', 'attention.v_head_dim=12', 'attention.q_lora_rank=24',
       'n_kv_heads=4']
#: weight files by name: --set overrides of tiny (4 heads, 2 KV heads, vocabulary 256)
WEIGHTS = {
    'tiny': (),
    # Qwen2-MoE's parts: q/k/v biases, a gated shared expert
    'biases-shared': ('attention.qkv_bias=true', 'shared.n_experts=1', 'shared.d_expert=64',
                      'shared.gate=true'),
    'mha': ('n_kv_heads=4',),                    # 4 KV heads: T = 4 fits
    'mla-shared': (*MLA, 'shared.n_experts=1', 'shared.d_expert=32'),
    # OLMoE's QK-norm over all heads: the group sums the squares
    'qk-norm-full': ('attention.qk_norm=full',),
}

#: (name, weights, world size, options)
CASES = [
    ('tp2-per-layer-M2', 'tiny', 10, ['--tp', '2', '--micro-batches', '2']),
    # 2 groups over several rounds (an idle group in the last), small micro-batches
    ('tp2-F2-packed4-rounds', 'biases-shared', 6, ['--tp', '2', '--frontends', '2',
                                                    '--placement', 'packed:4',
                                                    '--batch-tokens', '24']),
    ('tp4-F2-packed4-M3', 'mha', 10, ['--tp', '4', '--frontends', '2',
                                      '--placement', 'packed:4', '--micro-batches', '3']),
    ('tp2-mla-packed4', 'mla-shared', 4, ['--tp', '2', '--placement', 'packed:4']),
    ('tp2-qk-norm-full-packed4', 'qk-norm-full', 4, ['--tp', '2', '--placement', 'packed:4']),
]


@pytest.fixture(scope='module')
def files(make_weights, tiny_reference):
    """``files(key) -> (weights, CPU reference outputs)``."""
    def get(key):
        weights = make_weights('tiny', WEIGHTS[key])
        return weights, tiny_reference(weights, MAX_NEW)
    return get


def _args(weights, inputs, out, extra):
    return ['run', '--weights', weights, '--input', inputs, '--output', out,
            '--max-new-tokens', MAX_NEW, '--save-logits', *extra]


@pytest.mark.timeout(2 * RUN_TIMEOUT)
@pytest.mark.parametrize('name, kind, n, extra', CASES, ids=[c[0] for c in CASES])
def test_tp_engine_equals_reference(files, tiny_inputs, tmp_path, name, kind, n, extra):
    weights, ref = files(kind)
    out, metrics = tmp_path / 'out.h5', tmp_path / 'run.json'
    proc = mpiexec(n, _args(weights, tiny_inputs, out, [*extra, '--metrics', metrics]),
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(read_outputs(out), ref, weights, tiny_inputs)
    report = json.loads(metrics.read_text())
    tp = int(extra[extra.index('--tp') + 1])
    fronts = [r for r in report['ranks'] if r['role'] == 'front-end']
    assert report['placement']['frontends'] == len(fronts) and len(fronts) % tp == 0
    # every token copy routed once: each group's ranks route disjoint shares
    loads = report['expert_loads']['counts']
    assert len({sum(row) for row in loads}) == 1
    # prompt tokens counted once per group, not once per rank
    assert report['summary']['prefill_tokens'] == int(read_inputs(tiny_inputs, 256).lengths.sum())


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize('tp, n', [(2, 6), (4, 10)])
def test_a_group_with_no_sequence_passes_over_none(files, tmp_path, tp, n):
    """One sequence for 2 groups: the second is idle from the start, every
    step a pass over zero rows (its logits gather [0, V]), and the output is
    the reference's."""
    from mpimoe.io.inputs import write_synthetic_inputs
    weights, _ = files('mha')
    inputs, out, ref_out = tmp_path / 'one.jsonl', tmp_path / 'out.h5', tmp_path / 'ref.h5'
    write_synthetic_inputs(inputs, 256, num_seqs=1, min_len=3, max_len=3, seed=4)
    run_reference(JobOptions(weights=weights, input=str(inputs), output=str(ref_out),
                             max_new_tokens=MAX_NEW, save_logits=True), log=lambda *a: None)
    proc = mpiexec(n, _args(weights, inputs, out, ['--tp', tp, '--frontends', 2,
                                                   '--placement', 'packed:4']),
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert_matches_reference(read_outputs(out), read_outputs(ref_out), weights, inputs)


@pytest.mark.timeout(RUN_TIMEOUT)
@pytest.mark.parametrize('kind, n, extra, message', [
    ('tiny', 4, ['--tp', '3'], '--tp 3 must divide n_heads=4, n_kv_heads=2, vocab_size=256, '
                                'd_dense=128 (the front-end group splits them); --tp that '
                                'fit: 1, 2'),
    ('tiny', 9, ['--tp', '2'], 'placement per-layer needs 8 expert ranks + F front-ends of 2 '
                                'ranks (F x 2 front-end ranks): world size must be >= 10 and '
                                'exceed an expert-rank count by a multiple of 2 (got 9)'),
])
def test_tp_that_does_not_fit_is_one_line_from_rank_0(files, tiny_inputs, tmp_path, kind, n,
                                                       extra, message):
    weights, _ = files(kind)
    proc = mpiexec(n, _args(weights, tiny_inputs, tmp_path / 'out.h5', extra),
                   timeout=RUN_TIMEOUT)
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [f'mpimoe: error: {message}'], proc.stderr
    assert not (tmp_path / 'out.h5').exists()


@pytest.mark.timeout(3 * RUN_TIMEOUT)
def test_a_run_stopped_without_tp_resumes_with_tp(files, tmp_path):
    """SIGTERM after the first committed chunks of a 5-rank run (packed:2, one
    front-end), then the same command with --tp 2 on 6 ranks: the rerun
    resumes where the first stopped (one front-end group: the same chunks),
    and the whole output matches the reference."""
    from mpimoe.io.inputs import write_synthetic_inputs
    weights, _ = files('tiny')
    inputs = tmp_path / 'in.jsonl'
    write_synthetic_inputs(inputs, 256, num_seqs=60, min_len=2, max_len=12, seed=9)
    ref_out = tmp_path / 'ref.h5'
    run_reference(JobOptions(weights=weights, input=str(inputs), output=str(ref_out),
                             max_new_tokens=3, save_logits=True), log=lambda *a: None)
    out = tmp_path / 'out.h5'
    opts = ['--max-new-tokens', 3, '--max-batch-tokens', 24, '--chunk-tokens', 24,
            '--save-logits', '--placement', 'packed:2']
    job = ['run', '--weights', weights, '--input', inputs, '--output', out, *opts]
    proc = mpiexec_start(5, job)
    try:
        chunks = Path(str(out) + '.chunks')
        t0 = time.monotonic()
        while not (chunks.is_dir() and len(list(chunks.glob('*.h5'))) >= 2):
            assert proc.poll() is None and time.monotonic() - t0 < 100, 'no chunk in time'
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            signal_job(proc, signal.SIGKILL)
    assert proc.returncode == 75
    done = json.loads((chunks / 'manifest.json').read_text())['chunks'][-1]['stop']
    rerun = mpiexec(6, [*job, '--tp', '2'], timeout=RUN_TIMEOUT)
    assert rerun.returncode == 0, rerun.stderr
    assert f'{done} of 60 sequences already committed' in rerun.stderr
    assert_matches_reference(read_outputs(out), read_outputs(ref_out), weights, inputs)


@pytest.mark.timeout(RUN_TIMEOUT)
def test_overlapped_group_sums_compute_what_in_place_ones_do():
    """benchmarks/tp_overlap.py on a group of 2, tiny with a gated shared
    expert: passes whose dense and shared sums are posted and waited for
    after the next micro-batch's work (one of the three micro-batches
    empty) give the logits of sums waited for in place, bit for bit: the
    same FP32 operations in another order of micro-batches."""
    script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'tp_overlap.py'
    shared = [a for o in WEIGHTS['biases-shared'] for a in ('--set', o)]
    proc = mpiexec(2, ['--preset', 'tiny', *shared, '--tokens', '64', '--seqs', '2',
                       '--micro-batches', '3', '--repeats', '5'], timeout=RUN_TIMEOUT,
                   program=[script])
    assert proc.returncode == 0, proc.stderr
    assert 'logits bit-identical: yes' in proc.stdout, proc.stdout
