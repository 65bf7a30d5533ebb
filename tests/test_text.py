"""The checkpoint's tokenizer (mpimoe/text): chat templates render as
transformers renders them, the BOS rule of tokenizer_config.json, the
template sandbox, and stop strings found at the first token whose text
completes one, checked against decoding every prefix."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mpimoe.errors import DataError
from mpimoe.text.stops import StopMatcher, cut_text
from mpimoe.text.tokenizer import TextTokenizer, read_tokenizer_files
from bpe import write_bpe

MESSAGES = [
    [{'role': 'user', 'content': 'Hello world!'}],
    [{'role': 'system', 'content': 'You route tokens.'},
     {'role': 'user', 'content': 'How are you today? é ü 日本'},
     {'role': 'assistant', 'content': 'The quick brown fox.'},
     {'role': 'user', 'content': 'STOP here.'}],
]


@pytest.fixture(scope='module')
def bpe_dir(tmp_path_factory):
    return write_bpe(tmp_path_factory.mktemp('bpe'))


def _tok(folder, **config):
    """The tokenizer of ``folder`` with tokenizer_config.json keys replaced."""
    files = read_tokenizer_files(folder)
    if config:
        cfg = {**json.loads(files['tokenizer_config.json']), **config}
        files['tokenizer_config.json'] = json.dumps(cfg).encode()
    return TextTokenizer(files, str(folder))


@pytest.mark.parametrize('messages', MESSAGES)
def test_chat_renders_and_encodes_as_transformers_does(bpe_dir, messages):
    transformers = pytest.importorskip('transformers')
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir))
    tok = _tok(bpe_dir)
    assert tok.render_chat(messages) == hf.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert tok.encode_chat(messages) == list(ids['input_ids'])


def test_tojson_and_loop_controls_render_as_transformers_does(bpe_dir):
    transformers = pytest.importorskip('transformers')
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{{ m | tojson }}\n{% endfor %}{{ eos_token }}")
    tok = _tok(bpe_dir, chat_template=template)
    hf = transformers.AutoTokenizer.from_pretrained(str(bpe_dir), chat_template=template)
    assert tok.render_chat(MESSAGES[1]) == hf.apply_chat_template(
        MESSAGES[1], add_generation_prompt=True, tokenize=False)
    assert '日本' in tok.render_chat(MESSAGES[1])           # not escaped to \\u65e5


def test_the_bos_rule_of_tokenizer_config(bpe_dir):
    plain = _tok(bpe_dir)                           # the post-processor adds <s>
    bos = plain.bos_id
    ids = plain.encode_prompt('Hello world')
    assert ids[0] == bos and ids == plain.backend.encode('Hello world').ids
    assert _tok(bpe_dir, add_bos_token=False).encode_prompt('Hello world') == ids[1:]
    assert _tok(bpe_dir, add_bos_token=True).encode_prompt('Hello world') == ids
    # a tokenizer.json without the post-processor: the config's add_bos_token adds it
    files = read_tokenizer_files(bpe_dir)
    spec = json.loads(files['tokenizer.json'])
    spec['post_processor'] = None
    files['tokenizer.json'] = json.dumps(spec).encode()
    bare = TextTokenizer(files, 'bare')
    assert bare.encode_prompt('Hello world') == ids[1:]
    files['tokenizer_config.json'] = json.dumps(
        {**json.loads(files['tokenizer_config.json']), 'add_bos_token': True}).encode()
    assert TextTokenizer(files, 'bare').encode_prompt('Hello world') == ids


def test_chat_template_file_wins_over_the_config(bpe_dir, tmp_path):
    for name, data in read_tokenizer_files(bpe_dir).items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / 'chat_template.jinja').write_text('{{ messages[0].content }}!')
    assert TextTokenizer(read_tokenizer_files(tmp_path), 'x').render_chat(MESSAGES[0]) == \
        'Hello world!!'
    assert _tok(bpe_dir).render_chat(MESSAGES[0]).startswith('<s><|im_start|>user\n')


@pytest.mark.parametrize('template, said', [
    ("{{ raise_exception('only user messages') }}", 'chat template failed: only user messages'),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", 'chat template failed'),
    ("{{ messages.append(1) }}", 'chat template failed'),
])
def test_a_template_that_fails_or_escapes_the_sandbox_is_a_value_error(bpe_dir, template, said):
    with pytest.raises(ValueError, match=said):
        _tok(bpe_dir, chat_template=template).render_chat(MESSAGES[0])


@pytest.mark.parametrize('messages, said', [
    ([], 'non-empty list'),
    ('hi', 'non-empty list'),
    ([{'content': 'x'}], 'messages\\[0\\] has no string "role"'),
    ([{'role': 'user', 'content': 3}], 'messages\\[0\\].content must be a string'),
    ([['user', 'x']], 'messages\\[0\\] is not an object'),
])
def test_malformed_messages_are_named(bpe_dir, messages, said):
    with pytest.raises(ValueError, match=said):
        _tok(bpe_dir).render_chat(messages)


def test_no_template_says_what_to_do(bpe_dir):
    files = read_tokenizer_files(bpe_dir)
    del files['tokenizer_config.json']
    tok = TextTokenizer(files, 'plain')
    assert not tok.has_chat_template
    with pytest.raises(ValueError, match='has no chat template; send "prompt" text'):
        tok.render_chat(MESSAGES[0])


@pytest.mark.parametrize('change, said', [
    ({'tokenizer.json': b'{"version": "1.0"}'}, 'tokenizer.json is not a tokenizer'),
    ({'tokenizer.json': b'\xff\xfe'}, 'tokenizer.json is not a tokenizer'),
    ({'tokenizer_config.json': b'[1]'}, 'tokenizer_config.json is a JSON list'),
    ({'tokenizer_config.json': b'{'}, 'tokenizer_config.json is not valid JSON'),
    ({'tokenizer_config.json': b'{"chat_template": "{% for %}"}'},
     'chat template does not compile'),
])
def test_broken_files_are_one_data_error(bpe_dir, change, said):
    files = {**read_tokenizer_files(bpe_dir), **change}
    with pytest.raises(DataError, match=said):
        TextTokenizer(files, 'src')


def test_read_tokenizer_files_takes_a_file_or_its_directory(bpe_dir, tmp_path):
    assert read_tokenizer_files(bpe_dir / 'tokenizer.json') == read_tokenizer_files(bpe_dir)
    assert set(read_tokenizer_files(bpe_dir)) == {'tokenizer.json', 'tokenizer_config.json'}
    with pytest.raises(DataError, match='no tokenizer.json there'):
        read_tokenizer_files(tmp_path)


def test_a_tokenizer_larger_than_the_model_is_refused(bpe_dir):
    tok = _tok(bpe_dir)
    tok.check_vocab(tok.vocab_size)
    with pytest.raises(DataError, match=f'ids up to {tok.vocab_size - 1}, beyond the '
                                        f'vocabulary of the model \\(vocab_size = 100\\)'):
        tok.check_vocab(100)


def _first_stop(tok, tokens, stops):
    """Oracle: the first k whose prefix tokens[:k] decodes to a text holding a stop."""
    for k in range(1, len(tokens) + 1):
        if any(s in tok.decode(tokens[:k]) for s in stops):
            return k
    return None


@pytest.mark.parametrize('seed', range(6))
def test_stop_strings_fire_at_the_token_that_completes_them(bpe_dir, seed):
    tok = _tok(bpe_dir)
    rng = np.random.default_rng(seed)
    text = 'The quick brown fox. STOP here. The end.\n\nNew paragraph: é ü ß 日本 Hello world!'
    ids = tok.backend.encode(text, add_special_tokens=False).ids
    # stops cut from the text (some across token and UTF-8 byte boundaries) and random ids
    tokens = ids + rng.integers(0, tok.vocab_size, 20).tolist()
    a = int(rng.integers(0, len(text) - 4))
    stops = (text[a:a + int(rng.integers(1, 5))], '日本', 'zzz-never')
    m = StopMatcher(tok, stops)
    fired = next((k + 1 for k, t in enumerate(tokens) if m.push(t)), None)
    assert fired == _first_stop(tok, tokens, stops)
    cut = cut_text(tok, tokens[:fired], stops)
    full = tok.decode(tokens[:fired])
    assert full.startswith(cut) and any(full[len(cut):].startswith(s) for s in stops)
    assert not any(s in cut for s in stops)


def test_cut_text_without_a_stop_is_the_decode(bpe_dir):
    tok = _tok(bpe_dir)
    ids = tok.encode_prompt('Hello world! é')
    assert cut_text(tok, ids, ('zzz',)) == tok.decode(ids) == 'Hello world! é'


def test_the_readme_tokenizer_is_this_training(bpe_dir):
    """weights/tiny-tokenizer (the README's walk-through) is tests/bpe.py's output."""
    shipped = Path(__file__).resolve().parents[1] / 'weights' / 'tiny-tokenizer'
    assert read_tokenizer_files(shipped) == read_tokenizer_files(bpe_dir)


@pytest.mark.parametrize('template, said', [
    ('{% for i in range(100000000) %}{% endfor %}', 'chat template failed: OverflowError'),
    ('{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}',
     'chat template failed: RecursionError'),
    ('{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}',
     'still rendering one chat after 2 s'),
    ('{% for i in range(20000) %}{{ "x" * 1000 }}{% endfor %}',
     'it rendered 20,000,000 characters for one chat'),
])
def test_a_runaway_template_is_stopped_and_said(bpe_dir, template, said):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=said):
        _tok(bpe_dir, chat_template=template).render_chat(MESSAGES[0])
    assert time.monotonic() - t0 < 30


def test_text_parts_are_joined_and_other_parts_refused(bpe_dir):
    tok = _tok(bpe_dir)
    parts = [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hello'},
                                          {'type': 'text', 'text': 'world!'}]}]
    assert tok.render_chat(parts) == tok.render_chat(
        [{'role': 'user', 'content': 'Hello\nworld!'}])
    image = [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': 'x'}}]}]
    with pytest.raises(ValueError, match="has a part of type 'image_url'; this model reads "
                                         'text parts'):
        tok.render_chat(image)


def _byte_fallback_tokenizer():
    """A Llama/Mixtral-style tokenizer: byte-fallback tokens <0x00>..<0xFF>
    and a decoder (Replace, ByteFallback, Fuse, Strip) that rewrites earlier
    text when a byte group turns out not to be UTF-8."""
    from tokenizers import Tokenizer, decoders, models
    vocab = {'<unk>': 0, **{f'<0x{b:02X}>': 1 + b for b in range(256)}, '▁the': 257,
             'the': 258, '▁': 259}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token='<unk>', byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(' ', 1, 0)])
    return TextTokenizer({'tokenizer.json': tok.to_str().encode()}, 'byte-fallback')


def test_stop_strings_with_byte_fallback_fire_where_the_full_decode_has_them():
    tok = _byte_fallback_tokenizer()
    # an ASCII byte, then a byte that is no UTF-8 continuation: both become U+FFFD
    m = StopMatcher(tok, ('zz',))
    assert [m.push(t) for t in (1 + 0x72, 1 + 0x9F, 257)] == [False] * 3
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(3000):
        tokens = rng.integers(0, 260, 6).tolist()
        stop = tok.decode(tokens)[1:3]
        if len(stop) < 2 or '\ufffd' in stop:
            continue
        m = StopMatcher(tok, (stop,))
        fired = next((k + 1 for k, t in enumerate(tokens) if m.push(t)), None)
        assert fired == _first_stop(tok, tokens, (stop,)), (tokens, stop)
        checked += 1
    assert checked > 100
