"""Text in, text out, end to end through the CLI: text, chat and token
requests with stop strings on the reference and on the distributed engine;
the text of every result is the decode of its tokens cut before its stop
string; OpenAI batch input gives the OpenAI batch output shape with the
same results as the same requests in mpimoe's shape; a stopped JSONL output
resumes byte for byte into the uninterrupted one.  Every job has a timeout."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contract import assert_matches_reference
from mpirun import mpiexec
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.io.outputs import read_outputs
from mpimoe.model.config import model_config
from mpimoe.text.stops import cut_text
from mpimoe.text.tokenizer import TextTokenizer, read_tokenizer_files

#: requests of each kind; single letters as stop strings, so that the random
#: model's text meets some of them
REQUESTS = [
    {'id': 'p1', 'prompt': 'Hello world!', 'stop': ['e', 'o']},
    {'id': 'c1', 'messages': [{'role': 'user', 'content': 'How are you today?'}],
     'stop': 'a'},
    {'id': 't1', 'tokens': [5, 6, 7], 'stop': ['t', 'r']},
    {'id': 'p2', 'prompt': 'The quick brown fox', 'temperature': 0.8, 'seed': 7},
    {'id': 'c2', 'messages': [{'role': 'system', 'content': 'You route tokens.'},
                              {'role': 'user', 'content': 'STOP here.'}], 'max_tokens': 5},
    {'id': 'p3', 'prompt': 'é ü ß 日本', 'stop': ['s', 'n', 'e']},
]
ARGS = ['--max-new-tokens', '12']


@pytest.fixture(scope='module')
def text_weights(tmp_path_factory, bpe_tokenizer_dir):
    """The tiny model with the test tokenizer in its weight file."""
    path = tmp_path_factory.mktemp('text') / 'tiny-text.h5'
    write_synthetic(model_config('tiny', ['eos_token_id=1']), str(path), seed=0,
                    tokenizer_files=read_tokenizer_files(bpe_tokenizer_dir))
    return str(path)


@pytest.fixture(scope='module')
def tok(bpe_tokenizer_dir):
    return TextTokenizer(read_tokenizer_files(bpe_tokenizer_dir), 'test')


def _jsonl(path, lines):
    path.write_text(''.join(json.dumps(x, ensure_ascii=False) + '\n' for x in lines),
                    encoding='utf-8')
    return path


def _openai(req):
    """The same request as an OpenAI batch line."""
    body = {k: v for k, v in req.items() if k not in ('id', 'tokens')}
    if 'tokens' in req:
        body['prompt'] = req['tokens']
    chat = 'messages' in req
    return {'custom_id': req['id'], 'method': 'POST', 'body': {'model': 'tiny', **body},
            'url': '/v1/chat/completions' if chat else '/v1/completions'}


def _reference(weights, inputs, out, *extra):
    done = subprocess.run([sys.executable, '-m', 'mpimoe', 'reference', '--weights', weights,
                           '--input', inputs, '--output', out, *ARGS, *extra],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return read_outputs(out)


def _run(weights, inputs, out, *extra):
    proc = mpiexec(4, ['run', '--weights', weights, '--input', inputs, '--output', out,
                       '--placement', 'packed:4', '--frontends', '2', *ARGS, *extra],
                   timeout=240)
    assert proc.returncode == 0, proc.stderr
    return read_outputs(out)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory, text_weights):
    """(inputs, reference .h5, run .jsonl, run of the OpenAI lines .jsonl)."""
    d = tmp_path_factory.mktemp('texts')
    inputs = _jsonl(d / 'in.jsonl', REQUESTS)
    openai = _jsonl(d / 'openai.jsonl', [_openai(r) for r in REQUESTS])
    return (inputs, _reference(text_weights, inputs, d / 'ref.h5'),
            _run(text_weights, inputs, d / 'run.jsonl'),
            _run(text_weights, openai, d / 'openai-out.jsonl'), d)


def _stops(req):
    s = req.get('stop', ())
    return (s,) if isinstance(s, str) else tuple(s)


@pytest.mark.timeout(600)
def test_text_is_the_decode_of_the_tokens_cut_before_the_stop(outputs, tok):
    _, ref, run, _, _ = outputs
    for got in (ref, run):
        assert got['ids'] == [r['id'] for r in REQUESTS]
        for req, text, tokens, why in zip(REQUESTS, got['text'], got['generated'],
                                          got['finish_reason']):
            stops = _stops(req)
            assert text == cut_text(tok, tokens, stops)
            assert not any(s in text for s in stops)
            if why == 'length':
                assert text == tok.decode(tokens)
    # the stop strings did stop some sequences, before their max_tokens
    cut = [i for i, r in enumerate(REQUESTS) if _stops(r) and ref['finish_reason'][i] == 'stop'
           and ref['generated'][i][-1] != 1]
    assert cut, (ref['text'], ref['finish_reason'])
    assert all(len(ref['generated'][i]) < 12 for i in cut)


@pytest.mark.timeout(600)
def test_the_engine_gives_the_references_tokens_and_text(outputs, text_weights):
    inputs, ref, run, _, _ = outputs
    assert_matches_reference(run, ref, text_weights, inputs)
    assert run['prompt_tokens'].tolist() == ref['prompt_tokens'].tolist()


@pytest.mark.timeout(600)
def test_openai_batch_round_trip(outputs):
    _, _, run, openai, d = outputs
    assert openai['ids'] == run['ids'] and openai['text'] == run['text']
    assert openai['finish_reason'] == run['finish_reason']
    assert openai['completion_tokens'].tolist() == run['completion_tokens'].tolist()
    lines = [json.loads(x) for x in (d / 'openai-out.jsonl').read_text().splitlines()]
    assert [x['response']['body']['object'] for x in lines] == [
        'chat.completion' if 'messages' in r else 'text_completion' for r in REQUESTS]
    assert {x['response']['body']['model'] for x in lines} == {'tiny'}


def test_show_prints_prompts_and_text(outputs):
    inputs, _, run, _, d = outputs
    done = subprocess.run([sys.executable, '-m', 'mpimoe', 'show', d / 'run.jsonl', '--input',
                           inputs, '--id', 'c2'], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    i = run['ids'].index('c2')
    assert done.stdout.startswith(f'== c2   {run["finish_reason"][i]}, ')
    assert 'prompt:\n  system: You route tokens.\n  user: STOP here.\n' in done.stdout
    assert done.stdout.endswith('text:\n' + (
        '\n'.join('  ' + x for x in run['text'][i].split('\n')) if run['text'][i]
        else '  (empty)') + '\n')


@pytest.mark.timeout(300)
def test_a_stopped_jsonl_output_resumes_byte_for_byte(text_weights, tmp_path):
    """The reference stopped by SIGTERM after its first committed chunk, rerun:
    the same bytes as an uninterrupted run (chunks of 1 to 3 sequences)."""
    inputs = _jsonl(tmp_path / 'in.jsonl', [{**r, 'max_tokens': 150} for r in REQUESTS])
    extra = ['--chunk-tokens', '40', '--max-batch-tokens', '64', '--ignore-eos']
    whole = tmp_path / 'whole.jsonl'
    _reference(text_weights, inputs, whole, *extra)
    out = tmp_path / 'out.jsonl'
    cmd = [sys.executable, '-m', 'mpimoe', 'reference', '--weights', text_weights, '--input',
           inputs, '--output', out, *ARGS, *extra]
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) as proc:
        t0 = time.monotonic()
        chunks = Path(str(out) + '.chunks')
        while not list(chunks.glob('*.h5')) and proc.poll() is None:
            assert time.monotonic() - t0 < 120
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=60)[1]
    if proc.returncode == 0:
        pytest.skip('the run ended before the signal arrived')
    assert proc.returncode == 75, err
    assert not out.exists()
    _reference(text_weights, inputs, out, *extra)
    assert out.read_bytes() == whole.read_bytes()


def test_show_notes_an_edited_input(outputs, tmp_path):
    inputs, _, _, _, d = outputs
    edited = tmp_path / 'edited.jsonl'
    edited.write_text(inputs.read_text().replace('Hello world!', 'Goodbye'))
    done = subprocess.run([sys.executable, '-m', 'mpimoe', 'show', d / 'ref.h5', '--input',
                           edited, '--limit', '1'], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f'note: {edited} is not the input {d / "ref.h5"} was made '
                                  'from (its sha256 differs)'), done.stdout
