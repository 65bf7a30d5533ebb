"""Outputs by extension (mpimoe/io/outputs.py, result_lines.py): .jsonl in
mpimoe's line shape or OpenAI's batch output shape, .h5 with text; committed
in chunks like the HDF5 output, and a resumed output byte for byte an
uninterrupted one."""

import json

import h5py
import numpy as np
import pytest

from mpimoe.errors import DataError, UsageError
from mpimoe.io.outputs import OutputWriter, read_outputs

IDS = ['a', 'b', 'c', 'd']
GEN = [np.array([5, 7]), np.array([], np.int64), np.array([1]), np.array([9, 9, 3])]
REASONS = ['stop', 'length', 'stop', 'length']
PROMPTS = [3, 1, 4, 2]
TEXTS = ['Hi é', '', 'x', 'zz\n日本']
REQUESTS = [('completions', 'm1'), ('chat', ''), ('chat', 'm2'), ('completions', '')]


def _write(path, chunks=((0, 2), (2, 4)), fail_after=None, **kw):
    """Write the four sequences in ``chunks``; raise after chunk ``fail_after``
    (as a killed run), leaving its chunks."""
    w = OutputWriter(path, 4, 16, False, {'k': 1}, {'run': 'x'}, **kw)
    with w:
        for j, (a, b) in enumerate(chunks[len(w.chunks):], len(w.chunks)):
            w.write(np.arange(a, b), IDS[a:b], GEN[a:b], finish_reasons=REASONS[a:b],
                    prompt_tokens=PROMPTS[a:b],
                    texts=TEXTS[a:b] if kw.get('text') else None,
                    openai=REQUESTS[a:b] if kw.get('openai') else None)
            if j == fail_after:
                raise KeyboardInterrupt
    return w


def test_mpimoe_lines_say_id_text_tokens_reason_and_usage(tmp_path):
    out = tmp_path / 'out.jsonl'
    _write(out, text=True)
    lines = out.read_text(encoding='utf-8').splitlines()
    assert [json.loads(x) for x in lines] == [
        {'id': i, 'text': t, 'tokens': g.tolist(), 'finish_reason': r,
         'usage': {'prompt_tokens': p, 'completion_tokens': len(g)}}
        for i, t, g, r, p in zip(IDS, TEXTS, GEN, REASONS, PROMPTS)]
    assert list(json.loads(lines[0])) == ['id', 'text', 'tokens', 'finish_reason', 'usage']
    assert '日本' in lines[3]                            # not \\u-escaped
    got = read_outputs(out)
    assert got['ids'] == IDS and got['text'] == TEXTS and got['finish_reason'] == REASONS
    for g, want in zip(got['generated'], GEN):
        np.testing.assert_array_equal(g, want)
    assert got['completion_tokens'].tolist() == [2, 0, 1, 3]
    assert not (tmp_path / 'out.jsonl.chunks').exists()


def test_without_a_tokenizer_the_text_is_null(tmp_path):
    _write(tmp_path / 'out.jsonl')
    assert read_outputs(tmp_path / 'out.jsonl')['text'] == [None] * 4


def test_openai_lines_have_the_batch_output_shape(tmp_path):
    out = tmp_path / 'out.jsonl'
    w = _write(out, text=True, openai=True)
    lines = [json.loads(x) for x in out.read_text(encoding='utf-8').splitlines()]
    for line, seq_id, text, reason, prompt, gen, (endpoint, model) in zip(
            lines, IDS, TEXTS, REASONS, PROMPTS, GEN, REQUESTS):
        assert list(line) == ['id', 'custom_id', 'response', 'error']
        assert line['custom_id'] == seq_id and line['error'] is None
        assert line['id'].startswith('batch_req_')
        resp = line['response']
        assert resp['status_code'] == 200 and resp['request_id']
        body = resp['body']
        assert body['model'] == model and body['created'] == w.created
        assert body['usage'] == {'prompt_tokens': prompt, 'completion_tokens': len(gen),
                                 'total_tokens': prompt + len(gen)}
        choice, = body['choices']
        assert choice['index'] == 0 and choice['finish_reason'] == reason
        assert choice['logprobs'] is None
        if endpoint == 'chat':
            assert body['object'] == 'chat.completion' and body['id'].startswith('chatcmpl-')
            assert choice['message'] == {'role': 'assistant', 'content': text}
        else:
            assert body['object'] == 'text_completion' and body['id'].startswith('cmpl-')
            assert choice['text'] == text
    assert len({x['id'] for x in lines}) == 4
    got = read_outputs(out)
    assert got['ids'] == IDS and got['text'] == TEXTS and got['generated'] is None


@pytest.mark.parametrize('kw', [dict(text=True), dict(text=True, openai=True)])
def test_a_resumed_jsonl_output_is_byte_identical(tmp_path, kw):
    whole, resumed = tmp_path / 'whole.jsonl', tmp_path / 'resumed.jsonl'
    chunks = ((0, 1), (1, 3), (3, 4))
    with pytest.raises(KeyboardInterrupt):
        _write(resumed, chunks, fail_after=0, **kw)
    started = json.loads((tmp_path / 'resumed.jsonl.chunks' / 'manifest.json').read_text())
    assert len(started['chunks']) == 1
    again = _write(resumed, chunks, **kw)
    first = _write(whole, chunks, **kw)
    assert again.created == started['created']          # kept from the first start
    # the same bytes, but for the start time OpenAI lines carry
    assert resumed.read_text().replace(f'"created":{again.created},', '') == \
        whole.read_text().replace(f'"created":{first.created},', '')
    if not kw.get('openai'):
        assert resumed.read_bytes() == whole.read_bytes()


def test_hdf5_output_carries_text(tmp_path):
    out = tmp_path / 'out.h5'
    _write(out, text=True, openai=True)
    with h5py.File(out, 'r') as f:
        assert f['text'].asstr()[()].tolist() == TEXTS
        assert 'endpoint' not in f and 'model' not in f
    assert read_outputs(out)['text'] == TEXTS
    _write(tmp_path / 'plain.h5')
    assert read_outputs(tmp_path / 'plain.h5')['text'] is None


def test_refusals(tmp_path):
    with pytest.raises(UsageError, match='--save-logits needs an .h5 output'):
        OutputWriter(tmp_path / 'o.jsonl', 2, 16, True, {})
    with pytest.raises(UsageError, match="unknown output extension '.txt'; use .h5"):
        OutputWriter(tmp_path / 'o.txt', 2, 16, False, {})
    with OutputWriter(tmp_path / 'o.jsonl', 1, 16, False, {}, text=True) as w:
        with pytest.raises(ValueError, match='texts must be given'):
            w.write([0], ['a'], [np.array([1])], finish_reasons=['stop'], prompt_tokens=[1])
        w.write([0], ['a'], [np.array([1])], finish_reasons=['stop'], prompt_tokens=[1],
                texts=['t'])


def test_a_malformed_output_line_is_named(tmp_path):
    out = tmp_path / 'o.jsonl'
    _write(out)
    with open(out, 'a') as f:
        f.write('{"id": "e"}\n')
    with pytest.raises(DataError, match=r'o.jsonl:5: not an mpimoe result line'):
        read_outputs(out)


@pytest.mark.parametrize('ext', ['h5', 'jsonl'])
def test_any_generated_text_is_kept_a_nul_included(tmp_path, ext):
    """A model may generate NUL or control characters; an HDF5 string ends at
    a NUL, so the chunks keep text as UTF-8 bytes (the .h5 output shows a NUL
    as U+FFFD, JSON escapes it)."""
    texts = ['a\0b', '\x1b[2J', '', '\ud7ff\U0010ffff']
    out = tmp_path / f'o.{ext}'
    with OutputWriter(out, 4, 16, False, {}, text=True, openai=True) as w:
        w.write(np.arange(4), IDS, GEN, finish_reasons=REASONS, prompt_tokens=PROMPTS,
                texts=texts, openai=[('chat', 'm\0x')] * 4)
    want = [t.replace('\0', '\ufffd') for t in texts] if ext == 'h5' else texts
    assert read_outputs(out)['text'] == want
    if ext == 'jsonl':
        assert json.loads(out.read_text().splitlines()[0])['response']['body']['model'] == 'm\0x'
