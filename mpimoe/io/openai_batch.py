"""OpenAI batch request lines: the input lines of the OpenAI Batch API (and
of vLLM's ``run_batch``), one request per line, read as mpimoe requests.

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}],
              "max_completion_tokens": 64, "temperature": 0.7}}

The request's id is its ``custom_id``; its prompt is the body's "prompt"
(/v1/completions: text, a list of token ids, or a list of exactly one text)
or "messages" (/v1/chat/completions); its settings are the body's keys of
:data:`BODY_SETTINGS` (a null value: absent, as in the OpenAI API); "model"
is kept for the output to echo.  Any other body key is refused, as
generation here cannot honour it.
"""

from mpimoe.errors import DataError
from mpimoe.io.fields import check_id, check_setting, id_text, json_text

__all__ = ['ENDPOINTS', 'LINE_KEYS', 'BODY_SETTINGS', 'is_openai_line', 'openai_request']

#: the endpoints served: {url: endpoint}
ENDPOINTS = {'/v1/completions': 'completions', '/v1/chat/completions': 'chat'}
#: the keys of a batch line, all required
LINE_KEYS = ('custom_id', 'method', 'url', 'body')
#: body keys read as generation settings: {body key: SamplingParams field}
#: (top_k, stop_token_ids, ignore_eos: vLLM's extensions)
BODY_SETTINGS = {'max_tokens': 'max_tokens', 'max_completion_tokens': 'max_tokens',
                 'temperature': 'temperature', 'top_p': 'top_p', 'seed': 'seed', 'stop': 'stop',
                 'top_k': 'top_k', 'stop_token_ids': 'stop_token_ids',
                 'ignore_eos': 'ignore_eos'}
#: the keys a body may have, by endpoint ("user" is ignored)
_BODY_KEYS = {
    'completions': ('model', 'prompt', *(k for k in BODY_SETTINGS if k != 'max_completion_tokens'),
                    'n', 'stream', 'user'),
    'chat': ('model', 'messages', *BODY_SETTINGS, 'n', 'stream', 'user'),
}


def is_openai_line(obj):
    """Whether input line ``obj`` (a dict) is an OpenAI batch line: it has a
    "custom_id", or another key of LINE_KEYS and no "id"."""
    return 'custom_id' in obj or 'id' not in obj and any(k in obj for k in LINE_KEYS)


def openai_request(where, obj, vocab_size):
    """An OpenAI batch line ``obj`` (a dict) -> (id, prompt key, prompt,
    settings, (endpoint, model)), checked; ``where`` is 'FILE:LINE'.

    prompt key: 'tokens' (prompt: list of int, unchecked), 'prompt' (str) or
    'messages' (unchecked); settings: {SamplingParams field: value}, checked
    and converted; endpoint: 'completions' | 'chat'; model: the body's
    "model" ('' when absent).
    """
    for key in obj:
        if key not in LINE_KEYS:
            raise DataError(f'{where}: unknown key {json_text(key)}; an OpenAI batch line has '
                            f'the keys {", ".join(LINE_KEYS)}')
    for key in LINE_KEYS:
        if key not in obj:
            raise DataError(f'{where}: missing key "{key}" of an OpenAI batch line '
                            f'({{{", ".join(LINE_KEYS)}}})')
    seq_id = obj['custom_id']
    if not isinstance(seq_id, str):
        raise DataError(f'{where}: "custom_id" must be a string, got {json_text(seq_id)}')
    check_id(where, seq_id)
    prefix = f'{where}: id {id_text(seq_id)}'
    if obj['method'] != 'POST':
        raise DataError(f'{prefix}: "method" = {json_text(obj["method"])}: must be "POST"')
    url, body = obj['url'], obj['body']
    if not isinstance(url, str) or url not in ENDPOINTS:
        raise DataError(f'{prefix}: "url" = {json_text(url)}: not served; use '
                        f'{" or ".join(ENDPOINTS)}')
    endpoint = ENDPOINTS[url]
    if not isinstance(body, dict):
        raise DataError(f'{prefix}: "body" must be an object, got {json_text(body)}')
    allowed = _BODY_KEYS[endpoint]
    for key in body:
        if key not in allowed:
            raise DataError(f'{prefix}: body key {json_text(key)} is not supported; a {url} '
                            f'body has {", ".join(allowed)}')
    body = {k: v for k, v in body.items() if v is not None}
    model = body.get('model', '')
    if not isinstance(model, str):
        raise DataError(f'{prefix}: body "model" must be a string, got {json_text(model)}')
    if 'n' in body and not (type(body['n']) is int and body['n'] == 1):
        raise DataError(f'{prefix}: body "n" = {json_text(body["n"])}: must be 1 (one '
                        'completion per request; repeat the line with another custom_id for more)')
    if body.get('stream', False) is not False:
        raise DataError(f'{prefix}: body "stream" = {json_text(body["stream"])}: must be false '
                        '(a batch is not streamed)')
    if 'max_tokens' in body and 'max_completion_tokens' in body:
        raise DataError(f'{prefix}: body has both "max_tokens" and "max_completion_tokens"; '
                        'give one')
    key, prompt = _prompt(prefix, endpoint, body)
    settings = {}
    for name, field in BODY_SETTINGS.items():
        if name in body:
            value = body[name]
            if name == 'top_k' and type(value) is int and value == -1:      # vLLM's "off"
                value = 0
            settings[field] = check_setting(prefix, field, value, vocab_size, name)
    return seq_id, key, prompt, settings, (endpoint, model)


def _prompt(prefix, endpoint, body):
    """(prompt key, prompt) of a body: ('messages', list) for chat; for
    completions ('prompt', str) or ('tokens', list of int)."""
    name = 'messages' if endpoint == 'chat' else 'prompt'
    if name not in body:
        raise DataError(f'{prefix}: body has no "{name}"')
    prompt = body[name]
    if endpoint == 'chat':
        return name, prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return 'prompt', prompt
    if isinstance(prompt, list) and all(type(t) is int for t in prompt):     # [] too: 'empty'
        return 'tokens', prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
        raise DataError(f'{prefix}: body "prompt" holds {len(prompt)} prompts; a batch line is '
                        'one request: put each prompt on a line of its own')
    raise DataError(f'{prefix}: body "prompt" must be a string, a list of token ids or a list '
                    f'of one string, got {json_text(prompt)}')
