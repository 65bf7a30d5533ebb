"""JSONL input lines: read with a length cap, parsed, checked and encoded.

A line is one request: an id and a prompt, exactly one of token ids, text or
a chat (the text and the chat encoded by the checkpoint's tokenizer,
:class:`mpimoe.text.tokenizer.TextTokenizer`), optionally with generation
settings (:data:`mpimoe.io.fields.SETTINGS`) that replace the run's defaults
for that request:

    {"id": "doc-1", "tokens": [5, 17, 3]}
    {"id": "q", "prompt": "Once upon a time", "max_tokens": 64, "stop": "\\n\\n"}
    {"id": "c", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0.7}

or an OpenAI batch request line (:mod:`mpimoe.io.openai_batch`).
"""

import dataclasses
import itertools
import json
import re
import sys

import numpy as np
from mpimoe.errors import DataError
from mpimoe.io.fields import (NEEDS_TOKENIZER, PROMPT_KEYS, check_id, id_text, json_text,
                              line_settings, surrogate_at, surrogate_problem)
from mpimoe.io.openai_batch import is_openai_line, openai_request

__all__ = ['MAX_LINE_BYTES', 'jsonl_lines', 'jsonl_sequences', 'parse_line']

#: longest JSONL line, newline included: a longer one is refused, never read whole
MAX_LINE_BYTES = 64 << 20


def jsonl_lines(path, digest=None):
    """Yield (line number, bytes) of the non-blank lines of ``path``, each read
    with a cap of MAX_LINE_BYTES; ``digest`` (a hashlib object) gets every byte."""
    with open(path, 'rb') as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f'{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB '
                                '(a missing newline?); put one sequence per line')
            if digest is not None:
                digest.update(raw)
            if raw.strip():
                yield lineno, raw


def jsonl_sequences(path, vocab_size, defaults, tokenizer=None):
    """Yield (line number, id, tokens int32 [len], SamplingParams, openai) of
    each line (see :func:`parse_line`); params: ``defaults`` with the line's
    settings."""
    for lineno, raw in jsonl_lines(path):
        seq_id, tokens, settings, openai = parse_line(f'{path}:{lineno}', raw, vocab_size,
                                                      tokenizer)
        params = dataclasses.replace(defaults, **settings) if settings else defaults
        yield lineno, seq_id, np.array(tokens, dtype=np.int32), params, openai


def parse_line(where, raw, vocab_size, tokenizer=None):
    """One JSONL line -> (id: str, tokens: list of int, settings: dict of its
    generation settings (:func:`~mpimoe.io.fields.line_settings`), openai:
    None for an mpimoe line, (endpoint, model) for an OpenAI batch line),
    checked, its text or chat encoded by ``tokenizer`` (a TextTokenizer, or
    None: such a line is refused); ``where`` is 'FILE:LINE'."""
    obj = _json_object(where, raw)
    if _SURROGATE_ESCAPE.search(raw):       # ids: check_id says it, naming the id
        _check_no_surrogate(where, {k: v for k, v in obj.items() if k not in ('id', 'custom_id')})
    if is_openai_line(obj):
        seq_id, key, prompt, settings, openai = openai_request(where, obj, vocab_size)
        name = 'prompt' if key == 'tokens' else key          # as the body spells it
    else:
        seq_id, key, prompt = _mpimoe_request(where, obj)
        settings, openai, name = None, None, key
    prefix = f'{where}: id {id_text(seq_id)}'
    tokens = _encode(prefix, key, name, prompt, vocab_size, tokenizer)
    if settings is None:
        settings = line_settings(prefix, obj, vocab_size)
    if settings.get('stop') and tokenizer is None:
        raise DataError(f'{prefix}: "stop" strings need a tokenizer (they are looked for in '
                        f'the generated text): {NEEDS_TOKENIZER}')
    return seq_id, tokens, settings, openai


#: a JSON escape of a UTF-16 surrogate: half of a pair, or a lone one
_SURROGATE_ESCAPE = re.compile(rb'\\u[dD][89a-fA-F]')


def _check_no_surrogate(where, obj, path=''):
    """DataError naming the key path of the first string (or key) in ``obj``
    that holds a lone surrogate (JSON ``"\\ud800"``: half of a UTF-16 pair, no
    character, no UTF-8), which the tokenizer and the output could not take."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for key, value in items:
        at = f'{path}.{key}' if isinstance(key, str) else f'{path}[{key}]'
        for text in (key, value):
            bad = surrogate_at(text) if isinstance(text, str) else None
            if bad is not None:
                raise DataError(f'{where}: {surrogate_problem(at.lstrip("."), text, bad)}; fix '
                                'the line')
        _check_no_surrogate(where, value, at)


def _json_object(where, raw):
    try:
        obj = json.loads(raw.decode('utf-8'))
    except UnicodeDecodeError as e:
        raise DataError(f'{where}: not valid UTF-8 ({e.reason} at byte {e.start})') from None
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: not valid JSON: {e.msg} at column {e.colno}') from None
    except ValueError:          # int('9' * 5000): the int conversion's digit limit
        raise DataError(f'{where}: a number with more than {sys.get_int_max_str_digits()} '
                        'digits, too long for an id or a token id') from None
    except RecursionError:
        raise DataError(f'{where}: JSON nested too deeply; expected '
                        '{"id": ..., "tokens": [...]}') from None
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected an object {{"id": ..., "tokens": [...]}}, '
                        f'got {type(obj).__name__}')
    return obj


def _mpimoe_request(where, obj):
    """(id, prompt key of PROMPT_KEYS, its value unchecked) of an mpimoe line."""
    if 'id' not in obj:
        raise DataError(f'{where}: missing key "id"')
    seq_id = obj['id']
    if type(seq_id) not in (str, int):
        raise DataError(f'{where}: "id" must be a string or an integer, got '
                        f'{json_text(seq_id)}')
    seq_id = str(seq_id)
    check_id(where, seq_id)
    keys = [k for k in PROMPT_KEYS if k in obj]
    if len(keys) != 1:
        said = 'missing key "tokens" (token ids), or "prompt" (text) or "messages" (a chat)' \
            if not keys else f'both "{keys[0]}" and "{keys[1]}"; give one prompt'
        raise DataError(f'{where}: id {id_text(seq_id)}: {said}')
    return seq_id, keys[0], obj[keys[0]]


def _encode(prefix, key, name, prompt, vocab_size, tokenizer):
    """The token ids (list of int, checked) of prompt ``prompt`` of kind
    ``key`` ('tokens', 'prompt' text, 'messages'); name: its key in the line."""
    if key == 'tokens':
        return _token_ids(prefix, name, prompt, vocab_size)
    if key == 'prompt' and not isinstance(prompt, str):
        raise DataError(f'{prefix}: "prompt" must be a string (text), got {json_text(prompt)}; '
                        'token ids go in "tokens"')
    if tokenizer is None:
        what = 'a text prompt' if key == 'prompt' else 'a chat'
        raise DataError(f'{prefix}: {what} ("{key}") needs a tokenizer: {NEEDS_TOKENIZER}')
    try:
        ids = tokenizer.encode_prompt(prompt) if key == 'prompt' else \
            tokenizer.encode_chat(prompt)
    except ValueError as e:
        raise DataError(f'{prefix}: {e}') from None
    if not ids:
        raise DataError(f'{prefix}: "{name}" encodes to no tokens (and the tokenizer adds no '
                        'BOS); give some text')
    return ids


def _token_ids(prefix, name, tokens, vocab_size):
    if not isinstance(tokens, list):
        raise DataError(f'{prefix}: "{name}" must be a list of integers, got '
                        f'{type(tokens).__name__}')
    if not tokens:
        raise DataError(f'{prefix}: empty sequence ("{name}" is [])')
    if set(map(type, tokens)) != {int}:
        j, t = next((j, t) for j, t in enumerate(tokens) if type(t) is not int)
        raise DataError(f'{prefix}: {name}[{j}] = {json_text(t)} is not an integer')
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        j, t = next((j, t) for j, t in enumerate(tokens) if not 0 <= t < vocab_size)
        raise DataError(f'{prefix}: token {json_text(t)} at {name}[{j}] is not in '
                        f'[0, vocab_size={vocab_size})')
    return tokens
