"""Text, chat and OpenAI batch input lines (mpimoe/io/jsonl.py,
openai_batch.py): prompts and chats are encoded by the checkpoint's tokenizer
to the ids the `tokenizers` library and transformers give for the same files;
OpenAI batch lines become requests with their settings, id and (endpoint,
model); every refusal is one line naming the file, the line and the id,
found when the file is opened, before any batch."""

import json
import os

import pytest

from tokenizers import Tokenizer

from mpimoe.errors import DataError, UsageError
from mpimoe.io.inputs import InputStream, read_inputs
from mpimoe.runtime.request import SamplingParams
from mpimoe.text.tokenizer import TextTokenizer, read_tokenizer_files
from bpe import write_bpe
from test_inputs import _h5

VOCAB = 256
TEXTS = ['Hello world! How are you today?', 'The quick brown fox jumps over the lazy dog.',
         ' leading space, unseen words: zebra', 'é ü ß 日本 ∑',
         'STOP here.\n\nNew paragraph']
CHAT = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [[{'role': 'user', 'content': 'Hello world!'}],
         [{'role': 'system', 'content': 'Route tokens to experts.'},
          {'role': 'user', 'content': 'How are you today?'},
          {'role': 'assistant', 'content': 'The end.'},
          {'role': 'user', 'content': 'é ü ß 日本'}]]


def write_tokenizer(folder, chat_template=CHAT, **config):
    """tests/bpe.py's tokenizer in ``folder``; -> folder (str)."""
    return str(write_bpe(folder, chat_template=chat_template, **config))


def text_tokenizer(folder):
    return TextTokenizer(read_tokenizer_files(folder), folder)


@pytest.fixture(scope='module')
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp('tokenizer'))


@pytest.fixture(scope='module')
def tok(tok_dir):
    return text_tokenizer(tok_dir)


def _file(tmp_path, lines, name='in.jsonl'):
    path = tmp_path / name
    path.write_text(''.join((json.dumps(x) if isinstance(x, dict) else x) + '\n'
                            for x in lines), encoding='utf-8')
    return path


def _batch(path, tok, **kwargs):
    stream = InputStream(path, VOCAB, tokenizer=tok, **kwargs)
    (_, batch), = stream.batches(budget=None)
    return stream, batch


def _seqs(batch):
    return [batch.seq(i).tolist() for i in range(len(batch))]


def _openai(custom_id, body, url='/v1/completions'):
    return {'custom_id': custom_id, 'method': 'POST', 'url': url, 'body': body}


# --- ids: as the tokenizers library and transformers give them ------------

def test_prompts_encode_as_the_tokenizers_library_and_transformers(tmp_path, tok_dir, tok):
    path = _file(tmp_path, [{'id': f't{i}', 'prompt': t} for i, t in enumerate(TEXTS)])
    stream, batch = _batch(path, tok)
    library = Tokenizer.from_file(os.path.join(tok_dir, 'tokenizer.json'))
    expected = [library.encode(t).ids for t in TEXTS]
    assert _seqs(batch) == expected and {s[0] for s in expected} == {0}     # <s> first
    assert batch.ids == [f't{i}' for i in range(len(TEXTS))] and not stream.openai
    assert batch.openai is None and batch.params == (SamplingParams(),) * len(TEXTS)
    transformers = pytest.importorskip('transformers')
    auto = transformers.AutoTokenizer.from_pretrained(tok_dir)
    assert _seqs(batch) == [auto(t).input_ids for t in TEXTS]


def test_add_bos_token_of_the_config_decides_the_bos(tmp_path):
    no_bos = text_tokenizer(write_tokenizer(tmp_path / 'tok', add_bos_token=False))
    path = _file(tmp_path, [{'id': 'a', 'prompt': TEXTS[0]}])
    _, batch = _batch(path, no_bos)
    library = Tokenizer.from_file(str(tmp_path / 'tok' / 'tokenizer.json'))
    assert _seqs(batch) == [library.encode(TEXTS[0], add_special_tokens=False).ids]


def test_chats_encode_as_transformers_apply_chat_template(tmp_path, tok_dir, tok):
    path = _file(tmp_path, [{'id': f'c{i}', 'messages': m} for i, m in enumerate(CHATS)])
    _, batch = _batch(path, tok)
    library = Tokenizer.from_file(os.path.join(tok_dir, 'tokenizer.json'))
    by_hand = ['<s>' + ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n'
                               for m in chat) + '<|im_start|>assistant\n' for chat in CHATS]
    assert _seqs(batch) == [library.encode(t, add_special_tokens=False).ids for t in by_hand]
    transformers = pytest.importorskip('transformers')
    auto = transformers.AutoTokenizer.from_pretrained(tok_dir)
    expected = [auto.apply_chat_template(m, add_generation_prompt=True, return_dict=True)
                ['input_ids'] for m in CHATS]
    assert _seqs(batch) == expected


def test_text_lines_take_their_settings_and_mix_with_token_lines(tmp_path, tok):
    defaults = SamplingParams(max_tokens=4, temperature=0.5, stop=('\n',))
    path = _file(tmp_path, [{'id': 'a', 'tokens': [7, 8]},
                            {'id': 'b', 'prompt': TEXTS[0], 'stop': ['END', '.'], 'seed': 3},
                            {'id': 'c', 'messages': CHATS[0], 'max_tokens': 9, 'stop': 'x'}])
    _, batch = _batch(path, tok, defaults=defaults)
    assert batch.params == (defaults, SamplingParams(max_tokens=4, temperature=0.5, seed=3,
                                                     stop=('END', '.')),
                            SamplingParams(max_tokens=9, temperature=0.5, stop=('x',)))
    assert _seqs(batch) == [[7, 8], tok.encode_prompt(TEXTS[0]), tok.encode_chat(CHATS[0])]


def test_batches_encode_again_a_batch_at_a_time(tmp_path, tok):
    lines = [{'id': f's{i}', 'prompt': TEXTS[i % len(TEXTS)]} for i in range(12)]
    stream = InputStream(_file(tmp_path, lines), VOCAB, tokenizer=tok)
    budget = max(len(tok.encode_prompt(t)) for t in TEXTS) + 1
    batches = list(stream.batches(budget))
    assert len(batches) > 2 and all(b.lengths.sum() <= budget for _, b in batches)
    assert [s for _, b in batches for s in _seqs(b)] == \
        [tok.encode_prompt(TEXTS[i % len(TEXTS)]) for i in range(12)]
    later = list(stream.batches(budget, start=batches[1][0]))
    assert [f for f, _ in later] == [f for f, _ in batches[1:]]
    assert read_inputs(stream.path, VOCAB, tokenizer=tok).ids == [f's{i}' for i in range(12)]


def test_hdf5_inputs_are_unchanged_with_a_tokenizer(tmp_path, tok):
    stream, batch = _batch(_h5(tmp_path / 'in.h5', [1, 2, 3], [0, 1, 3], ['x', 'y']), tok)
    assert _seqs(batch) == [[1], [2, 3]] and batch.openai is None and not stream.openai


# --- OpenAI batch lines ---------------------------------------------------

def test_openai_completions_lines(tmp_path, tok):
    every = {'max_tokens': 5, 'temperature': 0.5, 'top_p': 0.9, 'seed': 7, 'stop': 'END',
             'top_k': 3, 'stop_token_ids': [4, 9], 'ignore_eos': True}
    path = _file(tmp_path, [
        _openai('c1', {'model': 'tiny-moe', 'prompt': TEXTS[0], **every, 'n': 1,
                       'stream': False, 'user': 'someone'}),
        _openai('c2', {'prompt': [5, 6, 7], 'max_tokens': None, 'seed': None}),
        _openai('c3', {'model': 'm', 'prompt': [TEXTS[1]], 'top_k': -1, 'stop': ['a', 'b']})])
    defaults = SamplingParams(max_tokens=2, top_k=8, seed=1)
    stream, batch = _batch(path, tok, defaults=defaults)
    assert stream.openai and batch.ids == ['c1', 'c2', 'c3']
    assert batch.openai == (('completions', 'tiny-moe'), ('completions', ''),
                            ('completions', 'm'))
    assert batch.params == (SamplingParams(max_tokens=5, temperature=0.5, top_p=0.9, seed=7,
                                           stop=('END',), top_k=3, stop_token_ids=(4, 9),
                                           ignore_eos=True),
                            defaults, SamplingParams(max_tokens=2, top_k=0, seed=1,
                                                     stop=('a', 'b')))
    assert _seqs(batch) == [tok.encode_prompt(TEXTS[0]), [5, 6, 7], tok.encode_prompt(TEXTS[1])]


def test_openai_chat_lines_and_both_endpoints_in_one_file(tmp_path, tok):
    path = _file(tmp_path, [
        _openai('q1', {'model': 'chat-m', 'messages': CHATS[1], 'max_completion_tokens': 6,
                       'temperature': 0}, url='/v1/chat/completions'),
        _openai('q2', {'messages': CHATS[0], 'max_tokens': 3, 'stop': '\n'},
                url='/v1/chat/completions'),
        _openai('q3', {'model': 'base', 'prompt': TEXTS[2]})])
    stream, batch = _batch(path, tok)
    assert stream.openai and batch.ids == ['q1', 'q2', 'q3']
    assert batch.openai == (('chat', 'chat-m'), ('chat', ''), ('completions', 'base'))
    assert batch.params == (SamplingParams(max_tokens=6), SamplingParams(max_tokens=3,
                                                                         stop=('\n',)),
                            SamplingParams())
    assert _seqs(batch) == [tok.encode_chat(CHATS[1]), tok.encode_chat(CHATS[0]),
                            tok.encode_prompt(TEXTS[2])]


def test_openai_token_id_prompts_need_no_tokenizer(tmp_path):
    path = _file(tmp_path, [_openai('a', {'prompt': [1, 2], 'max_tokens': 1})])
    inp = read_inputs(path, VOCAB)
    assert inp.tokens.tolist() == [1, 2] and inp.openai == (('completions', ''),)


# --- refusals ---------------------------------------------------------------

def _refusal(path, tokenizer, **kwargs):
    with pytest.raises(DataError) as e:
        InputStream(path, VOCAB, tokenizer=tokenizer, **kwargs)
    msg = str(e.value)
    assert '\n' not in msg and len(msg) < 400, msg
    return msg


NEEDS = 'needs a tokenizer: the weight file has none; pass --tokenizer PATH'
GOOD = {'id': 'a', 'tokens': [1]}
GOOD_OPENAI = _openai('a', {'prompt': [1]})
CHAT_URL = '/v1/chat/completions'


@pytest.mark.parametrize('line, with_tok, expected', [
    ({'id': 'b', 'prompt': 'Hi'}, False, f'a text prompt ("prompt") {NEEDS}'),
    ({'id': 'b', 'messages': CHATS[0]}, False, f'a chat ("messages") {NEEDS}'),
    ({'id': 'b', 'tokens': [1], 'stop': 'x'}, False,
     '"stop" strings need a tokenizer (they are looked for in the generated text): the '
     'weight file has none; pass --tokenizer PATH'),
    ({'id': 'b', 'messages': []}, True, '"messages" must be a non-empty list'),
    ({'id': 'b', 'messages': 'Hi'}, True, '"messages" must be a non-empty list'),
    ({'id': 'b', 'messages': [{'content': 'x'}]}, True, 'messages[0] has no string "role"'),
    ({'id': 'b', 'messages': ['x']}, True, 'messages[0] is not an object'),
    ({'id': 'b', 'messages': [{'role': 'user', 'content': 5}]}, True,
     'messages[0].content must be a string, null or a list'),
    ({'id': 'b', 'prompt': [1, 2]}, True, '"prompt" must be a string (text), got [...]; token '
                                          'ids go in "tokens"'),
    ({'id': 'b', 'tokens': [1], 'prompt': 'x'}, True, 'both "tokens" and "prompt"; give one'),
    ({'id': 'b', 'prompt': 'x', 'messages': CHATS[0]}, True, 'both "prompt" and "messages"'),
    ({'id': 'b', 'max_tokens': 1}, True, 'missing key "tokens" (token ids), or "prompt" (text) '
                                         'or "messages" (a chat)'),
    ({'id': 'b', 'prompt': 'x', 'stop': ''}, True, '"stop" = "": must be a string or a list'),
    ({'id': 'b', 'prompt': 'x', 'logprobs': 1}, True, 'unknown key "logprobs"; a line has the '
                                                      'keys id, one of tokens/prompt/messages'),
])
def test_mpimoe_line_refusals(tmp_path, tok, line, with_tok, expected):
    path = _file(tmp_path, [GOOD, line])
    msg = _refusal(path, tok if with_tok else None)
    assert msg.startswith(f"{path}:2: id 'b': ") and expected in msg, msg


@pytest.mark.parametrize('line, expected', [
    (_openai('b', {'prompt': 'x', 'logprobs': 2}),
     'body key "logprobs" is not supported; a /v1/completions body has model, prompt, '
     'max_tokens, temperature, top_p, seed, stop, top_k, stop_token_ids, ignore_eos, n, '
     'stream, user'),
    (_openai('b', {'prompt': 'x', 'logit_bias': {'5': 1}}), 'body key "logit_bias" is not'),
    (_openai('b', {'prompt': 'x', 'presence_penalty': 0.5}), 'body key "presence_penalty"'),
    (_openai('b', {'prompt': 'x', 'max_completion_tokens': 5}),
     'body key "max_completion_tokens" is not supported'),
    (_openai('b', {'messages': CHATS[0], 'tools': []}, CHAT_URL),
     'body key "tools" is not supported; a /v1/chat/completions body has model, messages, '
     'max_tokens, max_completion_tokens, temperature'),
    (_openai('b', {'messages': CHATS[0], 'response_format': {}}, CHAT_URL),
     'body key "response_format"'),
    (_openai('b', {'prompt': 'x'}, CHAT_URL), 'body key "prompt" is not supported'),
    (_openai('b', {'messages': CHATS[0], 'max_tokens': 2, 'max_completion_tokens': 2},
             CHAT_URL), 'body has both "max_tokens" and "max_completion_tokens"; give one'),
    (_openai('b', {'messages': CHATS[0], 'max_completion_tokens': -1}, CHAT_URL),
     '"max_completion_tokens" = -1: must be an integer >= 0'),
    (_openai('b', {'prompt': 'x', 'temperature': 300}), '"temperature" = 300: must be a number'),
    (_openai('b', {'prompt': 'x', 'stop': ['a', 3]}), '"stop" = ["a", 3]: must be a string'),
    (_openai('b', {'prompt': 'x', 'n': 2}), 'body "n" = 2: must be 1'),
    (_openai('b', {'prompt': 'x', 'stream': True}), 'body "stream" = true: must be false'),
    (_openai('b', {'prompt': 'x', 'model': 5}), 'body "model" must be a string, got 5'),
    (_openai('b', {'max_tokens': 3}), 'body has no "prompt"'),
    (_openai('b', {}, CHAT_URL), 'body has no "messages"'),
    (_openai('b', {'prompt': ['x', 'y']}), 'body "prompt" holds 2 prompts; a batch line is one '
                                          'request'),
    (_openai('b', {'prompt': [[1, 2]]}), 'body "prompt" must be a string, a list of token ids '
                                         'or a list of one string'),
    (_openai('b', {'prompt': [1, 999]}), 'token 999 at prompt[1] is not in [0, vocab_size=256)'),
    (_openai('b', {'prompt': []}), 'empty sequence ("prompt" is [])'),
    (_openai('b', {'messages': [{'role': 'user'}, 7]}, CHAT_URL), 'messages[1] is not an object'),
    (_openai('b', {'prompt': 'x'}, '/v1/embeddings'),
     '"url" = "/v1/embeddings": not served; use /v1/completions or /v1/chat/completions'),
    ({**_openai('b', {'prompt': 'x'}), 'method': 'GET'}, '"method" = "GET": must be "POST"'),
    ({**_openai('b', {'prompt': 'x'}), 'body': 'x'}, '"body" must be an object, got "x"'),
    (_openai('a', {'prompt': 'x'}), "duplicate id 'a' (first on line 1)"),
])
def test_openai_line_refusals(tmp_path, tok, line, expected):
    path = _file(tmp_path, [GOOD_OPENAI, line])
    msg = _refusal(path, tok)
    assert msg.startswith(f"{path}:2: ") and expected in msg, msg
    assert msg.startswith(f"{path}:2: id '{line['custom_id']}'") or 'duplicate' in msg, msg


@pytest.mark.parametrize('line, expected', [
    ({'custom_id': 'b', 'method': 'POST', 'body': {}}, 'missing key "url" of an OpenAI batch '
                                                       'line ({custom_id, method, url, body})'),
    ({**_openai('b', {'prompt': 'x'}), 'id': 'b'}, 'unknown key "id"; an OpenAI batch line'),
    ({**_openai('b', {'prompt': 'x'}), 'extra': 1}, 'unknown key "extra"; an OpenAI batch line '
                                                    'has the keys custom_id, method, url, body'),
    ({**_openai('b', {'prompt': 'x'}), 'custom_id': 5}, '"custom_id" must be a string, got 5'),
    ({**_openai('b', {'prompt': 'x'}), 'custom_id': 'x\0'}, "id 'x\\x00' contains NUL"),
])
def test_openai_envelope_refusals(tmp_path, tok, line, expected):
    path = _file(tmp_path, [GOOD_OPENAI, line])
    msg = _refusal(path, tok)
    assert msg.startswith(f"{path}:2: ") and expected in msg, msg


def test_a_chat_without_a_template_and_a_failing_template(tmp_path):
    plain = text_tokenizer(write_tokenizer(tmp_path / 'plain', chat_template=None))
    path = _file(tmp_path, [GOOD, {'id': 'b', 'messages': CHATS[0]}])
    msg = _refusal(path, plain)
    assert msg.startswith(f"{path}:2: id 'b': the tokenizer ({tmp_path / 'plain'}) has no chat "
                          'template; send "prompt" text'), msg
    strict = text_tokenizer(write_tokenizer(
        tmp_path / 'strict', chat_template="{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}x"))
    path = _file(tmp_path, [{'id': 'a', 'messages': CHATS[0]}, {'id': 'b', 'messages': CHATS[1]}])
    msg = _refusal(path, strict)
    assert msg == f"{path}:2: id 'b': chat template failed: System role not supported", msg


def test_a_prompt_that_encodes_to_nothing_is_refused(tmp_path, tok):
    no_bos = text_tokenizer(write_tokenizer(tmp_path / 'tok', add_bos_token=False))
    path = _file(tmp_path, [{'id': 'a', 'prompt': 'x'}, {'id': 'b', 'prompt': ''}])
    msg = _refusal(path, no_bos)
    assert msg == (f"{path}:2: id 'b': \"prompt\" encodes to no tokens (and the tokenizer adds "
                   'no BOS); give some text'), msg
    assert _seqs(_batch(path, tok)[1]) == [tok.encode_prompt('x'), [0]]      # its BOS alone


@pytest.mark.parametrize('kind, other, expected', [
    (GOOD, GOOD_OPENAI, 'an OpenAI batch line in a file of mpimoe lines ({"id": ...}, as line '
                        '1); a file holds one kind of line'),
    (GOOD_OPENAI, {'id': 'b', 'prompt': 'x'}, 'an mpimoe line ({"id": ...}) in a file of '
                                              'OpenAI batch lines (as line 1); a file holds one '
                                              'kind of line'),
])
def test_a_mix_of_kinds_is_refused_at_the_first_line_of_the_other(tmp_path, tok, kind, other,
                                                                   expected):
    again = {'id': 'c', 'tokens': [2]} if 'id' in kind else _openai('c', {'prompt': [2]})
    path = _file(tmp_path, [kind, '', again, other, kind])
    assert _refusal(path, tok) == f'{path}:4: {expected}'


@pytest.mark.parametrize('last, expected', [
    ({'id': 'z', 'messages': [{'role': 'user'}, {'content': 'x'}]}, 'messages[1] has no string'),
    ({'id': 'z', 'prompt': TEXTS[0], 'top_p': 2}, '"top_p" = 2: must be'),
    ({'id': 's7', 'prompt': 'again'}, "duplicate id 's7' (first on line 8)"),
    (_openai('z', {'prompt': 'x'}), 'an OpenAI batch line in a file of mpimoe lines'),
])
def test_a_bad_line_far_down_is_refused_at_open(tmp_path, tok, last, expected):
    """3000 text and chat lines, the last one bad: opening the stream (before
    any batch is read) refuses it."""
    lines = [{'id': f's{i}', 'prompt': TEXTS[i % 5]} if i % 2 else
             {'id': f's{i}', 'messages': CHATS[i % 2]} for i in range(3000)]
    msg = _refusal(_file(tmp_path, lines + [last]), tok)
    assert ':3001: ' in msg and expected in msg, msg


# --- lengths of encoded prompts ---------------------------------------------

@pytest.mark.parametrize('key', ['prompt', 'messages'])
def test_encoded_prompts_must_fit_the_context_the_step_and_the_kv_cache(tmp_path, tok, key):
    value = TEXTS[1] * 3 if key == 'prompt' else [{'role': 'user', 'content': TEXTS[1] * 3}]
    n = len(tok.encode_prompt(value) if key == 'prompt' else tok.encode_chat(value))
    path = _file(tmp_path, [{'id': 'a', 'prompt': 'Hi'}, {'id': 'b', key: value}])
    defaults = SamplingParams(max_tokens=4)
    assert len(InputStream(path, VOCAB, context=n + 4, batch_tokens=n, kv_tokens=n + 4,
                           defaults=defaults, tokenizer=tok)) == 2
    msg = _refusal(path, tok, context=n + 3, defaults=defaults)
    assert f"{path}:2: id 'b': {n} prompt tokens + 4 new (--max-new-tokens) = {n + 4} exceed " \
        'the context length' in msg, msg
    assert f'{n} prompt tokens exceed --max-batch-tokens {n - 1}' in \
        _refusal(path, tok, batch_tokens=n - 1)
    room = 16 * (-(-(n + 3) // 16))         # whole KV blocks of 16 tokens
    assert 'exceed the KV cache of a front-end' in \
        _refusal(path, tok, kv_tokens=n + 3, defaults=SamplingParams(max_tokens=room - n + 1))


# --- the tokenizer and the run's defaults -----------------------------------

def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(tmp_path, tok):
    path = _file(tmp_path, [{'id': 'a', 'prompt': 'x'}])
    with pytest.raises(DataError, match='beyond the vocabulary of the model \\(vocab_size = 100'):
        InputStream(path, 100, tokenizer=tok)


def test_default_stop_strings_need_a_tokenizer(tmp_path, tok):
    path = _file(tmp_path, [GOOD])
    with pytest.raises(UsageError, match='^--stop needs a tokenizer .*pass --tokenizer PATH$'):
        InputStream(path, VOCAB, defaults=SamplingParams(stop=('END',)))
    assert len(InputStream(path, VOCAB, defaults=SamplingParams(stop=('END',)), tokenizer=tok)) == 1


@pytest.mark.parametrize('line, key', [
    ({'id': 'b', 'prompt': 'ab\ud800cd'}, 'prompt'),
    ({'id': 'b', 'messages': [{'role': 'user', 'content': 'x\udfff'}]}, 'messages[0].content'),
    ({'id': 'b', 'messages': [{'role': 'u\ud800', 'content': 'x'}]}, 'messages[0].role'),
    ({'id': 'b', 'prompt': 'x', 'stop': ['ok', '\ud800']}, 'stop[1]'),
    (_openai('b', {'prompt': 'x', 'model': 'm\ud800'}), 'body.model'),
])
def test_a_lone_surrogate_is_refused_at_open_naming_its_key(tmp_path, tok, line, key):
    """Half of a UTF-16 pair has no UTF-8: the tokenizer and the output cannot
    take it, so it is refused with the file, not at commit after the compute."""
    path = _file(tmp_path, [GOOD if 'id' in line else GOOD_OPENAI, line])
    msg = _refusal(path, tok)
    assert msg.startswith(f'{path}:2: {key} has a lone surrogate'), msg
