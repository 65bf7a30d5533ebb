"""Input validation: every defect of a token file is one line, found when the
file is opened (before any compute), naming the line (JSONL) or the sequence
(HDF5); the ids, the numbers and the lengths a run can take are bounded."""

import json
import tracemalloc

import h5py
import numpy as np
import pytest

import mpimoe.io.hdf5
import mpimoe.io.jsonl
from mpirun import mpiexec
from mpimoe.errors import DataError, UsageError
from mpimoe.runtime.request import SamplingParams
from mpimoe.io.inputs import InputStream, read_inputs
from mpimoe.io.jsonl import MAX_LINE_BYTES
from test_reference_cli import _assert_one_line_error, _reference

VOCAB = 256
GOOD = '{"id": "a", "tokens": [1, 2]}'


def _jsonl(path, lines):
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def _h5(path, tokens, offsets, ids, id_dtype=None):
    with h5py.File(path, 'w') as f:
        f['tokens'] = np.asarray(tokens, dtype=np.int64)
        f['offsets'] = np.asarray(offsets, dtype=np.int64)
        f.create_dataset('ids', data=ids, dtype=id_dtype or h5py.string_dtype())
    return path


def _error(path, *args, **kwargs):
    """The message of the DataError that opening ``path`` raises (one line)."""
    with pytest.raises(DataError) as e:
        InputStream(path, VOCAB, *args, **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and len(msg) < 400, msg
    return msg


# --- JSONL: malformed lines ----------------------------------------------

@pytest.mark.parametrize('line2, expected', [
    ('{"id": "b\\u0000c", "tokens": [1]}', "id 'b\\x00c' contains NUL at character 1"),
    ('{"id": "b\\ud800", "tokens": [1]}', "id 'b\\ud800' has a lone surrogate '\\ud800'"),
    ('{"id": "' + 'x' * 1025 + '", "tokens": [1]}', 'has 1025 bytes of UTF-8; ids have at '
                                                   'most 1024'),
    ('{"id": "' + '\\u00e9' * 513 + '", "tokens": [1]}', 'has 1026 bytes of UTF-8'),
    ('{"id": "b", "tokens": [' + '7' * 5000 + ']}', 'a number with more than 4300 digits'),
    ('{"id": ' + '7' * 5000 + ', "tokens": [1]}', 'a number with more than 4300 digits'),
    ('{"id": ' + '7' * 2000 + ', "tokens": [1]}', 'has 2000 bytes of UTF-8'),
    ('[' * 100000, 'JSON nested too deeply'),
    ('{"id": "b", "tokens": [' + '[' * 50000 + ']}', 'JSON nested too deeply'),
    ('{"id": "b", "tokens": [1, ' + '9' * 4000 + ']}', "id 'b': token 99999"),
    ('{"id": "b", "tokens": [1, [2, 3]]}', "id 'b': tokens[1] = [...] is not an integer"),
    ('{"id": "b", "tokens": [true]}', "tokens[0] = true is not an integer"),
    ('{"id": "b", "tokens": [NaN]}', "tokens[0] = NaN is not an integer"),
    ('{"id": ["' + 'y' * 5000 + '"], "tokens": [1]}', '"id" must be a string or an '
                                                      'integer, got [...]'),
])
def test_jsonl_defect_is_one_short_line_naming_it(tmp_path, line2, expected):
    path = _jsonl(tmp_path / 'bad.jsonl', [GOOD, line2, '{"id": "c", "tokens": [3]}'])
    msg = _error(path)
    assert msg.startswith(f'{path}:2: ') and expected in msg, msg


def test_accepted_ids_round_trip(tmp_path):
    """The limits refuse nothing legitimate: 1024 bytes, non-ASCII text, a
    surrogate pair (one character), control characters other than NUL."""
    ids = ['x' * 1024, 'Zürich-東京', 'emoji-\U0001F600', 'tab\there', '']
    lines = [json.dumps({'id': i, 'tokens': [k + 1]}) for k, i in enumerate(ids)]
    lines[2] = '{"id": "emoji-\\ud83d\\ude00", "tokens": [3]}'
    inp = read_inputs(_jsonl(tmp_path / 'ok.jsonl', lines), VOCAB)
    assert inp.ids == ids and inp.tokens.tolist() == [1, 2, 3, 4, 5]


def test_over_long_line_is_refused_naming_it(tmp_path):
    path = tmp_path / 'long.jsonl'
    with open(path, 'wb') as f:
        f.write(GOOD.encode() + b'\n')
        f.write(b'{"id": "b", "tokens": [' + b'1,' * (MAX_LINE_BYTES // 2) + b'1]}\n')
    msg = _error(path)
    assert msg.startswith(f'{path}:2: line longer than 64 MiB'), msg


def test_over_long_line_is_not_read_whole(tmp_path, monkeypatch):
    """A line without newline is read only up to the cap (here 4 KiB of a
    4 MiB line), never whole into memory."""
    monkeypatch.setattr(mpimoe.io.jsonl, 'MAX_LINE_BYTES', 4096)
    path = tmp_path / 'long.jsonl'
    path.write_bytes(GOOD.encode() + b'\n' + b'[' * (4 << 20))
    tracemalloc.start()
    try:
        msg = _error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.startswith(f'{path}:2: line longer than'), msg
    assert peak < 1 << 20, peak


def test_a_line_of_exactly_the_cap_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(mpimoe.io.jsonl, 'MAX_LINE_BYTES', 64)
    line = '{"id": "b", "tokens": [1]}'
    line += ' ' * (63 - len(line))                      # 63 bytes + newline = the cap
    inp = read_inputs(_jsonl(tmp_path / 'ok.jsonl', [GOOD, line]), VOCAB)
    assert inp.ids == ['a', 'b']
    _jsonl(tmp_path / 'over.jsonl', [GOOD, line + ' '])
    assert ':2: line longer' in _error(tmp_path / 'over.jsonl')


def test_duplicate_id_at_the_end_is_found_at_open(tmp_path):
    lines = [json.dumps({'id': f's{i}', 'tokens': [i % VOCAB]}) for i in range(3000)]
    path = _jsonl(tmp_path / 'dup.jsonl', lines + ['', '{"id": "s17", "tokens": [1]}'])
    assert _error(path) == f"{path}:3002: duplicate id 's17' (first on line 18)"


def test_equal_id_hashes_of_different_ids_are_not_duplicates(tmp_path):
    """The uniqueness check compares hashes first and re-reads the ids that
    share one: equal hashes of different ids (possible, rare) pass."""
    stream = InputStream(_jsonl(tmp_path / 'in.jsonl', [GOOD, '{"id": "b", "tokens": [3]}',
                                                        '{"id": "a2", "tokens": [4]}']), VOCAB)
    stream._check_unique(np.array([5, 9, 5], dtype=np.int64))
    with pytest.raises(DataError, match="in.jsonl:3: duplicate id 'a2' \\(first on line 2\\)"):
        InputStream(_jsonl(tmp_path / 'in.jsonl', [GOOD, '{"id": "a2", "tokens": [3]}',
                                                   '{"id": "a2", "tokens": [4]}']), VOCAB)


# --- lengths: context and batch budget -----------------------------------

def _lengths_file(tmp_path, lengths, ext):
    path = tmp_path / f'in{ext}'
    seqs = [[1] * n for n in lengths]
    if ext == '.jsonl':
        return _jsonl(path, [json.dumps({'id': f'doc-{i}', 'tokens': s})
                             for i, s in enumerate(seqs)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return _h5(path, np.concatenate(seqs), offsets, [f'doc-{i}' for i in range(len(seqs))])


@pytest.mark.parametrize('ext, where', [('.jsonl', ':3: id '), ('.h5', ': sequence 2 (id ')])
def test_prompt_plus_new_tokens_beyond_the_context_is_refused(tmp_path, ext, where):
    path = _lengths_file(tmp_path, [5, 28, 30, 2], ext)
    assert len(InputStream(path, VOCAB, context=32, defaults=SamplingParams(max_tokens=2))) == 4   # 30 + 2 fits
    msg = _error(path, context=32, defaults=SamplingParams(max_tokens=3))
    assert msg.startswith(f'{path}{where}' + "'doc-2'"), msg
    assert ('30 prompt tokens + 3 new (--max-new-tokens) = 33 exceed the context length of '
            'the model (max_position_embeddings = 32); shorten the prompt or lower '
            '--max-new-tokens') in msg


@pytest.mark.parametrize('ext, where', [('.jsonl', ':2: id '), ('.h5', ': sequence 1 (id ')])
def test_prompt_beyond_the_batch_budget_is_refused(tmp_path, ext, where):
    """A step never holds more than --max-batch-tokens tokens: a longer
    prompt, which could never join a step, is refused."""
    path = _lengths_file(tmp_path, [5, 41, 40], ext)
    stream = InputStream(path, VOCAB, batch_tokens=41)
    assert [b.lengths.sum() for _, b in stream.batches(41)] == [5, 41, 40]
    msg = _error(path, batch_tokens=40)
    assert msg.startswith(f'{path}{where}' + "'doc-1'"), msg
    assert '41 prompt tokens exceed --max-batch-tokens 40' in msg and \
        'raise --max-batch-tokens' in msg


def test_max_new_tokens_filling_the_context_is_a_usage_error(tmp_path):
    path = _lengths_file(tmp_path, [1], '.jsonl')
    with pytest.raises(UsageError, match='--max-new-tokens 32: leaves no room for a prompt'):
        InputStream(path, VOCAB, context=32, defaults=SamplingParams(max_tokens=32))


# --- HDF5 ------------------------------------------------------------------

@pytest.mark.parametrize('ids, dtype, expected', [
    ([b'x', b'a\x00b'], 'S3', "sequence 1: id 'a\\x00b' contains NUL"),
    (['x', 'y' * 1100], None, "sequence 1: id 'yyyyy"),
    ([b'x', b'\xff\xfe'], h5py.string_dtype('utf-8', 2), 'dataset ids is not valid UTF-8'),
])
def test_hdf5_bad_ids(tmp_path, ids, dtype, expected):
    path = _h5(tmp_path / 'bad.h5', [1, 2, 3], [0, 1, 3], ids, dtype)
    msg = _error(path)
    assert msg.startswith(f'{path}: ') and expected in msg, msg


def test_hdf5_defects_in_a_late_slab_are_found_at_open(tmp_path):
    n = mpimoe.io.hdf5._HDF5_SLAB + 10
    ids = [f's{i}' for i in range(n)]
    ids[-1] = 's3'
    path = _h5(tmp_path / 'dup.h5', np.ones(n), np.arange(n + 1), ids)
    assert _error(path) == f"{path}: sequence {n - 1} has id 's3', already used by sequence 3"
    tokens = np.ones(n)
    tokens[-2] = VOCAB
    path = _h5(tmp_path / 'tok.h5', tokens, np.arange(n + 1), [f's{i}' for i in range(n)])
    assert f'sequence {n - 2} (id \'s{n - 2}\'): token 256' in _error(path)


def _corrupt_hdf5(path):
    """An input whose compressed tokens fail to decode (bytes of a chunk overwritten)."""
    with h5py.File(path, 'w') as f:
        f.create_dataset('ids', data=['a', 'b'], dtype=h5py.string_dtype())
        f['offsets'] = np.array([0, 20, 40000])
        tokens = np.random.default_rng(0).integers(0, VOCAB, 40000)
        f.create_dataset('tokens', data=tokens, compression='gzip', chunks=(4000,))
        where = f['tokens'].id.get_chunk_info(3).byte_offset
    with open(path, 'r+b') as f:
        f.seek(where + 10)
        f.write(b'\xff' * 64)
    return path


# --- end to end: the CLI, one line before any compute ----------------------

@pytest.mark.timeout(120)
def test_reference_unreadable_input_is_one_line(tmp_path, tiny_weights):
    inp = _corrupt_hdf5(tmp_path / 'in.h5')
    result = _reference('--weights', tiny_weights, '--input', inp, '--output',
                        tmp_path / 'out.h5', cwd=tmp_path)
    _assert_one_line_error(result, 74, f'{inp}: cannot read the input: ', 'filter')


def _long_file_bad_at_the_end(tmp_path, last):
    lines = [json.dumps({'id': f'seq-{i}', 'tokens': [1 + i % 200] * 4}) for i in range(2000)]
    return _jsonl(tmp_path / 'in.jsonl', lines + [last])


@pytest.mark.timeout(120)
@pytest.mark.parametrize('last, fragments', [
    ('{"id": "z\\u0000", "tokens": [1]}', ['contains NUL']),
    ('{"id": "z", "tokens": [' + '1' * 5000 + ']}', ['more than 4300 digits']),
    ('[' * 100000, ['nested too deeply']),
    ('{"id": "seq-7", "tokens": [1]}', ["duplicate id 'seq-7' (first on line 8)"]),
])
def test_reference_refuses_a_bad_last_line_before_any_compute(tmp_path, tiny_weights, last,
                                                              fragments):
    """Batches of 8 tokens: before validation at open, 1000 chunks were
    committed (hours, at scale) before the last line failed."""
    inp = _long_file_bad_at_the_end(tmp_path, last)
    out = tmp_path / 'out.h5'
    result = _reference('--weights', tiny_weights, '--input', inp, '--output', out,
                        '--batch-tokens', 8, cwd=tmp_path)
    _assert_one_line_error(result, 65, f'{inp}:2001: ', *fragments)
    assert not out.exists() and not (tmp_path / 'out.h5.chunks').exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize('ext', ['.jsonl', '.h5'])
def test_reference_refuses_prompts_beyond_the_context(tmp_path, make_weights, ext):
    weights = make_weights('tiny', ['max_position_embeddings=32'])
    inp = _lengths_file(tmp_path, [5, 30], ext)
    out = tmp_path / 'out.h5'
    result = _reference('--weights', weights, '--input', inp, '--output', out,
                        '--max-new-tokens', 3, cwd=tmp_path)
    _assert_one_line_error(result, 65, str(inp), "'doc-1'", '30 prompt tokens + 3 new',
                           'max_position_embeddings = 32')
    assert not out.exists() and not (tmp_path / 'out.h5.chunks').exists()
    result = _reference('--weights', weights, '--input', inp, '--output', out,
                        '--max-new-tokens', 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.timeout(120)
def test_run_prints_an_input_error_once(tmp_path, tiny_weights):
    """Under MPI rank 0 reads the input: its error is one line, printed once
    (first, before MPICH's abort notice), exit 65, nothing written."""
    inp = _long_file_bad_at_the_end(tmp_path, '{"id": "z\\ud800", "tokens": [1]}')
    out = tmp_path / 'out.h5'
    proc = mpiexec(3, ['run', '--weights', tiny_weights, '--input', inp, '--output', out,
                       '--placement', 'packed:4', '--batch-tokens', 8], timeout=90)
    assert proc.returncode == 65, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert errors[0].startswith('mpimoe: error (rank 0')
    assert f"{inp}:2001: id 'z\\ud800' has a lone surrogate" in errors[0]
    assert proc.stderr.count(str(inp)) == 1
    assert not out.exists() and not (tmp_path / 'out.h5.chunks').exists()
