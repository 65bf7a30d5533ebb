"""Per-sequence generation settings of input lines (mpimoe/io/fields.py,
jsonl.py): each replaces the run's default for its sequence; wrong keys,
types and ranges are one line naming the line, the id, the key and the value,
found at open; each prompt fits the context with its own max_tokens; the
run's defaults are part of the output's identity."""

import dataclasses
import json

import numpy as np
import pytest

from mpimoe.checkpoint.weights import WeightFile
from mpimoe.errors import DataError, UsageError
from mpimoe.io.fields import SETTINGS
from mpimoe.io.inputs import InputStream, read_inputs
from mpimoe.io.job import open_job
from mpimoe.runtime.options import JobOptions
from mpimoe.runtime.request import SamplingParams
from test_inputs import _h5, _jsonl
from test_text_inputs import text_tokenizer, write_tokenizer

VOCAB = 256
DEFAULTS = SamplingParams(max_tokens=4, temperature=0.5, top_k=10, seed=9)


def _stream(tmp_path, lines, **kwargs):
    lines = [json.dumps(x) if isinstance(x, dict) else x for x in lines]
    return InputStream(_jsonl(tmp_path / 'in.jsonl', lines), VOCAB, **kwargs)


def _error(tmp_path, line, **kwargs):
    """The one-line DataError of a file whose second line is ``line``."""
    with pytest.raises(DataError) as e:
        _stream(tmp_path, [{'id': 'a', 'tokens': [1]}, line], **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and len(msg) < 400, msg
    assert msg.startswith(f'{tmp_path / "in.jsonl"}:2: '), msg
    return msg


def test_a_line_replaces_the_defaults_key_by_key(tmp_path):
    """Every key (stop strings need a tokenizer, which reads the text)."""
    every = {'max_tokens': 7, 'temperature': 1, 'top_k': 256, 'top_p': 0.9, 'seed': 2 ** 63 - 1,
             'stop_token_ids': [3, 0, 255], 'ignore_eos': True, 'stop': ['END', '\n\n']}
    stream = _stream(tmp_path, [{'id': 'a', 'tokens': [1, 2]},
                                {'id': 'b', 'tokens': [3], 'seed': 0, 'top_p': 1},
                                {'id': 'c', 'tokens': [4], **every}], defaults=DEFAULTS,
                     tokenizer=text_tokenizer(write_tokenizer(tmp_path / 'tok')))
    (_, batch), = stream.batches(budget=None)
    a, b, c = batch.params
    assert a is DEFAULTS                                # nothing set: the defaults themselves
    assert b == SamplingParams(max_tokens=4, temperature=0.5, top_k=10, top_p=1.0, seed=0)
    assert c == SamplingParams(max_tokens=7, temperature=1.0, top_k=256, top_p=0.9,
                               seed=2 ** 63 - 1, stop_token_ids=(3, 0, 255), ignore_eos=True,
                               stop=('END', '\n\n'))
    assert type(c.temperature) is float and type(b.top_p) is float
    assert set(every) == set(SETTINGS)


def test_batches_carry_their_sequences_settings_after_a_restart(tmp_path):
    lines = [{'id': f's{i}', 'tokens': [1, 2], 'seed': i} for i in range(5)]
    stream = _stream(tmp_path, lines)
    got = [(first, [p.seed for p in b.params]) for first, b in stream.batches(4, start=2)]
    assert got == [(2, [2, 3]), (4, [4])]


def test_hdf5_sequences_have_the_defaults(tmp_path):
    path = _h5(tmp_path / 'in.h5', [1, 2, 3], [0, 1, 3], ['x', 'y'])
    (_, batch), = InputStream(path, VOCAB, defaults=DEFAULTS).batches(budget=None)
    assert batch.params == (DEFAULTS, DEFAULTS)
    assert read_inputs(path, VOCAB).params == (SamplingParams(),) * 2


def test_an_unknown_key_lists_the_allowed_ones(tmp_path):
    msg = _error(tmp_path, {'id': 'b', 'tokens': [1], 'temprature': 0.5})
    assert msg.endswith("id 'b': unknown key \"temprature\"; a line has the keys id, one of "
                        'tokens/prompt/messages, and max_tokens, temperature, top_k, top_p, '
                        'seed, stop_token_ids, ignore_eos, stop'), msg


@pytest.mark.parametrize('key, value, allowed', [
    ('max_tokens', True, 'an integer >= 0'),
    ('max_tokens', -1, 'an integer >= 0'),
    ('max_tokens', 2.0, 'an integer >= 0'),
    ('temperature', -0.1, 'a number in [0, 100] (0: greedy)'),
    ('temperature', 100.5, 'a number in [0, 100]'),
    ('temperature', float('nan'), 'a number in [0, 100]'),
    ('temperature', float('inf'), 'a number in [0, 100]'),
    ('temperature', '0.5', 'a number in [0, 100]'),
    ('temperature', False, 'a number in [0, 100]'),
    ('top_k', 257, 'an integer in [0, vocab_size=256] (0: off)'),
    ('top_k', -1, 'an integer in [0, vocab_size=256]'),
    ('top_p', 0, 'a number in (0, 1]'),
    ('top_p', 1.01, 'a number in (0, 1]'),
    ('seed', -1, 'an integer in [0, 2^63)'),
    ('seed', 2 ** 63, 'an integer in [0, 2^63)'),
    ('seed', None, 'an integer in [0, 2^63)'),
    ('stop_token_ids', [1, 256], 'a list of at most 64 token ids in [0, vocab_size=256)'),
    ('stop_token_ids', [-1], 'a list of at most 64 token ids'),
    ('stop_token_ids', [True], 'a list of at most 64 token ids'),
    ('stop_token_ids', 5, 'a list of at most 64 token ids'),
    ('stop_token_ids', [1] * 65, 'a list of at most 64 token ids'),
    ('stop', '', 'a string or a list of at most 16 strings, each of 1 to 256 characters'),
    ('stop', ['a'] * 17, 'a string or a list of at most 16 strings'),
    ('stop', [1], 'a string or a list of at most 16 strings'),
    ('stop', ['x' * 257], 'a string or a list of at most 16 strings'),
    ('ignore_eos', 1, 'true or false'),
    ('ignore_eos', 'true', 'true or false'),
])
def test_a_bad_value_names_the_line_id_key_value_and_range(tmp_path, key, value, allowed):
    msg = _error(tmp_path, {'id': 'b', 'tokens': [1], key: value})
    shown = json.dumps(value)
    shown = shown if len(shown) <= 60 else shown[:57] + '...'
    assert f"id 'b': \"{key}\" = {shown}: must be {allowed}" in msg, msg


def test_a_bad_value_on_the_last_line_is_found_at_open(tmp_path):
    lines = [{'id': f's{i}', 'tokens': [1]} for i in range(3000)]
    path = _jsonl(tmp_path / 'in.jsonl', [json.dumps(x) for x in lines] +
                  ['{"id": "z", "tokens": [1], "top_p": 2}'])
    with pytest.raises(DataError, match=':3001: id \'z\': "top_p" = 2: must be'):
        InputStream(path, VOCAB)


@pytest.mark.parametrize('defaults, message', [
    (SamplingParams(top_k=300), '--top-k 300: must be an integer in [0, vocab_size=256]'),
    (SamplingParams(temperature=-1.0), '--temperature -1.0: must be a number in [0, 100]'),
    (SamplingParams(stop_token_ids=(2, 999)), '--stop-token-ids 2,999: must be a list of'),
    (SamplingParams(seed=-3), '--seed -3: must be an integer in [0, 2^63)'),
])
def test_bad_defaults_name_the_option(tmp_path, defaults, message):
    with pytest.raises(UsageError) as e:
        _stream(tmp_path, [{'id': 'a', 'tokens': [1]}], defaults=defaults)
    assert str(e.value).startswith(message), e.value


# --- the context, per sequence ---------------------------------------------

def test_each_prompt_fits_the_context_with_its_own_max_tokens(tmp_path):
    """Context 32, default 4 new tokens: a 30-token prompt fits only with its
    own max_tokens <= 2, and a line's larger max_tokens is refused naming it."""
    long = {'id': 'long', 'tokens': [1] * 30}
    stream = _stream(tmp_path, [{**long, 'max_tokens': 2}, {'id': 'b', 'tokens': [1] * 28}],
                     defaults=DEFAULTS, context=32)
    assert [p.max_tokens for _, b in stream.batches(None) for p in b.params] == [2, 4]
    msg = _error(tmp_path, {**long, 'max_tokens': 3}, defaults=DEFAULTS, context=32)
    assert ("id 'long': 30 prompt tokens + 3 new (\"max_tokens\" of the line) = 33 exceed the "
            'context length of the model (max_position_embeddings = 32); shorten the prompt '
            'or lower "max_tokens" of the line') in msg, msg
    msg = _error(tmp_path, long, defaults=DEFAULTS, context=32)
    assert '30 prompt tokens + 4 new (--max-new-tokens) = 34 exceed' in msg
    assert 'lower --max-new-tokens' in msg


def test_a_small_max_tokens_does_not_lift_the_batch_budget(tmp_path):
    msg = _error(tmp_path, {'id': 'b', 'tokens': [1] * 9, 'max_tokens': 0}, batch_tokens=8)
    assert "id 'b': 9 prompt tokens exceed --max-batch-tokens 8" in msg


# --- identity: the defaults of a run ---------------------------------------

def test_the_defaults_are_the_outputs_identity(tmp_path, tiny_weights):
    inp = _jsonl(tmp_path / 'in.jsonl', ['{"id": "a", "tokens": [1, 2]}'])
    out = tmp_path / 'out.h5'
    opts = JobOptions(weights=tiny_weights, input=str(inp), output=str(out), max_new_tokens=2,
                      temperature=0.5, top_p=0.9, seed=4, stop_token_ids='7,8',
                      max_batch_tokens=64)
    with WeightFile(tiny_weights) as wf:
        _, writer = open_job(opts, wf, {})
        assert {k: writer.identity[k] for k in (
            'max_new_tokens', 'temperature', 'top_k', 'top_p', 'seed', 'stop_token_ids',
            'ignore_eos', 'batch_tokens')} == {
            'max_new_tokens': 2, 'temperature': 0.5, 'top_k': 0, 'top_p': 0.9, 'seed': 4,
            'stop_token_ids': '7,8', 'ignore_eos': 0, 'batch_tokens': 64}
        with pytest.raises(KeyboardInterrupt), writer:
            raise KeyboardInterrupt                     # a run stopped: its manifest stays
        for change, said in ((dict(temperature=0.7), 'temperature 0.5 then, 0.7 now'),
                             (dict(stop_token_ids='7'), "stop_token_ids '7,8' then, '7' now"),
                             (dict(ignore_eos=True), 'ignore_eos 0 then, 1 now'),
                             (dict(max_seqs=3), 'max_seqs 256 then, 3 now')):
            with pytest.raises(DataError, match=said):
                open_job(dataclasses.replace(opts, **change), wf, {})
        # the same --chunk-tokens on 2 front-end groups: the chunks are twice as long
        with pytest.raises(DataError, match=r'chunk_tokens \(--chunk-tokens, default 16 x '
                                            r'--max-batch-tokens, x front-end groups\) 1024 '
                                            r'then, 2048 now'):
            open_job(opts, wf, {}, 2)
        _, again = open_job(opts, wf, {})
        with again:
            assert again.written == 0
            again.write([0], ['a'], [np.array([3, 4])], finish_reasons=['length'],
                        prompt_tokens=[2])
