"""The fields of one input sequence besides its tokens, checked: its id, and
its generation settings (an input line's keys, or the run's defaults).

    settings = line_settings(prefix, {'temperature': 0.7, 'seed': 3}, vocab_size)
    params = dataclasses.replace(defaults, **settings)      # SamplingParams
"""

import dataclasses
import json
import math

from mpimoe.errors import DataError, UsageError
from mpimoe.runtime.request import SamplingParams

__all__ = ['SETTINGS', 'OPTIONS', 'PROMPT_KEYS', 'NEEDS_TOKENIZER', 'line_settings',
           'check_setting', 'check_defaults', 'check_id', 'surrogate_at', 'surrogate_problem',
           'id_text', 'json_text']

#: longest id, in bytes of UTF-8
MAX_ID_BYTES = 1024
#: highest temperature (softmax(logits / 100) is all but uniform)
MAX_TEMPERATURE = 100
#: most stop tokens of a sequence
MAX_STOP_IDS = 64
#: most stop strings of a sequence, and the longest one (characters)
MAX_STOPS, MAX_STOP_CHARS = 16, 256

#: an input line's generation settings (SamplingParams fields), in order
SETTINGS = tuple(f.name for f in dataclasses.fields(SamplingParams))
#: the run option that gives each setting's default
OPTIONS = {'max_tokens': '--max-new-tokens', 'temperature': '--temperature',
           'top_k': '--top-k', 'top_p': '--top-p', 'seed': '--seed',
           'stop_token_ids': '--stop-token-ids', 'ignore_eos': '--ignore-eos',
           'stop': '--stop'}
#: the keys of an input line's prompt, exactly one per line: token ids, text, a chat
PROMPT_KEYS = ('tokens', 'prompt', 'messages')
#: what a request without a tokenizer is told to do (after 'X needs a tokenizer')
NEEDS_TOKENIZER = 'the weight file has none; pass --tokenizer PATH'


def _is_int(v):
    return type(v) is int             # not a bool, not a float 3.0


def _is_number(v):
    return type(v) in (int, float) and math.isfinite(v)


def _rule(key, vocab_size):
    """(accepts(value) -> bool, what the value must be) of setting ``key``."""
    ints, numbers = _is_int, _is_number
    return {
        'max_tokens': (lambda v: ints(v) and v >= 0, 'an integer >= 0'),
        'temperature': (lambda v: numbers(v) and 0 <= v <= MAX_TEMPERATURE,
                        f'a number in [0, {MAX_TEMPERATURE}] (0: greedy)'),
        'top_k': (lambda v: ints(v) and 0 <= v <= vocab_size,
                  f'an integer in [0, vocab_size={vocab_size}] (0: off)'),
        'top_p': (lambda v: numbers(v) and 0 < v <= 1, 'a number in (0, 1]'),
        'seed': (lambda v: ints(v) and 0 <= v < 1 << 63, 'an integer in [0, 2^63)'),
        'stop_token_ids': (lambda v: isinstance(v, (list, tuple)) and len(v) <= MAX_STOP_IDS
                           and all(ints(t) and 0 <= t < vocab_size for t in v),
                           f'a list of at most {MAX_STOP_IDS} token ids in '
                           f'[0, vocab_size={vocab_size})'),
        'ignore_eos': (lambda v: type(v) is bool, 'true or false'),
        'stop': (lambda v: _is_stops(v), f'a string or a list of at most {MAX_STOPS} strings, '
                 f'each of 1 to {MAX_STOP_CHARS} characters'),
    }[key]


def _is_stops(v):
    items = [v] if isinstance(v, str) else v
    return isinstance(items, (list, tuple)) and len(items) <= MAX_STOPS and all(
        isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and surrogate_at(s) is None for s in items)


def surrogate_at(text):
    """Where the first lone surrogate of ``text`` is (half of a UTF-16 pair,
    no character, no UTF-8: JSON "\\ud800", or a command line argument that
    is not UTF-8), or None."""
    try:
        text.encode('utf-8')
    except UnicodeEncodeError as e:
        return e.start
    return None


def surrogate_problem(what, text, at):
    """The message of a lone surrogate at ``at`` in ``text`` (of ``what``)."""
    return (f'{what} has a lone surrogate {text[at]!r} at character {at} (half of a UTF-16 '
            'pair, not a character)')


def _converted(key, value):
    """A checked setting as SamplingParams holds it: floats, a tuple."""
    if key in ('temperature', 'top_p'):
        return float(value)
    if key == 'stop' and isinstance(value, str):
        return (value,)
    return tuple(value) if key in ('stop_token_ids', 'stop') else value


def line_settings(prefix, obj, vocab_size):
    """The generation settings of input line ``obj`` (a dict) besides "id" and
    its prompt (PROMPT_KEYS), checked and converted: {key: value}.

    DataError starting with ``prefix`` ('FILE:LINE: id ...') for a key not in
    SETTINGS (listing the allowed ones) or a value of the wrong type or range
    (:func:`check_setting`).
    """
    settings = {}
    for key, value in obj.items():
        if key == 'id' or key in PROMPT_KEYS:
            continue
        if key not in SETTINGS:
            raise DataError(f'{prefix}: unknown key {json_text(key)}; a line has the keys id, '
                            f'one of {"/".join(PROMPT_KEYS)}, and {", ".join(SETTINGS)}')
        settings[key] = check_setting(prefix, key, value, vocab_size)
    return settings


def check_setting(prefix, key, value, vocab_size, name=None):
    """Setting ``key`` (of SETTINGS) checked and converted as SamplingParams
    holds it; DataError starting with ``prefix`` naming the key as the line
    spells it (``name``, default ``key``), the value and its range."""
    accepts, allowed = _rule(key, vocab_size)
    if not accepts(value):
        raise DataError(f'{prefix}: "{name or key}" = {_setting_text(value)}: must be {allowed}')
    return _converted(key, value)


def check_defaults(defaults, vocab_size):
    """UsageError naming the run option (OPTIONS) of the first setting of
    ``defaults`` (SamplingParams) that is of the wrong type or range."""
    for key in SETTINGS:
        value = getattr(defaults, key)
        accepts, allowed = _rule(key, vocab_size)
        if not accepts(value):
            shown = ','.join(map(str, value)) if key == 'stop_token_ids' and \
                isinstance(value, (list, tuple)) else value
            if key == 'stop':
                raise UsageError(f'--stop: {MAX_STOPS} at most, each of 1 to {MAX_STOP_CHARS} '
                                 f'characters; got {_setting_text(list(value))}')
            raise UsageError(f'{OPTIONS[key]} {shown}: must be {allowed}')


def check_id(where, seq_id):
    """DataError unless ``seq_id`` is Unicode text (no lone surrogate: it has no
    UTF-8) without NUL (an HDF5 string ends there) of at most MAX_ID_BYTES bytes."""
    at = surrogate_at(seq_id)
    if at is not None:
        raise DataError(f'{where}: {surrogate_problem(f"id {id_text(seq_id)}", seq_id, at)}; '
                        'fix the id')
    size = len(seq_id.encode('utf-8'))
    if '\0' in seq_id:
        raise DataError(f'{where}: id {id_text(seq_id)} contains NUL at character '
                        f'{seq_id.index(chr(0))}; ids are text without NUL')
    if size > MAX_ID_BYTES:
        raise DataError(f'{where}: id {id_text(seq_id)} has {size} bytes of UTF-8; ids have '
                        f'at most {MAX_ID_BYTES}')


def id_text(seq_id, limit=48):
    """repr of an id for a message, cut short if long."""
    if len(seq_id) <= limit:
        return repr(seq_id)
    return f'{seq_id[:limit - 8]!r}... ({len(seq_id)} characters)'


def json_text(value, limit=40):
    """A JSON value for a message, short: a list or object as [...] or {...}."""
    if isinstance(value, (list, dict)):
        return '[...]' if isinstance(value, list) else '{...}'
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _setting_text(value):
    """A setting's value for a message: as :func:`json_text`, but a list of
    scalars (stop_token_ids) is shown, cut short."""
    if isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + '...'
    return json_text(value)
