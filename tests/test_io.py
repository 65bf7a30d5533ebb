"""Input readers, synthetic inputs, the output writer, and ``mpimoe make-input``."""

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpimoe.errors import DataError, UsageError
from mpimoe.io.outputs import OutputWriter, read_outputs
from mpimoe.io.inputs import read_inputs, write_synthetic_inputs

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256


def _write_jsonl(path, lines):
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def _write_h5(path, tokens, offsets, ids):
    with h5py.File(path, 'w') as f:
        f['tokens'] = np.asarray(tokens, dtype=np.int64)
        f['offsets'] = np.asarray(offsets, dtype=np.int64)
        f.create_dataset('ids', data=ids, dtype=h5py.string_dtype())
    return path


def _mpimoe(*args, cwd):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(REPO), os.environ.get('PYTHONPATH', '')])}
    return subprocess.run([sys.executable, '-m', 'mpimoe', *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


# --- inputs: round trips --------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    path = _write_jsonl(tmp_path / 'in.jsonl', [
        '{"id": "a", "tokens": [1, 2, 3]}', '', '{"id": 7, "tokens": [255]}', '   '])
    inp = read_inputs(path, VOCAB)
    assert len(inp) == 2 and inp.ids == ['a', '7']
    assert inp.tokens.dtype == np.int32 and inp.offsets.dtype == np.int64
    assert inp.offsets.tolist() == [0, 3, 4] and inp.lengths.tolist() == [3, 1]
    assert inp.seq(0).tolist() == [1, 2, 3] and inp.seq(1).tolist() == [255]


@pytest.mark.parametrize('ext', ['.jsonl', '.json', '.h5', '.hdf5'])
def test_synthetic_round_trip(tmp_path, ext):
    path = tmp_path / f'in{ext}'
    write_synthetic_inputs(path, VOCAB, num_seqs=5, min_len=2, max_len=9, seed=3)
    inp = read_inputs(path, VOCAB)
    assert inp.ids == [f'seq-{i:06d}' for i in range(5)]
    assert ((2 <= inp.lengths) & (inp.lengths <= 9)).all()
    assert inp.tokens.min() >= 0 and inp.tokens.max() < VOCAB
    again = tmp_path / f'again{ext}'
    write_synthetic_inputs(again, VOCAB, num_seqs=5, min_len=2, max_len=9, seed=3)
    assert np.array_equal(read_inputs(again, VOCAB).tokens, inp.tokens)
    assert not Path(str(path) + '.partial').exists()


def test_jsonl_and_hdf5_agree(tmp_path):
    write_synthetic_inputs(tmp_path / 'a.jsonl', VOCAB, 4, 1, 5, seed=1)
    write_synthetic_inputs(tmp_path / 'a.h5', VOCAB, 4, 1, 5, seed=1)
    a, b = read_inputs(tmp_path / 'a.jsonl', VOCAB), read_inputs(tmp_path / 'a.h5', VOCAB)
    assert a.ids == b.ids
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets)


# --- inputs: malformed ----------------------------------------------------

GOOD = '{"id": "a", "tokens": [1, 2]}'


@pytest.mark.parametrize('line3, expected', [
    ('{"id": "c", "tokens": [1, 2', 'not valid JSON'),
    ('{"id": "c"}', 'missing key "tokens"'),
    ('{"tokens": [1]}', 'missing key "id"'),
    ('{"id": "c", "tokens": []}', "id 'c': empty sequence"),
    ('{"id": "c", "tokens": [1, 256]}', "id 'c': token 256 at tokens[1] is not in "
                                        "[0, vocab_size=256)"),
    ('{"id": "c", "tokens": [-1]}', "token -1 at tokens[0] is not in [0, vocab_size=256)"),
    ('{"id": "c", "tokens": [1, 2.5]}', 'tokens[1] = 2.5 is not an integer'),
    ('{"id": "c", "tokens": "1 2"}', '"tokens" must be a list'),
    ('{"id": 1.5, "tokens": [1]}', '"id" must be a string or an integer'),
    ('[1, 2]', 'expected an object'),
    ('{"id": "a", "tokens": [3]}', "duplicate id 'a' (first on line 1)"),
])
def test_jsonl_errors_name_the_line(tmp_path, line3, expected):
    path = _write_jsonl(tmp_path / 'bad.jsonl', [GOOD, '{"id": "b", "tokens": [3]}', line3])
    with pytest.raises(DataError) as e:
        read_inputs(path, VOCAB)
    msg = str(e.value)
    assert msg.startswith(f'{path}:3: ') and expected in msg and '\n' not in msg


@pytest.mark.parametrize('tokens, offsets, ids, expected', [
    ([1, 2, 3], [0, 2, 1, 3], ['x', 'y', 'z'], "sequence 1 (id 'y') has a negative length"),
    ([1, 2, 3], [0, 2, 2, 3], ['x', 'y', 'z'], "sequence 1 (id 'y') is empty"),
    ([1, 2, 3], [0, 1, 2], ['x', 'y'], 'offsets run from 0 to 2; expected 0 to len(tokens) = 3'),
    ([1, 2, 3], [1, 2, 3], ['x', 'y'], 'offsets run from 1 to 3'),
    ([1, 2, 3], [0, 3], ['x', 'y'], 'offsets has 2 entries; expected len(ids) + 1 = 3'),
    ([1, 2, 256], [0, 1, 3], ['x', 'y'], "sequence 1 (id 'y'): token 256 at position 1 is not "
                                         "in [0, vocab_size=256)"),
    ([1, -5, 3], [0, 1, 3], ['x', 'y'], "sequence 1 (id 'y'): token -5 at position 0"),
    ([1, 2, 3], [0, 1, 3], ['x', 'x'], "sequence 1 has id 'x', already used by sequence 0"),
])
def test_hdf5_errors_name_the_sequence(tmp_path, tokens, offsets, ids, expected):
    path = _write_h5(tmp_path / 'bad.h5', tokens, offsets, ids)
    with pytest.raises(DataError) as e:
        read_inputs(path, VOCAB)
    assert str(e.value).startswith(f'{path}: ') and expected in str(e.value)


def test_hdf5_missing_dataset_and_wrong_dtype(tmp_path):
    path = tmp_path / 'bad.h5'
    with h5py.File(path, 'w') as f:
        f['tokens'] = np.array([1.0, 2.0])
        f['offsets'] = np.array([0, 2])
    with pytest.raises(DataError, match='missing dataset\\(s\\) ids'):
        read_inputs(path, VOCAB)
    with h5py.File(path, 'a') as f:
        f.create_dataset('ids', data=['x'], dtype=h5py.string_dtype())
    with pytest.raises(DataError, match='dataset tokens must be a 1-D integer array'):
        read_inputs(path, VOCAB)


def test_missing_file_unknown_extension_and_not_hdf5(tmp_path):
    with pytest.raises(DataError, match='input file not found'):
        read_inputs(tmp_path / 'nope.jsonl', VOCAB)
    (tmp_path / 'd.jsonl').mkdir()
    with pytest.raises(DataError, match=r'^--input .*d\.jsonl: is a directory, not a regular '
                                        'file; pass a file$'):
        read_inputs(tmp_path / 'd.jsonl', VOCAB)
    with pytest.raises(UsageError, match="unknown extension '.txt'"):
        read_inputs(tmp_path / 'in.txt', VOCAB)
    (tmp_path / 'fake.h5').write_text('not hdf5')
    with pytest.raises(DataError, match='not a readable HDF5 file'):
        read_inputs(tmp_path / 'fake.h5', VOCAB)


def test_synthetic_bad_arguments_and_existing_file(tmp_path):
    path = tmp_path / 'in.jsonl'
    for kwargs, expected in [(dict(min_len=0), 'min_len=0'), (dict(max_len=1), 'max_len=1'),
                             (dict(num_seqs=0), 'num_seqs=0'), (dict(vocab_size=0), 'vocab_size')]:
        args = {**dict(vocab_size=VOCAB, num_seqs=2, min_len=2, max_len=3), **kwargs}
        with pytest.raises(UsageError, match=expected):
            write_synthetic_inputs(path, **args)
    with pytest.raises(UsageError, match='unknown extension'):
        write_synthetic_inputs(tmp_path / 'in.csv', VOCAB, 2, 1, 2)
    path.write_text('keep me')
    with pytest.raises(DataError, match='exists; pass --overwrite'):
        write_synthetic_inputs(path, VOCAB, 2, 1, 2)
    assert path.read_text() == 'keep me'
    write_synthetic_inputs(path, VOCAB, 2, 1, 2, overwrite=True)
    assert len(read_inputs(path, VOCAB)) == 2


# --- make-input through the CLI -------------------------------------------

@pytest.mark.parametrize('name', ['in.jsonl', 'in.h5'])
def test_cli_make_input(tmp_path, name):
    r = _mpimoe('make-input', '--vocab', 256, '--num-seqs', 6, '--min-len', 3, '--max-len', 8,
                '--out', name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    inp = read_inputs(tmp_path / name, 256)
    assert len(inp) == 6 and inp.lengths.min() >= 3 and inp.lengths.max() <= 8


@pytest.mark.parametrize('args, code', [
    (['--min-len', 5, '--max-len', 2, '--out', 'in.jsonl'], 2),
    (['--min-len', 1, '--max-len', 2, '--out', 'in.txt'], 2),
    (['--min-len', 1, '--max-len', 2, '--out', 'exists.jsonl'], 65),
])
def test_cli_make_input_errors(tmp_path, args, code):
    (tmp_path / 'exists.jsonl').write_text('')
    r = _mpimoe('make-input', '--vocab', 256, '--num-seqs', 2, *args, cwd=tmp_path)
    assert r.returncode == code
    assert r.stderr.startswith('mpimoe: error: ') and r.stderr.count('\n') == 1
    assert 'Traceback' not in r.stderr


# --- outputs ---------------------------------------------------------------

META = {'weights': 'w.h5', 'max_new_tokens': 3, 'temperature': 0.0}


def _batches(rng, n=5, vocab=16):
    ids = [f's{i}' for i in range(n)]
    generated = [rng.integers(0, vocab, size=k, dtype=np.int32) for k in (3, 0, 3, 1, 3)]
    logits = rng.standard_normal((n, vocab), dtype=np.float32)
    return ids, generated, logits


#: how the 5 sequences of _batches ended, and their prompt lengths
REASONS, PROMPTS = ['length', 'stop', 'length', 'stop', 'length'], np.array([4, 1, 7, 2, 9])


def _write(w, lo, hi, ids, generated, logits=None):
    w.write(np.arange(lo, hi), ids[lo:hi], generated[lo:hi], logits,
            finish_reasons=REASONS[lo:hi], prompt_tokens=PROMPTS[lo:hi])


@pytest.mark.parametrize('save_logits', [True, False])
def test_output_two_batches_round_trip(tmp_path, save_logits):
    out = tmp_path / 'out.h5'
    ids, generated, logits = _batches(np.random.default_rng(0))
    with OutputWriter(out, 5, 16, save_logits, META) as w:
        for lo, hi in ((0, 2), (2, 5)):
            _write(w, lo, hi, ids, generated, logits[lo:hi] if save_logits else None)
        assert not out.exists()
    got = read_outputs(out)
    assert got['ids'] == ids and got['meta'] == META
    assert [g.tolist() for g in got['generated']] == [g.tolist() for g in generated]
    assert all(g.dtype == np.int32 for g in got['generated'])
    assert got['finish_reason'] == REASONS
    assert got['prompt_tokens'].dtype == got['completion_tokens'].dtype == np.int32
    assert got['prompt_tokens'].tolist() == PROMPTS.tolist()
    assert got['completion_tokens'].tolist() == [3, 0, 3, 1, 3]
    if save_logits:
        assert np.array_equal(got['last_logits'], logits)
    else:
        assert got['last_logits'] is None
    assert not Path(str(out) + '.partial').exists()


def test_output_prefill_only_has_no_generated_tokens(tmp_path):
    out = tmp_path / 'out.h5'
    logits = np.ones((3, 16), dtype=np.float32)
    with OutputWriter(out, 3, 16, True, {}) as w:
        w.write(np.arange(3), ['a', 'b', 'c'], [np.zeros(0, np.int32)] * 3, logits,
                finish_reasons=['length'] * 3, prompt_tokens=[5, 1, 2])
    got = read_outputs(out)
    assert [g.size for g in got['generated']] == [0, 0, 0] and got['meta'] == {}
    assert got['completion_tokens'].tolist() == [0, 0, 0]
    assert np.array_equal(got['last_logits'], logits)


def test_output_missing_sequences_is_an_error(tmp_path):
    out = tmp_path / 'out.h5'
    ids, generated, _ = _batches(np.random.default_rng(0))
    with pytest.raises(RuntimeError, match='only 2 of 5 sequences'):
        with OutputWriter(out, 5, 16, False, META) as w:
            _write(w, 0, 2, ids, generated)
    assert not out.exists() and not Path(str(out) + '.partial').exists()


def test_output_batches_out_of_order_are_refused(tmp_path):
    ids, generated, _ = _batches(np.random.default_rng(0))
    with pytest.raises(ValueError, match='index must continue the input order'):
        with OutputWriter(tmp_path / 'out.h5', 5, 16, False, META) as w:
            _write(w, 0, 2, ids, generated)
            _write(w, 3, 5, ids, generated)


def test_output_refuses_existing_file(tmp_path):
    out = tmp_path / 'out.h5'
    out.write_bytes(b'previous result')
    with pytest.raises(DataError, match=f'{out} exists; pass --overwrite to replace it'):
        OutputWriter(out, 5, 16, False, META)
    assert out.read_bytes() == b'previous result'
    assert not Path(str(out) + '.partial').exists()


def test_output_exception_leaves_existing_file_untouched(tmp_path):
    out = tmp_path / 'out.h5'
    out.write_bytes(b'previous result')
    ids, generated, _ = _batches(np.random.default_rng(0))
    with pytest.raises(KeyError):
        with OutputWriter(out, 5, 16, False, META, overwrite=True) as w:
            _write(w, 0, 5, ids, generated)
            raise KeyError('boom')
    assert out.read_bytes() == b'previous result'


@pytest.mark.parametrize('reasons, prompts, message', [
    (['length', 'done'], [1, 2], "finish reason 'done': must be one of ('stop', 'length')"),
    (['length'], [1, 2], 'batch of 2 sequences with 1 finish reasons'),
    (['stop', 'stop'], [1, 0], 'prompt_tokens [1, 0]...: must be integers >= 1'),
    (['stop', 'stop'], [1.0, 2.0], 'must be integers >= 1'),
])
def test_output_refuses_bad_ends(tmp_path, reasons, prompts, message):
    ids, generated, _ = _batches(np.random.default_rng(0))
    w = OutputWriter(tmp_path / 'out.h5', 5, 16, False, META)
    with pytest.raises(ValueError, match=re.escape(message)), w:
        w.write([0, 1], ids[:2], generated[:2], finish_reasons=reasons, prompt_tokens=prompts)
    assert w.written == 0 and not list((tmp_path / 'out.h5.chunks').glob('*.h5'))


def test_read_outputs_of_a_file_before_the_per_sequence_counts(tmp_path):
    """An output written before finish_reason, prompt_tokens and completion_tokens
    existed reads with None for them."""
    out = tmp_path / 'out.h5'
    ids, generated, _ = _batches(np.random.default_rng(0))
    with OutputWriter(out, 5, 16, False, META) as w:
        _write(w, 0, 5, ids, generated)
    with h5py.File(out, 'r+') as f:
        for key in ('finish_reason', 'prompt_tokens', 'completion_tokens'):
            del f[key]
    got = read_outputs(out)
    assert got['finish_reason'] is got['prompt_tokens'] is got['completion_tokens'] is None
    assert got['ids'] == ids


def test_read_outputs_refuses_other_files(tmp_path):
    path = _write_h5(tmp_path / 'in.h5', [1], [0, 1], ['x'])
    with pytest.raises(DataError, match='not an mpimoe output file'):
        read_outputs(path)
