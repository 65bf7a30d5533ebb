"""`mpimoe show`: results of .h5 and .jsonl outputs printed readably, the
first --limit or the one --id, prompts from --input; errors in one line."""

import numpy as np
import pytest

from mpimoe.cli.main import main
from mpimoe.io.outputs import OutputWriter


def _output(path, n=30, text=True, texts=None):
    """An output of ``n`` results s0, s1, ... in chunks of 7; their texts:
    ``texts``, else 'text of I\\nline 2' (none unless ``text``)."""
    texts = texts or [f'text of {i}\nline 2' for i in range(n)]
    with OutputWriter(path, n, 16, False, {}, text=text) as w:
        for a in range(0, n, 7):
            b = min(a + 7, n)
            w.write(np.arange(a, b), [f's{i}' for i in range(a, b)],
                    [np.array([i % 16, 3]) for i in range(a, b)],
                    finish_reasons=['length'] * (b - a), prompt_tokens=[2] * (b - a),
                    texts=texts[a:b] if text else None)
    return path


@pytest.mark.parametrize('ext', ['h5', 'jsonl'])
def test_the_first_limit_results(tmp_path, capsys, ext):
    out = _output(tmp_path / f'o.{ext}')
    assert main(['show', str(out), '--limit', '2']) == 0
    assert capsys.readouterr().out == (
        '== s0   length, 2 prompt + 2 generated tokens\ntext:\n  text of 0\n  line 2\n'
        '== s1   length, 2 prompt + 2 generated tokens\ntext:\n  text of 1\n  line 2\n')


@pytest.mark.parametrize('ext', ['h5', 'jsonl'])
def test_one_id_and_token_ids_without_text(tmp_path, capsys, ext):
    out = _output(tmp_path / f'o.{ext}', text=False)
    assert main(['show', str(out), '--id', 's27']) == 0
    assert capsys.readouterr().out == \
        '== s27   length, 2 prompt + 2 generated tokens\ntokens: [11, 3]\n'


def test_prompts_from_the_input(tmp_path, capsys):
    out = _output(tmp_path / 'o.jsonl', n=2)
    inp = tmp_path / 'in.jsonl'
    inp.write_text('{"id": "s0", "prompt": "Hi there"}\n{"id": "s1", "tokens": [4, 5]}\n')
    assert main(['show', str(out), '--input', str(inp)]) == 0
    shown = capsys.readouterr().out
    assert 'prompt:\n  Hi there\ntext:' in shown and 'prompt:\n  tokens: [4, 5]\n' in shown


def test_an_absent_id_is_one_line(tmp_path, capsys):
    out = _output(tmp_path / 'o.jsonl', n=2)
    assert main(['show', str(out), '--id', 'nope']) == 65
    assert capsys.readouterr().err == f"mpimoe: error: {out}: no result with id 'nope'\n"


def test_a_limit_below_one_is_a_usage_error(tmp_path, capsys):
    out = _output(tmp_path / 'o.jsonl', n=2)
    with pytest.raises(SystemExit) as exit_:
        main(['show', str(out), '--limit', '0'])
    assert exit_.value.code == 2
    assert "argument --limit: '0': expected an integer >= 1" in capsys.readouterr().err


def test_a_file_that_is_no_output(tmp_path, capsys):
    bad = tmp_path / 'x.h5'
    bad.write_bytes(b'not hdf5')
    assert main(['show', str(bad)]) == 65
    assert 'not a readable HDF5 file' in capsys.readouterr().err
    assert main(['show', str(tmp_path / 'missing.jsonl')]) == 65
    assert 'missing.jsonl: output file not found' in capsys.readouterr().err


def test_control_characters_are_shown_escaped(tmp_path, capsys):
    """Generated text may hold an ESC sequence: printed escaped, it cannot
    drive the terminal."""
    out = _output(tmp_path / 'o.jsonl', n=1, texts=['x\x1b[2J\x00y\n\tz'])
    assert main(['show', str(out)]) == 0
    assert capsys.readouterr().out.endswith('text:\n  x\\x1b[2J\\x00y\n  \tz\n')


def test_a_surrogate_is_shown_escaped(tmp_path, capsys):
    out = tmp_path / 'o.jsonl'
    out.write_text('{"id": "a\\ud800", "text": "b\\udfff", "tokens": [1], "finish_reason": '
                   '"stop", "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n')
    assert main(['show', str(out)]) == 0
    assert capsys.readouterr().out == \
        '== a\\ud800   stop, 1 prompt + 1 generated tokens\ntext:\n  b\\udfff\n'


def test_an_input_that_does_not_match_is_noted(tmp_path, capsys):
    out = _output(tmp_path / 'o.jsonl', n=2)
    other = tmp_path / 'other.jsonl'
    other.write_text('{"id": "x", "prompt": "Hi"}\n')
    assert main(['show', str(out), '--input', str(other)]) == 0
    assert capsys.readouterr().out.startswith(f'note: no id of these results is in {other}')
