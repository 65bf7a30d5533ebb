"""JSONL input lines: read with a length cap, parsed and checked.

A line is ``{"id": "doc-1", "tokens": [5, 17, 3]}``, optionally with
generation settings (:data:`mpimoe.io.fields.SETTINGS`) that replace the
run's defaults for that sequence: ``{"id": "q", "tokens": [5], "max_tokens":
64, "temperature": 0.7, "seed": 3}``.
"""

import dataclasses
import itertools
import json
import sys

import numpy as np
from mpimoe.errors import DataError
from mpimoe.io.fields import check_id, id_text, json_text, line_settings

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


def jsonl_sequences(path, vocab_size, defaults):
    """Yield (line number, id, tokens int32 [len], SamplingParams) of each line;
    params: ``defaults`` with the line's settings."""
    for lineno, raw in jsonl_lines(path):
        seq_id, tokens, settings = parse_line(f'{path}:{lineno}', raw, vocab_size)
        params = dataclasses.replace(defaults, **settings) if settings else defaults
        yield lineno, seq_id, np.array(tokens, dtype=np.int32), params


def parse_line(where, raw, vocab_size):
    """One JSONL line -> (id: str, tokens: list of int, settings: dict of its
    generation settings, see :func:`~mpimoe.io.fields.line_settings`), checked;
    ``where`` is 'FILE:LINE'."""
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
    for key in ('id', 'tokens'):
        if key not in obj:
            raise DataError(f'{where}: missing key "{key}"')
    seq_id, tokens = obj['id'], obj['tokens']
    if type(seq_id) not in (str, int):
        raise DataError(f'{where}: "id" must be a string or an integer, got '
                        f'{json_text(seq_id)}')
    seq_id = str(seq_id)
    check_id(where, seq_id)
    prefix = f'{where}: id {id_text(seq_id)}'
    if not isinstance(tokens, list):
        raise DataError(f'{prefix}: "tokens" must be a list of integers, got '
                        f'{type(tokens).__name__}')
    if not tokens:
        raise DataError(f'{prefix}: empty sequence ("tokens" is [])')
    if set(map(type, tokens)) != {int}:
        j, t = next((j, t) for j, t in enumerate(tokens) if type(t) is not int)
        raise DataError(f'{prefix}: tokens[{j}] = {json_text(t)} is not an integer')
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        j, t = next((j, t) for j, t in enumerate(tokens) if not 0 <= t < vocab_size)
        raise DataError(f'{prefix}: token {json_text(t)} at tokens[{j}] is not in '
                        f'[0, vocab_size={vocab_size})')
    return seq_id, tokens, line_settings(prefix, obj, vocab_size)
