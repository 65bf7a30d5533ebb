"""Failures end the whole `mpimoe run` job, quickly, saying where and why.

Each test starts a real job under mpiexec that fails on purpose: an exception
on a front-end or an expert rank (the MPIMOE_FAULT test hook), a rank that
hangs, a corrupted or missing weight file, a world size that does not fit the
placement, an existing output, a token out of the vocabulary.  The job must
exit non-zero well within the subprocess timeout (no hung ranks), print no
traceback for a user's mistake, and name the rank, stage, tensor or sequence.
"""

import re
import shutil
import time

import h5py
import pytest

from mpirun import error_lines, mpiexec
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.planning.placement import make_plan

#: seconds mpiexec may run before the test kills the job
TIMEOUT = 60
#: a failing job must be over well before this (healthy tiny runs take ~2 s)
FAIL_WITHIN = 30
#: 1 front-end (rank 0) + 4 expert ranks, two experts each: rank 3 hosts
#: experts 4-5, rank 4 experts 6-7 of every MoE layer
RANKS, PLACEMENT = 5, 'packed:2'


def _run(weights, inputs, out, n=RANKS, extra=(), env=None):
    """Run the engine, which must fail; (CompletedProcess, seconds)."""
    t0 = time.monotonic()
    proc = mpiexec(n, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--max-new-tokens', 2, *extra], timeout=TIMEOUT, env=env)
    seconds = time.monotonic() - t0
    assert proc.returncode != 0, proc.stderr
    assert seconds < FAIL_WITHIN, f'{seconds:.1f} s\n{proc.stderr}'
    return proc, seconds




@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize('stage, rank', [('attention', 0), ('expert', 3)])
def test_exception_on_one_rank_ends_job(tiny_weights, tiny_inputs, tmp_path, stage, rank):
    out = tmp_path / 'out.h5'
    proc, _ = _run(tiny_weights, tiny_inputs, out, extra=['--placement', PLACEMENT],
                   env={'MPIMOE_FAULT': f'{stage}:{rank}'})
    assert proc.returncode == 70
    assert re.search(rf'mpimoe: internal error \(rank {rank}, stage {stage}\b.*injected fault',
                     proc.stderr), proc.stderr
    assert not out.exists()


@pytest.mark.timeout(TIMEOUT + 30)
def test_hung_rank_hits_deadline(tiny_weights, tiny_inputs, tmp_path):
    """A rank that never answers: the others give up after --deadline seconds
    and say what they were waiting for, with the rows per peer rank."""
    proc, _ = _run(tiny_weights, tiny_inputs, tmp_path / 'out.h5',
                   extra=['--placement', PLACEMENT, '--deadline', 3],
                   env={'MPIMOE_FAULT': 'hang:4'})
    timeouts = [line for line in error_lines(proc.stderr)
                if re.search(r'\(rank \d+, stage \w+.*\): no progress for 3 s waiting for', line)]
    assert timeouts, proc.stderr
    # e.g. "... waiting for rows back from layer ranks {1: 7, 2: 12, 3: 9, 4: 8}"
    assert any(re.search(r'\{\d+: \d+(, \d+: \d+)*\}', line) for line in timeouts), timeouts


@pytest.mark.timeout(TIMEOUT + 30)
def test_corrupted_expert_names_rank_and_tensor(tiny_weights, tiny_inputs, tmp_path):
    bad = tmp_path / 'corrupt.h5'
    shutil.copyfile(tiny_weights, bad)
    layer, expert, name = 2, 5, 'layers/2/experts/5/up'
    with h5py.File(bad, 'r') as f:
        ds = f[name]
        middle = ds.id.get_offset() + ds.id.get_storage_size() // 2
    with open(bad, 'r+b') as f:
        f.seek(middle)
        data = f.read(8)
        f.seek(middle)
        f.write(bytes(b ^ 0xFF for b in data))
    with WeightFile(str(bad)) as wf:
        cfg = wf.config
    host = int(make_plan(cfg, RANKS, PLACEMENT).owner[layer - cfg.n_dense_layers, expert])
    proc, _ = _run(str(bad), tiny_inputs, tmp_path / 'out.h5', extra=['--placement', PLACEMENT])
    assert proc.returncode == 65
    assert 'Traceback' not in proc.stderr
    assert error_lines(proc.stderr) == [
        f'mpimoe: error (rank {host}, stage load): {bad}: tensor {name}: checksum mismatch '
        '(file corrupted?); rewrite it'], proc.stderr


@pytest.mark.timeout(TIMEOUT + 30)
def test_missing_weights(tiny_inputs, tmp_path):
    missing = tmp_path / 'nope.h5'
    proc, _ = _run(missing, tiny_inputs, tmp_path / 'out.h5')
    assert proc.returncode == 65
    assert 'Traceback' not in proc.stderr
    lines = error_lines(proc.stderr)
    assert lines and all(f'{missing}: no such file' in line for line in lines), proc.stderr
    ranks = [re.match(r'mpimoe: error \(rank (\d+)\b', line).group(1) for line in lines]
    assert len(ranks) == len(set(ranks)) <= RANKS


@pytest.mark.timeout(TIMEOUT + 30)
def test_world_size_that_does_not_fit(tiny_weights, tiny_inputs, tmp_path):
    """dedicated needs 24 expert ranks: said once, by rank 0, with the sizes that fit."""
    proc, _ = _run(tiny_weights, tiny_inputs, tmp_path / 'out.h5', n=9,
                   extra=['--placement', 'dedicated'])
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == [
        'mpimoe: error: placement dedicated needs 24 expert ranks + F front-ends: '
        'world size must be >= 25 (got 9)'], proc.stderr


@pytest.mark.timeout(TIMEOUT + 30)
def test_existing_output_is_kept(tiny_weights, tiny_inputs, tmp_path):
    out = tmp_path / 'out.h5'
    out.write_bytes(b'results of an earlier run')
    proc, _ = _run(tiny_weights, tiny_inputs, out, extra=['--placement', PLACEMENT])
    assert proc.returncode == 65
    assert error_lines(proc.stderr) == [
        f'mpimoe: error (rank 0, stage open): {out} exists; pass --overwrite to replace it'], \
        proc.stderr
    assert out.read_bytes() == b'results of an earlier run'


@pytest.mark.timeout(TIMEOUT + 30)
def test_token_out_of_vocabulary(tiny_weights, tmp_path):
    inputs = tmp_path / 'in.jsonl'
    inputs.write_text('{"id": "ok", "tokens": [1, 2, 3]}\n'
                      '{"id": "bad-seq", "tokens": [4, 256]}\n')
    out = tmp_path / 'out.h5'
    proc, _ = _run(tiny_weights, inputs, out, extra=['--placement', PLACEMENT])
    assert proc.returncode == 65
    assert 'Traceback' not in proc.stderr
    lines = error_lines(proc.stderr)
    assert lines and all("id 'bad-seq': token 256 at tokens[1]" in line for line in lines), \
        proc.stderr
    assert not out.exists()
