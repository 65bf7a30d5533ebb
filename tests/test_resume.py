"""Batch-job behaviour of `mpimoe run`: resume after SIGKILL, clean stop on
SIGTERM (exit 75), refusal to resume with other inputs, progress, per-rank
logs and the timeline trace.  Every job has a timeout."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from mpirun import mpiexec, mpiexec_start, signal_job, uninterrupted_run
from mpimoe.io.lock import _read_lock
from mpimoe.io.outputs import read_outputs

N_SEQS = 120
#: sampled, so that a resumed file equal to an uninterrupted one covers the sampler too
ARGS = ['--max-new-tokens', 3, '--max-batch-tokens', 24, '--chunk-tokens', 24, '--save-logits',
        '--placement', 'packed:2', '--temperature', 0.8, '--seed', 3]


@pytest.fixture(scope='module')
def workload(tmp_path_factory, tiny_weights):
    """(weights, inputs, uninterrupted output): many small rounds on 5 ranks."""
    inputs, whole = uninterrupted_run(tmp_path_factory.mktemp('resume'), tiny_weights, ARGS,
                                      N_SEQS, max_len=12, seed=5)
    return tiny_weights, inputs, whole


def _job(weights, inputs, out):
    return ['run', '--weights', weights, '--input', inputs, '--output', out, *ARGS]


def _start(weights, inputs, out):
    """Start the 5-rank run in its own process group; Popen."""
    return mpiexec_start(5, _job(weights, inputs, out))


def _rerun(weights, inputs, out):
    """Rerun the same command to its end; CompletedProcess (must succeed)."""
    proc = mpiexec(5, _job(weights, inputs, out), timeout=240)
    assert proc.returncode == 0, proc.stderr
    return proc


def _committed(out):
    """Sequences committed so far: the end of the last chunk that OUT.chunks/manifest.json
    lists (a chunk file renamed just before the kill, not yet listed, is redone)."""
    manifest = json.loads((Path(str(out) + '.chunks') / 'manifest.json').read_text())
    return manifest['chunks'][-1]['stop']


def _assert_resumed(proc, done):
    """The rerun said it resumed after ``done`` sequences, not from the start."""
    assert 0 < done < N_SEQS
    assert f'{done} of {N_SEQS} sequences already committed' in proc.stderr, proc.stderr


def _wait_for_chunks(out, n, proc, timeout=120):
    """Wait until ``n`` chunks are committed (the job is mid-run)."""
    chunks = Path(str(out) + '.chunks')
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if chunks.is_dir() and len(list(chunks.glob('*.h5'))) >= n:
            return
        assert proc.poll() is None, 'the job ended before it could be interrupted'
        time.sleep(0.02)
    raise AssertionError('no chunk committed in time')


def _assert_same(a_path, b_path):
    a, b = read_outputs(a_path), read_outputs(b_path)
    assert a['ids'] == b['ids']
    assert all(np.array_equal(x, y) for x, y in zip(a['generated'], b['generated']))
    # same rounds, same arithmetic: bit for bit
    assert np.array_equal(a['last_logits'], b['last_logits'])


@pytest.mark.timeout(400)
def test_sigkill_of_every_process_then_rerun_resumes(workload, tmp_path):
    weights, inputs, whole = workload
    out = tmp_path / 'out.h5'
    _partial_run(weights, inputs, out, chunks=3)
    assert not out.exists()
    done = _committed(out)
    _assert_resumed(_rerun(weights, inputs, out), done)
    _assert_same(whole, out)
    assert not Path(str(out) + '.chunks').exists()


@pytest.mark.timeout(400)
def test_sigterm_stops_cleanly_with_75_and_a_rerun_finishes(workload, tmp_path):
    weights, inputs, whole = workload
    out = tmp_path / 'out.h5'
    proc = _start(weights, inputs, out)
    try:
        _wait_for_chunks(out, 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)      # as scancel / srun deliver it
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            signal_job(proc, signal.SIGKILL)
    assert proc.returncode == 75, err
    assert 'stopped cleanly on SIGTERM' in err and 'rerun the same command' in err
    done = _committed(out)
    _assert_resumed(_rerun(weights, inputs, out), done)
    _assert_same(whole, out)


def _partial_run(weights, inputs, out, chunks=1):
    """Leave a partial run behind: SIGKILL of every process once ``chunks``
    chunks are committed."""
    proc = _start(weights, inputs, out)
    try:
        _wait_for_chunks(out, chunks, proc)
    finally:
        signal_job(proc, signal.SIGKILL)
        proc.communicate(timeout=30)


@pytest.mark.timeout(400)
def test_rerun_with_other_input_weights_or_options_is_refused(workload, tmp_path,
                                                               make_weights):
    weights, inputs, _ = workload
    out = tmp_path / 'out.h5'
    _partial_run(weights, inputs, out)
    chunks = Path(str(out) + '.chunks')
    before = {p.name: p.read_bytes() for p in chunks.iterdir()}
    other_inputs = tmp_path / 'other.jsonl'
    shutil.copy(inputs, other_inputs)
    with open(other_inputs, 'a') as f:
        f.write('{"id": "extra", "tokens": [1, 2, 3]}\n')
    cases = [
        (['--input', other_inputs, '--weights', weights], 'input_sha256'),
        (['--input', inputs, '--weights', make_weights('tiny', (), seed=1)], 'weights_sha256'),
        (['--input', inputs, '--weights', weights, '--max-new-tokens', 4], 'max_new_tokens'),
        (['--input', inputs, '--weights', weights, '--temperature', 0.5], 'temperature'),
        (['--input', inputs, '--weights', weights, '--max-seqs', 3], 'max_seqs'),
    ]
    for args, what in cases:
        proc = mpiexec(5, ['run', '--output', out, *ARGS, *args], timeout=120)
        assert proc.returncode == 65, proc.stderr
        assert 'holds a partial run that differs' in proc.stderr and what in proc.stderr
        assert '--overwrite' in proc.stderr
    assert {p.name: p.read_bytes() for p in chunks.iterdir()} == before


@pytest.mark.timeout(300)
def test_progress_logs_and_trace(tiny_weights, tiny_inputs, tmp_path):
    proc = mpiexec(9, ['run', '--weights', tiny_weights, '--input', tiny_inputs,
                       '--output', tmp_path / 'o.h5', '--max-new-tokens', 2,
                       '--trace', tmp_path / 'trace', '--log-dir', tmp_path / 'logs',
                       '--progress-every', 0.01], timeout=120)
    assert proc.returncode == 0, proc.stderr
    # rank 0 alone talks; progress as plain lines (stderr is not a terminal)
    assert 'mpimoe: 12/12 sequences (100.0%)' in proc.stderr
    assert all(line.startswith(('mpimoe[0]:', 'mpimoe: ')) for line in
               proc.stderr.splitlines()), proc.stderr
    assert sorted(p.name for p in (tmp_path / 'logs').iterdir()) == \
        [f'rank-{r:05d}.log' for r in range(9)]
    assert 'experts' in (tmp_path / 'logs' / 'rank-00003.log').read_text()
    events = json.loads((tmp_path / 'trace' / 'trace.json').read_text())['traceEvents']
    spans = [e for e in events if e['ph'] == 'X']
    assert {e['pid'] for e in spans} == set(range(9))
    front = {e['name'] for e in spans if e['pid'] == 0}
    assert {'attention', 'route', 'permute', 'dispatch', 'combine', 'unpermute'} <= front
    assert {'expert', 'dispatch', 'combine'} <= {e['name'] for e in spans if e['pid'] == 4}
    assert all(e['dur'] >= 0 and 'mb' in e['args'] for e in spans if e['name'] == 'expert')


@pytest.mark.timeout(400)
def test_rerun_refuses_a_damaged_chunk_and_a_second_job_on_the_same_output(workload, tmp_path):
    weights, inputs, whole = workload
    out = tmp_path / 'out.h5'
    _partial_run(weights, inputs, out, chunks=2)
    chunk = min(Path(str(out) + '.chunks').glob('*.h5'))        # the first one
    stop = int(chunk.stem.split('-')[1])
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-1] + bytes([good[-1] ^ 0x10]))
    proc = mpiexec(5, _job(weights, inputs, out), timeout=120)
    assert proc.returncode == 65, proc.stderr
    assert f'{chunk} (sequences 0-{stop}): contents differ from the sha256' in proc.stderr
    assert 'Traceback' not in proc.stderr
    chunk.write_bytes(good)
    first = _start(weights, inputs, out)
    try:
        # every process paused as soon as the lock names its holder (taken before
        # the weights load), so that it is alive, not finished, while the second
        # job starts
        lock = Path(str(out) + '.lock')
        t0 = time.monotonic()
        while _read_lock(lock)[0] is None:
            assert first.poll() is None and time.monotonic() - t0 < 120, 'no lock taken'
            time.sleep(0.005)
        signal_job(first, signal.SIGSTOP)
        assert not out.exists()
        second = mpiexec(5, [*_job(weights, inputs, out), '--overwrite'], timeout=120)
        signal_job(first, signal.SIGCONT)
        assert second.returncode == 65, second.stderr
        assert f'{out} is being written by another job (pid ' in second.stderr
        _, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            signal_job(first, signal.SIGKILL)
    assert first.returncode == 0, err
    assert 'sequences already committed' in err                       # it resumed
    _assert_same(whole, out)
