"""Data safety of outputs (mpimoe/io/): the lock on an output, chunk checksums
verified on resume and at assembly, the kill windows of a run, stray and
malformed files in ``OUT.chunks/``, paths checked before compute, and OS errors
(disk full) as one line with exit code 74.

Real files throughout; kills are real SIGKILLs of a child process (its
``KILL_AT`` names the moment: the child kills itself when the writer reaches
it), concurrent jobs are real processes, a full disk is /dev/full or a small
tmpfs (mounted only where the tests run as root).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpirun import error_lines, mpiexec
from mpimoe.errors import DataError, IOFailure, UsageError
from mpimoe.io.outputs import OutputWriter, read_outputs
from mpimoe.io.files import atomic_write, check_writable, os_errors, write_json

REPO = Path(__file__).resolve().parents[1]
N, VOCAB = 6, 16
IDENT = {'input_sha256': 'abc', 'max_new_tokens': 3}
#: the chunks of a whole run: sequences [0, 2), [2, 4), [4, 6)
RANGES = ((0, 2), (2, 4), (4, 6))


def results(n=N):
    """Deterministic (ids, generated, logits) of ``n`` sequences."""
    rng = np.random.default_rng(7)
    ids = [f's{i}' for i in range(n)]
    gen = [rng.integers(0, VOCAB, size=3, dtype=np.int32) for _ in range(n)]
    return ids, gen, rng.standard_normal((n, VOCAB), dtype=np.float32)


def writer(out, overwrite=False):
    return OutputWriter(out, N, VOCAB, True, {}, IDENT, overwrite=overwrite)


#: how each of the N sequences ended, and its prompt length
REASONS, PROMPTS = ['stop', 'length'] * (N // 2), np.arange(1, N + 1)


def write(w, lo, hi):
    ids, gen, logits = results()
    w.write(np.arange(lo, hi), ids[lo:hi], gen[lo:hi], logits[lo:hi],
            finish_reasons=REASONS[lo:hi], prompt_tokens=PROMPTS[lo:hi])


def partial(out, chunks=2):
    """Leave ``chunks`` committed chunks of a run that failed."""
    with pytest.raises(KeyboardInterrupt):
        with writer(out) as w:
            for lo, hi in RANGES[:chunks]:
                write(w, lo, hi)
            raise KeyboardInterrupt
    return Path(str(out) + '.chunks')


def assert_complete(out):
    ids, gen, logits = results()
    got = read_outputs(out)
    assert got['ids'] == ids
    assert all(np.array_equal(a, b) for a, b in zip(got['generated'], gen))
    assert np.array_equal(got['last_logits'], logits)
    assert got['finish_reason'] == REASONS and got['prompt_tokens'].tolist() == PROMPTS.tolist()
    assert got['completion_tokens'].tolist() == [g.size for g in gen]
    assert not Path(str(out) + '.chunks').exists() and not Path(str(out) + '.lock').exists()


def finish(out):
    """Resume the run of ``out`` to its end."""
    with writer(out) as w:
        for lo, hi in RANGES:
            if lo >= w.written:
                write(w, lo, hi)
    assert_complete(out)


# --- a child process that writes an output, and maybe dies -----------------

CHILD = '''
import os, signal, sys
import mpimoe.io.outputs
from test_output_safety import RANGES, write, writer
out, kill_at = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if kill_at == 'mkdir':              # the chunk directory exists, its manifest not yet
    mkdir = os.mkdir
    os.mkdir = lambda *a: (mkdir(*a), die())
elif kill_at == 'rmtree':           # OUT renamed, the chunk directory not yet removed
    mpimoe.io.outputs.shutil.rmtree = die
elif kill_at == 'manifest':         # the second chunk renamed, not yet in the manifest
    digest = mpimoe.io.outputs.file_digest
    mpimoe.io.outputs.file_digest = lambda p: die() if p.endswith('000000000004.h5') else digest(p)
with writer(out) as w:
    write(w, *RANGES[0])
    if kill_at == 'hold':           # hold the lock until told to go on
        print('ready', flush=True)
        sys.stdin.readline()
    for lo, hi in RANGES[1:]:
        write(w, lo, hi)
'''


def child(out, kill_at):
    """Start the child writing ``out``; Popen (text pipes)."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(REPO), str(REPO / 'tests'), os.environ.get('PYTHONPATH', '')])}
    return subprocess.Popen([sys.executable, '-c', CHILD, str(out), kill_at], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def killed_child(out, kill_at):
    """Run the child until it SIGKILLs itself at ``kill_at``."""
    proc = child(out, kill_at)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err


def holding_child(out):
    """A child that holds the lock of ``out`` (one chunk committed); Popen."""
    proc = child(out, 'hold')
    assert proc.stdout.readline() == 'ready\n', proc.stderr.read()
    return proc


def _mpimoe(*args):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(REPO), os.environ.get('PYTHONPATH', '')])}
    return subprocess.run([sys.executable, '-m', 'mpimoe', *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def one_error_line(proc, code):
    """The single ``mpimoe: error`` line of a command that had to fail with ``code``."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code and len(lines) == 1, proc.stderr
    assert lines[0].startswith('mpimoe: error: ') and 'Traceback' not in proc.stderr
    return lines[0]


# --- the lock ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_second_job_on_the_same_output_refuses_naming_the_holder(tmp_path, tiny_weights,
                                                                    tiny_inputs,
                                                                    make_weights):
    out = tmp_path / 'out.h5'
    holder = holding_child(out)
    try:
        chunks = Path(str(out) + '.chunks')
        before = {p.name: p.read_bytes() for p in chunks.iterdir()}
        who = f'pid {holder.pid} on host {socket.gethostname()}'
        with pytest.raises(DataError, match=f'{out} is being written by another job \\({who}'):
            writer(out)
        # another command, other weights, even --overwrite: refused, nothing touched
        for extra in ([], ['--overwrite']):
            proc = _mpimoe('reference', '--weights', make_weights('tiny', (), seed=1),
                           '--input', tiny_inputs, '--output', out, *extra)
            assert who in one_error_line(proc, 65)
        assert {p.name: p.read_bytes() for p in chunks.iterdir()} == before
    finally:
        holder.communicate('go\n', timeout=60)
    assert holder.returncode == 0, holder.stderr
    assert_complete(out)


@pytest.mark.timeout(120)
def test_the_lock_of_a_killed_job_is_taken_over(tmp_path):
    out = tmp_path / 'out.h5'
    holder = holding_child(out)
    holder.kill()
    holder.communicate(timeout=30)
    lock = Path(str(out) + '.lock')
    assert json.loads(lock.read_text())['pid'] == holder.pid    # left behind
    with writer(out) as w:
        assert w.written == 2
        assert json.loads(lock.read_text())['pid'] == os.getpid()
        for lo, hi in RANGES[1:]:
            write(w, lo, hi)
    assert_complete(out)


def test_the_lock_of_another_host_is_never_broken(tmp_path):
    out = tmp_path / 'out.h5'
    lock = Path(str(out) + '.lock')
    lock.write_text(json.dumps({'host': 'node-17', 'pid': 4242, 'started': 'then'}))
    with pytest.raises(DataError, match=f'pid 4242 on host node-17.*if that job is dead.*'
                                        f'remove {lock}'):
        writer(out)
    assert json.loads(lock.read_text())['host'] == 'node-17'
    assert not Path(str(out) + '.chunks').exists()


def test_a_reused_pid_and_a_requeued_slurm_job_count_as_stale(tmp_path, monkeypatch):
    out = tmp_path / 'out.h5'
    lock = Path(str(out) + '.lock')
    here = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': 'then'}
    # this very process is alive: the lock holds unless its start time differs
    lock.write_text(json.dumps({**here, 'proc_start': 1}))
    writer(out).close()
    assert not lock.exists()
    monkeypatch.setenv('SLURM_JOB_ID', '991')
    monkeypatch.setenv('SLURM_RESTART_COUNT', '2')
    lock.write_text(json.dumps({'host': 'node-17', 'pid': 1, 'slurm_job': '991',
                                'slurm_restart': 1}))
    writer(out).close()
    lock.write_text(json.dumps({'host': 'node-17', 'pid': 1, 'slurm_job': '991',
                                'slurm_restart': 2}))      # the same run: alive
    with pytest.raises(DataError, match='pid 1 on host node-17'):
        writer(out)


def test_a_takeover_in_progress_is_not_joined(tmp_path):
    out = tmp_path / 'out.h5'
    lock = Path(str(out) + '.lock')
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True)
    stale = {'host': socket.gethostname(), 'pid': int(dead.stdout), 'started': 'then'}
    lock.write_text(json.dumps(stale))
    Path(str(lock) + '.break').write_text('')
    with pytest.raises(DataError, match=f'{lock}.break exists: another job is taking over'):
        writer(out)
    assert json.loads(lock.read_text()) == stale
    os.remove(str(lock) + '.break')
    writer(out).close()                 # now it is taken over, and released
    assert not lock.exists()


def test_the_lock_is_released_on_every_way_out(tmp_path):
    out = tmp_path / 'out.h5'
    lock = Path(str(out) + '.lock')
    partial(out)                                        # an exception
    assert not lock.exists()
    with pytest.raises(DataError, match='max_new_tokens 3 then, 4 now'):
        OutputWriter(out, N, VOCAB, True, {}, {**IDENT, 'max_new_tokens': 4})
    assert not lock.exists()                            # refused in the constructor
    w = writer(out)
    assert lock.exists()
    w.close()                                           # never entered
    assert not lock.exists()
    finish(out)


# --- checksums of committed chunks -------------------------------------------

def _flip_generated_bit(path):
    """Flip one bit of the stored ``generated`` tokens, in place."""
    with h5py.File(path, 'r') as f:
        offset = f['generated'].id.get_offset()
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def _change_token(path):
    with h5py.File(path, 'r+') as f:
        f['generated'][0] = (f['generated'][0] + 1) % VOCAB


def _swap(a, b):
    tmp = a.with_suffix('.swap')
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _truncate(path):
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - 100)


CHUNK0, CHUNK1 = '000000000000-000000000002.h5', '000000000002-000000000004.h5'


@pytest.mark.parametrize('damage, named, problem', [
    (lambda d: _flip_generated_bit(d / CHUNK1), CHUNK1, 'contents differ from the sha256'),
    (lambda d: _change_token(d / CHUNK0), CHUNK0, ''),
    (lambda d: _swap(d / CHUNK0, d / CHUNK1), CHUNK0, ''),
    (lambda d: _truncate(d / CHUNK1), CHUNK1, 'truncated or replaced'),
    (lambda d: os.remove(d / CHUNK1), CHUNK1, 'committed chunk is missing'),
])
def test_a_damaged_chunk_is_refused_on_resume(tmp_path, damage, named, problem):
    out = tmp_path / 'out.h5'
    chunks = partial(out)
    damage(chunks)
    with pytest.raises(DataError, match=f'{chunks / named}.*{problem}.*--overwrite'):
        writer(out)
    assert not out.exists() and not Path(str(out) + '.lock').exists()
    with writer(out, overwrite=True) as w:              # what the message says to do
        for lo, hi in RANGES:
            write(w, lo, hi)
    assert_complete(out)


def test_a_chunk_damaged_during_the_run_is_refused_at_assembly(tmp_path):
    out = tmp_path / 'out.h5'
    chunks = partial(out)
    with pytest.raises(DataError, match=f'{chunks / CHUNK1}.*contents differ from the sha256'):
        with writer(out) as w:
            write(w, *RANGES[2])
            _flip_generated_bit(chunks / CHUNK1)
    assert not out.exists() and not Path(str(out) + '.partial').exists()
    assert not Path(str(out) + '.lock').exists() and (chunks / CHUNK1).exists()


# --- stray and malformed files in OUT.chunks/ ---------------------------------

def test_a_stray_h5_in_the_chunk_directory_is_refused(tmp_path):
    out = tmp_path / 'out.h5'
    chunks = partial(out)
    for stray in ('foo.h5', '000000000006-000000000008.h5'):
        (chunks / stray).write_bytes(b'not mine')
        with pytest.raises(DataError, match=f'{chunks / stray}: not a chunk of this run.*'
                                            'remove it, or pass --overwrite'):
            writer(out)
        os.remove(chunks / stray)
    (chunks / 'notes.txt').write_text('other files are left alone')
    finish(out)


@pytest.mark.parametrize('manifest, problem', [
    ('[1, 2]', 'malformed resume manifest \\(a JSON list, not an object\\)'),
    ('{"identity": {}, "chunks": {}}', '"chunks" is not a list'),
    ('{"identity": {}, "chunks": [{"start": "0"}]}', 'chunks\\[0\\] is not an object of start'),
    ('{"identity": [], "chunks": []}', '"identity" is not an object'),
    ('{"identity": {}, "chunks": [], "final": 3}', '"final" is neither null nor'),
    ('{"identity": ', 'unreadable resume manifest'),
])
def test_a_malformed_manifest_is_one_line_naming_it(tmp_path, manifest, problem):
    out = tmp_path / 'out.h5'
    chunks = partial(out)
    (chunks / 'manifest.json').write_text(manifest)
    with pytest.raises(DataError, match=f'{chunks / "manifest.json"}: .*{problem}.*--overwrite'):
        writer(out)


def test_a_manifest_whose_chunks_do_not_follow_is_refused(tmp_path):
    out = tmp_path / 'out.h5'
    chunks = partial(out)
    manifest = json.loads((chunks / 'manifest.json').read_text())
    manifest['chunks'].reverse()
    write_json(chunks / 'manifest.json', manifest)
    with pytest.raises(DataError, match=f"chunk '{CHUNK1}' \\(sequences 2-4\\) does not follow "
                                        'sequence 0'):
        writer(out)


def test_cli_reference_names_a_malformed_manifest(tmp_path, tiny_weights, tiny_inputs):
    out = tmp_path / 'ref.h5'
    chunks = Path(str(out) + '.chunks')
    chunks.mkdir()
    (chunks / 'manifest.json').write_text('"just a string"')
    (chunks / 'foo.h5').write_bytes(b'x')
    line = one_error_line(_mpimoe('reference', '--weights', tiny_weights, '--input',
                                  tiny_inputs, '--output', out), 65)
    assert f'{chunks / "manifest.json"}: malformed' in line and '--overwrite' in line


# --- kill windows ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_killed_between_creating_the_directory_and_its_manifest(tmp_path):
    out = tmp_path / 'out.h5'
    killed_child(out, 'mkdir')
    assert os.listdir(str(out) + '.chunks') == []
    finish(out)                 # starts afresh; the dead job's lock is taken over


@pytest.mark.timeout(120)
def test_killed_between_the_final_rename_and_removing_the_directory(tmp_path):
    out = tmp_path / 'out.h5'
    killed_child(out, 'rmtree')
    assembled = out.read_bytes()
    assert Path(str(out) + '.chunks').is_dir()
    with writer(out) as w:      # nothing left to do but to remove the directory
        assert w.written == N
    assert out.read_bytes() == assembled
    assert_complete(out)


@pytest.mark.timeout(120)
def test_killed_between_a_chunk_rename_and_the_manifest(tmp_path):
    out = tmp_path / 'out.h5'
    killed_child(out, 'manifest')
    assert (Path(str(out) + '.chunks') / CHUNK1).exists()       # renamed, not listed
    w = writer(out)
    assert w.written == 2 and not (Path(str(out) + '.chunks') / CHUNK1).exists()   # redone
    w.close()
    finish(out)


def test_killed_rerun_after_an_overwrite_run_keeps_the_old_output(tmp_path):
    out = tmp_path / 'out.h5'
    out.write_bytes(b'an earlier result')
    with pytest.raises(KeyboardInterrupt):
        with writer(out, overwrite=True) as w:
            write(w, *RANGES[0])
            raise KeyboardInterrupt
    with pytest.raises(DataError, match=f'{out} exists; pass --overwrite'):
        writer(out)
    assert out.read_bytes() == b'an earlier result'


# --- paths checked before any work -----------------------------------------

def test_check_writable_refuses_what_cannot_or_must_not_be_written(tmp_path):
    weights = tmp_path / 'w.h5'
    weights.write_bytes(b'weights')
    reads = [('--weights', str(weights))]
    cases = [
        (tmp_path / 'w.h5', True, UsageError, 'is also the --weights of this run'),
        (tmp_path / '.' / 'w.h5', True, UsageError, 'is also the --weights'),
        (tmp_path, True, DataError, 'is a directory'),
        (tmp_path / 'no' / 'm.json', True, DataError, f'directory {tmp_path / "no"} does not'),
    ]
    existing = tmp_path / 'm.json'
    existing.write_text('{}')
    cases.append((existing, False, DataError, 'exists; pass --overwrite to replace it'))
    os.link(weights, tmp_path / 'hard.h5')
    cases.append((tmp_path / 'hard.h5', True, UsageError, 'is also the --weights'))
    if os.path.isdir('/proc'):
        cases.append((Path('/proc/m.json'), True, IOFailure, 'directory /proc is not writable'))
    for path, overwrite, error, message in cases:
        with pytest.raises(error, match=message):
            check_writable(path, '--metrics', overwrite, reads)
    check_writable(existing, '--metrics', True, reads)
    assert weights.read_bytes() == b'weights' and existing.read_text() == '{}'


def test_cli_reference_output_that_is_its_input_is_refused(tmp_path, tiny_weights,
                                                          tiny_inputs):
    before = Path(tiny_weights).read_bytes()
    line = one_error_line(_mpimoe('reference', '--weights', tiny_weights, '--input',
                                  tiny_inputs, '--output', tiny_weights, '--overwrite'), 2)
    assert f'--output {tiny_weights} is also the --weights of this run' in line
    assert Path(tiny_weights).read_bytes() == before


def _run(weights, inputs, out, *extra):
    return mpiexec(2, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--placement', 'packed:8', '--max-new-tokens', 1, *extra], timeout=90)




@pytest.mark.timeout(200)
def test_run_refuses_metrics_and_trace_paths_before_compute(tmp_path, tiny_weights,
                                                            tiny_inputs):
    out = tmp_path / 'out.h5'
    metrics = tmp_path / 'run.json'
    metrics.write_text('an earlier report')
    (tmp_path / 'trace').mkdir()
    trace = tmp_path / 'trace' / 'trace.json'
    trace.write_text('an earlier trace')
    weights = Path(tiny_weights).read_bytes()
    cases = [
        (['--metrics', metrics], 65, f'--metrics {metrics} exists; pass --overwrite'),
        (['--metrics', tiny_weights, '--overwrite'], 2,
         f'--metrics {tiny_weights} is also the --weights of this run'),
        (['--trace', tmp_path / 'trace'], 65, f'--trace {trace} exists; pass --overwrite'),
    ]
    if os.path.isdir('/proc'):  # a directory no one may create files in, root included
        cases.append((['--metrics', '/proc/run.json'], 74,
                      '--metrics /proc/run.json: directory /proc is not writable'))
    for extra, code, message in cases:
        proc = _run(tiny_weights, tiny_inputs, out, *extra)
        assert proc.returncode == code, proc.stderr
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and 'stage open' in errors[0] and message in errors[0], \
            proc.stderr
        assert 'Traceback' not in proc.stderr
        assert not out.exists() and not Path(str(out) + '.chunks').exists()
        assert not Path(str(out) + '.lock').exists()
    assert metrics.read_text() == 'an earlier report' and trace.read_text() == 'an earlier trace'
    assert Path(tiny_weights).read_bytes() == weights
    # with --overwrite both are replaced, after the run
    proc = _run(tiny_weights, tiny_inputs, out, '--metrics', metrics, '--trace',
                tmp_path / 'trace', '--overwrite')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(metrics.read_text())['options']['output'] == str(out)
    assert 'traceEvents' in json.loads(trace.read_text())
    assert not Path(str(out) + '.lock').exists()


@pytest.mark.timeout(100)
def test_run_with_a_log_dir_that_is_a_file_is_one_line(tmp_path, tiny_weights, tiny_inputs):
    taken = tmp_path / 'logs'
    taken.write_text('not a directory')
    proc = _run(tiny_weights, tiny_inputs, tmp_path / 'out.h5', '--log-dir', taken)
    assert proc.returncode == 74, proc.stderr
    assert error_lines(proc.stderr) == [f'mpimoe: error: --log-dir {taken}: File exists '
                                        '(rank 0); choose a directory every rank can create '
                                        'and write'], proc.stderr
    assert taken.read_text() == 'not a directory'


# --- OS errors: a full disk ---------------------------------------------------

def test_an_os_error_of_a_write_is_one_line_naming_the_file():
    with pytest.raises(IOFailure, match='cannot write /dev/full: No space left on device'):
        with os_errors('/dev/full'), open('/dev/full', 'w') as f:
            f.write('x' * 10000)
    assert IOFailure.exit_code == 74


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and a kernel that lets us mount)."""
    mnt = tmp_path / 'small'
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs',
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip('cannot mount a small tmpfs here (not root)')
    yield mnt
    for _ in range(50):
        if subprocess.run(['umount', str(mnt)], capture_output=True).returncode == 0:
            break
        time.sleep(0.1)


def test_a_full_disk_is_an_io_failure_naming_the_file(small_disk):
    out = small_disk / 'out.h5'
    big = np.zeros((2, 20000), np.float32)          # 160 kB of logits: does not fit
    with pytest.raises(IOFailure, match=f'cannot write {small_disk / "out.h5.chunks"}/'
                                        '000000000000-000000000002.h5: No space left'):
        with OutputWriter(out, 2, 20000, True, {}, IDENT) as w:
            w.write([0, 1], ['a', 'b'], [[1], [2]], big, finish_reasons=['length'] * 2,
                    prompt_tokens=[1, 1])
    assert not list((small_disk / 'out.h5.chunks').glob('*.partial'))
    assert not Path(str(out) + '.lock').exists()
    with pytest.raises(IOFailure, match=f'cannot write {small_disk / "r.json"}: No space'):
        write_json(small_disk / 'r.json', {'x': 'y' * 100000})
    assert not (small_disk / 'r.json').exists() and not (small_disk / 'r.json.partial').exists()


def test_no_room_for_the_assembled_output_is_found_before_writing_it(small_disk):
    out = small_disk / 'out.h5'
    with pytest.raises(IOFailure, match=f'cannot write {out}: it needs about .* bytes, its '
                                        'filesystem has .* free'):
        with OutputWriter(out, 4, 2000, True, {}, IDENT) as w:
            for lo in (0, 2):                       # 2 chunks of 16 kB of logits fit
                w.write([lo, lo + 1], ['a', 'b'], [[1], [2]], np.ones((2, 2000), np.float32),
                        finish_reasons=['length'] * 2, prompt_tokens=[1, 1])
    assert sorted(os.listdir(small_disk)) == ['out.h5.chunks']      # kept for a rerun
    assert len(list((small_disk / 'out.h5.chunks').glob('*.h5'))) == 2


def test_cli_make_input_on_a_full_disk_exits_74(small_disk):
    line = one_error_line(_mpimoe('make-input', '--vocab', 256, '--num-seqs', 3000,
                                  '--min-len', 20, '--max-len', 40, '--out',
                                  small_disk / 'in.jsonl'), 74)
    assert f'cannot write {small_disk / "in.jsonl"}: No space left on device' in line
    assert os.listdir(small_disk) == []


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / 'f.json'
    path.write_text('old')
    with pytest.raises(ValueError):
        with atomic_write(path) as tmp:
            Path(tmp).write_text('half')
            raise ValueError
    assert path.read_text() == 'old' and not Path(str(path) + '.partial').exists()


@pytest.mark.timeout(200)
def test_run_on_a_full_disk_exits_74_naming_the_chunk(small_disk, tiny_weights, tmp_path):
    from mpimoe.io.inputs import write_synthetic_inputs
    inputs = tmp_path / 'in.jsonl'
    write_synthetic_inputs(inputs, 256, num_seqs=120, min_len=2, max_len=8, seed=1)
    out = small_disk / 'out.h5'         # 120 x 256 float32 logits do not fit in 64 KiB
    proc = _run(tiny_weights, inputs, out, '--save-logits', '--batch-tokens', 200)
    assert proc.returncode == 74, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert f'cannot write {out}.chunks/' in errors[0] and 'No space left on device' in errors[0]
    assert not out.exists()
