"""``mpimoe reference`` end to end, as a user runs it (a subprocess): the output
file's datasets, dtypes and shapes (mpimoe/io/), the same numbers as the
library, and every user error as one line on stderr with its exit code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from mpimoe.checkpoint.weights import WeightFile
from mpimoe.io.inputs import read_inputs
from mpimoe.io.outputs import read_outputs
from mpimoe.model.reference import load_reference

REPO = Path(__file__).resolve().parents[1]


def _reference(*args, cwd):
    """``python -m mpimoe reference ARGS`` -> CompletedProcess (text)."""
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        [str(REPO), os.environ.get('PYTHONPATH', '')])}
    return subprocess.run([sys.executable, '-m', 'mpimoe', 'reference', *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _assert_one_line_error(result, code, *fragments):
    """Exit ``code``, stderr exactly one line ``mpimoe: error: ...`` containing
    every fragment, nothing on stdout."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and lines[0].startswith('mpimoe: error: '), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ''


def test_reference_writes_the_output_format(tmp_path, tiny_weights, tiny_inputs):
    out = tmp_path / 'ref.h5'
    result = _reference('--weights', tiny_weights, '--input', tiny_inputs, '--output', out,
                        '--max-new-tokens', 4, '--save-logits', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('reference: 12/12 sequences (100.0%)')
    # progress: a line at the start, one for the only chunk
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == 'mpimoe: 0/12 sequences, starting'
    assert lines[1].startswith('mpimoe: 12/12 sequences (100.0%)')
    inputs = read_inputs(tiny_inputs, 256)
    with h5py.File(out, 'r') as f:
        assert set(f) == {'ids', 'generated', 'generated_offsets', 'last_logits', 'finish_reason',
                          'prompt_tokens', 'completion_tokens'}
        assert h5py.check_string_dtype(f['ids'].dtype) is not None and f['ids'].shape == (12,)
        assert f['ids'].asstr()[()].tolist() == inputs.ids
        assert f['generated'].dtype == np.int32 and f['generated'].shape == (48,)
        assert f['generated_offsets'].dtype == np.int64
        assert f['generated_offsets'][()].tolist() == list(range(0, 49, 4))
        assert f['last_logits'].dtype == np.float32 and f['last_logits'].shape == (12, 256)
        assert f.attrs['format'] == 'mpimoe-output' and f.attrs['format_version'] == 1
        assert f.attrs['producer'] == 'mpimoe reference' and f.attrs['max_new_tokens'] == 4
        generated, logits = f['generated'][()], f['last_logits'][()]
    # the command is the library: the same steps, the same arithmetic, the same bits
    with WeightFile(tiny_weights) as wf:
        model = load_reference(wf)
    expected, expected_logits = model.generate([inputs.seq(i) for i in range(12)], 4)
    np.testing.assert_array_equal(generated, np.concatenate(expected))
    np.testing.assert_array_equal(logits, expected_logits)


def test_reference_prefill_only_without_logits(tmp_path, tiny_weights, tiny_inputs):
    out = tmp_path / 'ref.h5'
    result = _reference('--weights', tiny_weights, '--input', tiny_inputs, '--output', out,
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with h5py.File(out, 'r') as f:
        assert set(f) == {'ids', 'generated', 'generated_offsets', 'finish_reason',
                          'prompt_tokens', 'completion_tokens'}
        assert f['generated'].shape == (0,) and f['generated_offsets'][()].tolist() == [0] * 13


def _corrupt_an_expert(src, dst):
    """Copy weight file ``src`` to ``dst`` with one bit of an expert flipped
    (its checksum no longer matches); -> dst."""
    shutil.copyfile(src, dst)
    with h5py.File(dst, 'r+') as f:
        ds = f['layers/3/experts/7/down']
        ds[0, 0] = ds[0, 0] ^ 1
    return dst


def test_existing_output_is_refused_before_loading(tmp_path, tiny_weights, tiny_inputs):
    """An existing output fails fast: before the (long) weight load, which here
    would fail on a corrupted expert; the file's bytes are left as they were."""
    bad = _corrupt_an_expert(tiny_weights, tmp_path / 'bad.h5')
    out = tmp_path / 'ref.h5'
    out.write_bytes(b'a previous result')
    result = _reference('--weights', bad, '--input', tiny_inputs, '--output', out, cwd=tmp_path)
    _assert_one_line_error(result, 65, str(out), 'exists', '--overwrite')
    assert out.read_bytes() == b'a previous result'
    # the corruption is real: with a new output path the load reports it
    result = _reference('--weights', bad, '--input', tiny_inputs, '--output',
                        tmp_path / 'new.h5', cwd=tmp_path)
    _assert_one_line_error(result, 65, 'layers/3/experts/7/down', 'checksum')
    assert not (tmp_path / 'new.h5').exists() and not (tmp_path / 'new.h5.partial').exists()
    # --overwrite replaces the file
    result = _reference('--weights', tiny_weights, '--input', tiny_inputs, '--output', out,
                        '--overwrite', cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_outputs(out)['ids']) == 12


def test_token_outside_the_vocabulary_names_the_sequence(tmp_path, tiny_weights):
    inp = tmp_path / 'in.jsonl'
    inp.write_text('{"id": "fine", "tokens": [1, 2]}\n{"id": "doc-7", "tokens": [3, 256, 4]}\n')
    out = tmp_path / 'ref.h5'
    result = _reference('--weights', tiny_weights, '--input', inp, '--output', out,
                        cwd=tmp_path)
    # found by the validation pass at open, before any progress line
    _assert_one_line_error(result, 65, f'{inp}:2', "'doc-7'", 'token 256', 'vocab_size=256')
    assert not out.exists() and not (tmp_path / 'ref.h5.partial').exists()


def test_missing_weight_file(tmp_path, tiny_inputs):
    missing = tmp_path / 'nowhere.h5'
    result = _reference('--weights', missing, '--input', tiny_inputs, '--output',
                        tmp_path / 'ref.h5', cwd=tmp_path)
    _assert_one_line_error(result, 65, str(missing), 'no such file', 'init-weights')


def test_negative_max_new_tokens_is_a_usage_error(tmp_path, tiny_weights, tiny_inputs):
    out = tmp_path / 'ref.h5'
    result = _reference('--weights', tiny_weights, '--input', tiny_inputs, '--output', out,
                        '--max-new-tokens', -1, cwd=tmp_path)
    _assert_one_line_error(result, 2, '--max-new-tokens -1', '>= 0')
    assert not out.exists()
